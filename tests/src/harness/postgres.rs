//! A real Postgres per test binary (or per fault test), and a fresh database per test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::sync::OnceCell;

use super::procs::{Guarded, RunAs, Spec, is_executable, which};
use super::{free_port, unique_suffix, wait_for};

const INSTALL_HINT: &str = "Postgres server binaries (initdb, postgres) not found: install them with \
`apt-get install -y postgresql` (or set PG_BIN_DIR=/usr/lib/postgresql/<version>/bin)";

/// Finds the directory holding `initdb` and `postgres`: `PG_BIN_DIR`, `pg_config --bindir`,
/// the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn pg_bin_dir() -> Result<PathBuf> {
    let has_server =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "PG_BIN_DIR={} has no initdb and postgres; {INSTALL_HINT}",
            dir.display()
        );
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Some(initdb) = which("initdb")
        && let Some(dir) = initdb.parent()
        && has_server(dir)
    {
        return Ok(dir.to_path_buf());
    }
    bail!(INSTALL_HINT)
}

/// A Postgres server on a free port, in a temporary directory, with password authentication
/// (scram-sha-256) for the `postgres` superuser. Runs as `nobody` when the tests run as root.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    dir: PathBuf,
    _tmp: Option<TempDir>,
    bin_dir: PathBuf,
    password: String,
    run_as: Option<RunAs>,
    proc: Option<Guarded>,
}

impl PostgresServer {
    /// Starts a server owned by the caller; its directory goes when it is dropped.
    pub async fn start() -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("tardis-pg-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        Self::init(dir, Some(tmp), false).await
    }

    async fn start_detached() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tardis-pg-")
            .tempdir()?
            .keep();
        Self::init(dir, None, true).await
    }

    async fn init(dir: PathBuf, tmp: Option<TempDir>, detached: bool) -> Result<Self> {
        let bin_dir = pg_bin_dir()?;
        let run_as = RunAs::unprivileged_if_root()?;
        if let Some(r) = run_as {
            r.chown(&dir)?;
        }
        let password = format!("pw-{}", unique_suffix());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password)?;
        if let Some(r) = run_as {
            r.chown(&pwfile)?;
        }
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .env_remove("PGDATA");
        if let Some(r) = run_as {
            r.apply(&mut initdb);
        }
        let out = tokio::task::spawn_blocking(move || initdb.output()).await??;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut server = Self {
            port: free_port()?,
            dir: dir.clone(),
            _tmp: tmp,
            bin_dir,
            password,
            run_as,
            proc: None,
        };
        server.launch(detached.then_some(dir)).await?;
        Ok(server)
    }

    async fn launch(&mut self, cleanup: Option<PathBuf>) -> Result<()> {
        let spec = Spec {
            program: self.bin_dir.join("postgres"),
            args: vec![
                "-D".into(),
                self.dir.join("data").display().to_string(),
                "-p".into(),
                self.port.to_string(),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                "unix_socket_directories=".into(),
                "-c".into(),
                "max_connections=300".into(),
                // Tests never survive an OS crash; a killed process loses nothing either way.
                "-c".into(),
                "fsync=off".into(),
                "-c".into(),
                "full_page_writes=off".into(),
            ]
            .into_iter()
            .chain(extra_settings())
            .collect(),
            log: self.dir.join("postgres.log"),
            // SIGINT is Postgres's "fast" shutdown; SIGTERM would wait for clients.
            stop_signal: Signal::SIGINT,
            cleanup,
            run_as: self.run_as,
        };
        self.proc = Some(Guarded::spawn(&spec)?);
        let url = self.admin_url();
        let log = self.dir.join("postgres.log");
        wait_for(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                let log = log.clone();
                async move {
                    match connect(&url).await {
                        Ok(_) => Ok(Some(())),
                        Err(e) => {
                            let tail = std::fs::read_to_string(&log).unwrap_or_default();
                            bail!(
                                "{e:#}; server log: {}",
                                tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                            )
                        }
                    }
                }
            },
        )
        .await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's URL for the `postgres` database.
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(Guarded::is_running)
    }

    /// SIGKILL the postmaster (its backends exit when they notice).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.stop_with(Signal::SIGKILL, Duration::from_secs(10))
                .await?;
        }
        Ok(())
    }

    /// A fast shutdown (SIGINT): clients are disconnected, data is checkpointed.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.stop_with(Signal::SIGINT, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.stop().await?;
        }
        self.launch(None).await
    }
}

/// Connects with tokio-postgres, driving the connection in a background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to postgres")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "test postgres connection ended");
        }
    });
    Ok(client)
}

struct Shared {
    admin_url: String,
    _server: Option<PostgresServer>,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();

/// The admin URL shared by the tests of this binary: `DATABASE_URL` when set, else one
/// Postgres started on first use.
pub async fn shared_postgres() -> Result<String> {
    let shared = SHARED
        .get_or_try_init(|| async {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return Ok::<_, anyhow::Error>(Shared {
                    admin_url: url,
                    _server: None,
                });
            }
            let server = PostgresServer::start_detached().await?;
            Ok(Shared {
                admin_url: server.admin_url(),
                _server: Some(server),
            })
        })
        .await?;
    Ok(shared.admin_url.clone())
}

/// A fresh database for one test, on the shared server (or on `admin_url`).
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    pub async fn new() -> Result<Self> {
        Self::on(&shared_postgres().await?).await
    }

    pub async fn on(admin_url: &str) -> Result<Self> {
        let name = format!("tardis_test_{}", unique_suffix());
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let mut config: tokio_postgres::Config = admin_url.parse()?;
        config.dbname(&name);
        let url = replace_dbname(admin_url, &name)?;
        drop(config);
        Ok(Self {
            name,
            url,
            admin_url: admin_url.to_string(),
        })
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    /// Drops the database (its sessions ended by force): for a benchmark's runs one after
    /// another, so the last run's rows leave no autovacuum to the next. Tests leave theirs
    /// to the server's end.
    pub async fn drop_database(self) -> Result<()> {
        connect(&self.admin_url)
            .await?
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}

/// `admin_url` with its database replaced by `db`.
fn replace_dbname(admin_url: &str, db: &str) -> Result<String> {
    let mut url = url::Url::parse(admin_url)
        .context("DATABASE_URL must be a postgres:// URL for the tests")?;
    url.set_path(&format!("/{db}"));
    Ok(url.to_string())
}

/// Settings from `TARDIS_TEST_PG_SETTINGS` (`name=value`, whitespace-separated), each passed
/// as `-c name=value` after the harness's own: for benchmarks and investigations (e.g.
/// `log_min_duration_statement=0 logging_collector=on log_directory=/tmp/pglog`).
fn extra_settings() -> Vec<String> {
    std::env::var("TARDIS_TEST_PG_SETTINGS")
        .unwrap_or_default()
        .split_whitespace()
        .flat_map(|s| ["-c".to_string(), s.to_string()])
        .collect()
}
