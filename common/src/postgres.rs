//! Postgres: connection settings and the deadpool pool.
//!
//! `DATABASE_URL` (a `postgres://` URL or a libpq key=value string) wins; otherwise
//! `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE` with the password from `DB_PASSWORD` (the
//! legacy Secret key) or `PGPASSWORD`. `DB_PASSWORD` also fills in a `DATABASE_URL` that has
//! no password. TLS: `PGSSLMODE` = `disable`, `prefer` (default) or `require`; certificates
//! are always verified (webpki roots plus `PGSSLROOTCERT` when set).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;

use crate::Secret;
use crate::config::Reader;

/// How to reach Postgres.
#[derive(Clone)]
pub struct PostgresSettings {
    url: Option<Secret<String>>,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<Secret<String>>,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
    /// `DB_POOL_SIZE`, default 8.
    pub pool_size: usize,
    /// `DB_CONNECT_TIMEOUT`, default 5 s.
    pub connect_timeout: Duration,
    /// Server-side limits set on every connection (`statement_timeout`,
    /// `idle_in_transaction_session_timeout`); `None` leaves the server's default.
    pub statement_timeout: Option<Duration>,
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("target", &self.display_target())
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PostgresSettings {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let password = r.secret("DB_PASSWORD").or_else(|| r.secret("PGPASSWORD"));
        let ssl_mode = match r.string("PGSSLMODE").as_deref() {
            None | Some("prefer") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
            Some(other) => {
                r.problem(
                    "PGSSLMODE",
                    format!("unsupported mode {other:?}"),
                    "use disable, prefer or require (certificates are always verified), for example PGSSLMODE=require",
                );
                SslMode::Prefer
            }
        };
        let ssl_root_cert = r.existing_file("PGSSLROOTCERT", "/etc/ssl/postgres-ca.pem");
        let pool_size = r.positive_u32("DB_POOL_SIZE", 8) as usize;
        let connect_timeout = r.duration("DB_CONNECT_TIMEOUT", Duration::from_secs(5));
        let mut settings = Self {
            url: None,
            host: r.string("PGHOST").unwrap_or_else(|| "localhost".into()),
            port: 5432,
            user: r.string("PGUSER").unwrap_or_else(|| "tardis".into()),
            dbname: r.string("PGDATABASE").unwrap_or_else(|| "tardis".into()),
            password,
            ssl_mode,
            ssl_root_cert,
            pool_size,
            connect_timeout,
            statement_timeout: None,
            idle_in_transaction_timeout: None,
        };
        if let Some(port) = r.string("PGPORT") {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => settings.port = p,
                _ => r.problem(
                    "PGPORT",
                    format!("is not a port number: {port:?}"),
                    "for example PGPORT=5432",
                ),
            }
        }
        if let Some(url) = r.raw("DATABASE_URL") {
            match tokio_postgres::Config::from_str(url.trim()) {
                Ok(config) => {
                    if let Some(tokio_postgres::config::Host::Tcp(h)) = config.get_hosts().first() {
                        settings.host = h.clone();
                    }
                    if let Some(p) = config.get_ports().first() {
                        settings.port = *p;
                    }
                    if let Some(u) = config.get_user() {
                        settings.user = u.to_string();
                    }
                    if let Some(d) = config.get_dbname() {
                        settings.dbname = d.to_string();
                    }
                    settings.url = Some(Secret::new(url.trim().to_string()));
                }
                // The parse error never echoes the URL, which may hold a password.
                Err(e) => r.problem(
                    "DATABASE_URL",
                    format!("is not a Postgres connection URL ({e})"),
                    "for example DATABASE_URL=postgres://tardis@postgres:5432/tardis (the password can come from DB_PASSWORD)",
                ),
            }
        }
        settings
    }

    /// `user@host:port/dbname`, for logs.
    pub fn display_target(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// The tokio-postgres configuration, password included.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut config = match &self.url {
            Some(url) => tokio_postgres::Config::from_str(url.expose())
                .unwrap_or_else(|_| tokio_postgres::Config::new()),
            None => {
                let mut c = tokio_postgres::Config::new();
                c.host(&self.host)
                    .port(self.port)
                    .user(&self.user)
                    .dbname(&self.dbname);
                c
            }
        };
        if config.get_password().is_none()
            && let Some(p) = &self.password
        {
            config.password(p.expose());
        }
        config.ssl_mode(self.ssl_mode);
        config.connect_timeout(self.connect_timeout);
        config.application_name("tardis");
        let mut options: Vec<String> = config
            .get_options()
            .map(|o| vec![o.to_string()])
            .unwrap_or_default();
        if let Some(t) = self.statement_timeout {
            options.push(format!("-c statement_timeout={}", t.as_millis()));
        }
        if let Some(t) = self.idle_in_transaction_timeout {
            options.push(format!(
                "-c idle_in_transaction_session_timeout={}",
                t.as_millis()
            ));
        }
        if !options.is_empty() {
            config.options(options.join(" "));
        }
        config
    }

    /// A connection pool. No connection is made until the first `get()`.
    pub fn pool(&self) -> Result<Pool, PoolError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let config = self.pg_config();
        let manager = if self.ssl_mode == SslMode::Disable {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        } else {
            Manager::from_config(config, self.tls()?, manager_config)
        };
        Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| PoolError::Build(e.to_string()))
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PoolError> {
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.ssl_root_cert {
            let pem = std::fs::read(path)
                .map_err(|e| PoolError::RootCert(path.clone(), e.to_string()))?;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls::pki_types::CertificateDer<'static> =
                    cert.map_err(|e| PoolError::RootCert(path.clone(), e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| PoolError::RootCert(path.clone(), e.to_string()))?;
            }
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot build the Postgres pool: {0}")]
    Build(String),
    #[error("cannot read PGSSLROOTCERT {0}: {1}")]
    RootCert(PathBuf, String),
}

/// Keeps `ready` equal to "Postgres answers `SELECT 1`", checking every `interval` (faster,
/// with backoff, while it is down), until `shutdown`.
pub async fn watch_reachability(
    pool: Pool,
    ready: crate::ops::ReadyFlag,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let backoff = crate::backoff::Backoff::new(Duration::from_millis(200), interval);
    let mut failures = 0u32;
    loop {
        let ok = match pool.get().await {
            Ok(client) => client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| crate::error::chain(&e)),
            Err(e) => Err(crate::error::chain(&e)),
        };
        let wait = match ok {
            Ok(()) => {
                if !ready.get() {
                    tracing::info!("postgres reachable");
                }
                ready.set(true);
                failures = 0;
                interval
            }
            Err(error) => {
                if ready.get() || failures == 0 {
                    tracing::warn!(%error, "postgres unreachable");
                }
                ready.set(false);
                failures = failures.saturating_add(1);
                backoff.delay(failures).max(Duration::from_millis(100))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> (PostgresSettings, Result<(), crate::config::ConfigError>) {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut r = Reader::new(&env);
        let s = PostgresSettings::read(&mut r);
        (s, r.finish())
    }

    #[test]
    fn pg_variables_with_the_legacy_password() {
        let (s, ok) = read(&[
            ("PGHOST", "db"),
            ("PGPORT", "6543"),
            ("PGUSER", "u"),
            ("PGDATABASE", "d"),
            ("DB_PASSWORD", "pw-123456"),
        ]);
        ok.unwrap();
        assert_eq!(s.display_target(), "u@db:6543/d");
        assert_eq!(s.pg_config().get_password(), Some(&b"pw-123456"[..]));
        assert!(!format!("{s:?}").contains("pw-123456"));
    }

    #[test]
    fn database_url_wins_and_db_password_fills_it_in() {
        let (s, ok) = read(&[
            ("DATABASE_URL", "postgres://w@pg:5433/tardis"),
            ("PGHOST", "ignored"),
            ("DB_PASSWORD", "pw-abcdef"),
        ]);
        ok.unwrap();
        assert_eq!(s.display_target(), "w@pg:5433/tardis");
        assert_eq!(s.pg_config().get_password(), Some(&b"pw-abcdef"[..]));
    }

    #[test]
    fn url_password_is_never_printed_even_when_invalid() {
        let (s, ok) = read(&[("DATABASE_URL", "postgres://w:url-secret-pw@pg:5433/tardis")]);
        ok.unwrap();
        assert!(!format!("{s:?}").contains("url-secret-pw"));
        let (_, err) = read(&[("DATABASE_URL", "postgres://w:url-secret-pw@pg:notaport/x")]);
        let text = err.unwrap_err().to_string();
        assert!(
            text.contains("DATABASE_URL: is not a Postgres connection URL"),
            "{text}"
        );
        assert!(!text.contains("url-secret-pw"), "{text}");
    }

    #[test]
    fn bad_port_and_ssl_mode_are_reported_together() {
        let (_, err) = read(&[("PGPORT", "0"), ("PGSSLMODE", "sometimes")]);
        let text = err.unwrap_err().to_string();
        assert!(text.contains("PGPORT: is not a port number"), "{text}");
        assert!(
            text.contains("PGSSLMODE: unsupported mode \"sometimes\""),
            "{text}"
        );
    }
}
