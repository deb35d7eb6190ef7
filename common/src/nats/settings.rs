//! Connecting: URLs, credentials, TLS, and the first connection retried until it succeeds.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Secret;
use crate::backoff::Backoff;
use crate::config::Reader;
use crate::ops::ReadyFlag;

use super::NatsError;

/// How to reach NATS: `NATS_URL` and the optional credentials and TLS files.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `NATS_URL`: one or more comma-separated server URLs.
    pub servers: Vec<ServerAddr>,
    pub auth: NatsAuth,
    /// `NATS_TLS_CA_FILE`: extra root certificates (PEM).
    pub tls_ca_file: Option<PathBuf>,
    /// `NATS_TLS_CERT_FILE` + `NATS_TLS_KEY_FILE`: a client certificate (mutual TLS).
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// `NATS_TLS_REQUIRED`: refuse a plain-text connection.
    pub tls_required: bool,
    /// `NATS_CONNECT_TIMEOUT`: one connection attempt.
    pub connect_timeout: Duration,
}

/// NATS authentication (at most one kind).
#[derive(Debug, Clone)]
pub enum NatsAuth {
    None,
    /// `NATS_USER` + `NATS_PASSWORD`.
    UserPassword {
        user: String,
        password: Secret<String>,
    },
    /// `NATS_TOKEN`.
    Token(Secret<String>),
    /// `NATS_CREDS_FILE`: a `.creds` file (JWT + NKey seed).
    CredsFile(PathBuf),
}

impl NatsSettings {
    pub const DEFAULT_URL: &'static str = "nats://127.0.0.1:4222";

    pub fn read(r: &mut Reader<'_>) -> Self {
        let raw = r
            .string("NATS_URL")
            .unwrap_or_else(|| Self::DEFAULT_URL.to_string());
        let mut servers = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match ServerAddr::from_str(part) {
                Ok(addr) => servers.push(addr),
                Err(e) => r.problem(
                    "NATS_URL",
                    format!("{part:?} is not a NATS server URL ({e})"),
                    "for example NATS_URL=nats://nats:4222 or NATS_URL=nats://n1:4222,nats://n2:4222",
                ),
            }
        }
        if servers.is_empty() {
            servers.push(ServerAddr::from_str(Self::DEFAULT_URL).expect("default NATS URL parses"));
        }
        let user = r.string("NATS_USER");
        let password = r.secret("NATS_PASSWORD");
        let token = r.secret("NATS_TOKEN");
        let creds = r.existing_file("NATS_CREDS_FILE", "/etc/nats/tardis.creds");
        let kinds = [
            user.is_some() || password.is_some(),
            token.is_some(),
            creds.is_some(),
        ];
        let auth = if kinds.iter().filter(|k| **k).count() > 1 {
            r.problem(
                "NATS_USER/NATS_TOKEN/NATS_CREDS_FILE",
                "more than one kind of NATS authentication is set",
                "set only one of NATS_USER+NATS_PASSWORD, NATS_TOKEN or NATS_CREDS_FILE",
            );
            NatsAuth::None
        } else if let Some(token) = token {
            NatsAuth::Token(token)
        } else if let Some(path) = creds {
            NatsAuth::CredsFile(path)
        } else {
            match (user, password) {
                (Some(user), Some(password)) => NatsAuth::UserPassword { user, password },
                (None, None) => NatsAuth::None,
                (Some(_), None) => {
                    r.problem(
                        "NATS_PASSWORD",
                        "is not set but NATS_USER is",
                        "set both NATS_USER and NATS_PASSWORD, or neither",
                    );
                    NatsAuth::None
                }
                (None, Some(_)) => {
                    r.problem(
                        "NATS_USER",
                        "is not set but NATS_PASSWORD is",
                        "set both NATS_USER and NATS_PASSWORD, or neither",
                    );
                    NatsAuth::None
                }
            }
        };
        let tls_ca_file = r.existing_file("NATS_TLS_CA_FILE", "/etc/nats/ca.pem");
        let cert = r.existing_file("NATS_TLS_CERT_FILE", "/etc/nats/client.pem");
        let key = r.existing_file("NATS_TLS_KEY_FILE", "/etc/nats/client-key.pem");
        let tls_client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                if r.string("NATS_TLS_CERT_FILE").is_some()
                    != r.string("NATS_TLS_KEY_FILE").is_some()
                {
                    r.problem(
                        "NATS_TLS_CERT_FILE/NATS_TLS_KEY_FILE",
                        "only one of the client certificate and its key is set",
                        "set both NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE, or neither",
                    );
                }
                None
            }
        };
        let tls_required =
            r.bool("NATS_TLS_REQUIRED", false) || servers.iter().any(|s| s.tls_required());
        Self {
            servers,
            auth,
            tls_ca_file,
            tls_client_cert,
            tls_required,
            connect_timeout: r.duration("NATS_CONNECT_TIMEOUT", Duration::from_secs(5)),
        }
    }

    /// The servers, for logs (credentials in URLs are not printed).
    pub fn display_servers(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}:{}", s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn options(
        &self,
        client_name: &str,
        ready: Option<ReadyFlag>,
    ) -> std::io::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .name(client_name)
            .connection_timeout(self.connect_timeout)
            .max_reconnects(None)
            .require_tls(self.tls_required)
            .event_callback(move |event| {
                let ready = ready.clone();
                async move {
                    match &event {
                        Event::Connected => {
                            info!("nats connected");
                            if let Some(r) = &ready {
                                r.set(true);
                            }
                        }
                        Event::Disconnected => {
                            warn!("nats disconnected, reconnecting");
                            if let Some(r) = &ready {
                                r.set(false);
                            }
                        }
                        Event::Draining | Event::Closed => info!(event = %event, "nats connection"),
                        other => warn!(event = %other, "nats event"),
                    }
                }
            });
        options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().clone())
            }
            NatsAuth::Token(token) => options.token(token.expose().clone()),
            NatsAuth::CredsFile(path) => options.credentials_file(path).await?,
        };
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls_client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }

    /// Connects, retrying the first connection with backoff until it succeeds or `shutdown`
    /// fires. Once connected, the client reconnects by itself; `ready` follows the connection
    /// state.
    pub async fn connect(
        &self,
        client_name: &str,
        ready: Option<ReadyFlag>,
        shutdown: &CancellationToken,
    ) -> Result<async_nats::Client, NatsError> {
        crate::install_crypto_provider();
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut attempt = 0u32;
        loop {
            let options = self
                .options(client_name, ready.clone())
                .await
                .map_err(NatsError::Credentials)?;
            let result = tokio::select! {
                r = options.connect(self.servers.clone()) => r,
                () = shutdown.cancelled() => return Err(NatsError::Cancelled),
            };
            match result {
                Ok(client) => {
                    if let Some(r) = &ready {
                        r.set(true);
                    }
                    info!(servers = %self.display_servers(), max_payload = client.server_info().max_payload, "connected to nats");
                    return Ok(client);
                }
                Err(error) if is_permanent(&error) => return Err(NatsError::Connect(error)),
                Err(error) => {
                    let delay = backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    warn!(%error, servers = %self.display_servers(), attempt, retry_in_ms = delay.as_millis() as u64, "nats connection failed");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Err(NatsError::Cancelled),
                    }
                }
            }
        }
    }
}

/// Connection errors that retrying cannot fix: bad credentials, TLS misconfiguration.
fn is_permanent(error: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as K;
    matches!(
        error.kind(),
        K::Authentication | K::AuthorizationViolation | K::Tls
    )
}
