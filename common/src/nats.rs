//! NATS: connection settings, the one definition of every name, and provisioning.
//!
//! # Names
//! [`Names`] is the only place that spells a stream, subject, consumer or bucket name. With
//! `TARDIS_PREFIX=p` every name takes the prefix (`p_TARDIS_RECORDS`, `p.tardis.records.<source>`,
//! `p_enricher`, `p_TARDIS_FETCH_STATE`), so several pipelines — or parallel tests — share one
//! NATS server without seeing each other's messages.
//!
//! # Streams
//! Every stream is a work queue drained by exactly one durable consumer ([`ConsumerKind`]);
//! storage is file, replicas configurable, and `discard: new` — when a stream is full the
//! publisher gets an error and backs off, the stream never drops unprocessed data. No stream
//! has a `max_age`, for the same reason.
//!
//! The duplicate window (`TARDIS_DUPLICATE_WINDOW`, default 2 h, server default 2 min) is what
//! makes a re-run harmless: every publish carries a deterministic `Nats-Msg-Id`, and JetStream
//! drops a message whose id it saw within the window. A fetcher that crashes after publishing
//! chunks but before saving its cursor republishes the same chunks on its next run — which
//! comes one schedule interval later (the legacy `COLLECTION_INTERVAL` is one hour) plus the
//! retries' backoff. The window must cover that gap, hence 2 h rather than 2 min.
//!
//! # Who provisions what
//! Each worker creates or updates, at start-up, the streams it touches and its own consumers
//! ([`Topology::provision`]). Stream settings derive only from the common keys, so all workers
//! agree on them; consumer settings belong to the worker that consumes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{ConnectOptions, Event, ServerAddr};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Secret;
use crate::backoff::Backoff;
use crate::config::Reader;
use crate::ops::ReadyFlag;

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

/// Errors of connecting and provisioning.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot read the NATS credentials file: {0}")]
    Credentials(#[source] std::io::Error),
    #[error(
        "cannot connect to NATS (check NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS_FILE and the TLS settings): {0}"
    )]
    Connect(#[source] async_nats::ConnectError),
    #[error("shutdown requested before NATS was reachable")]
    Cancelled,
    #[error("provisioning stream {name} failed: {source}")]
    Stream {
        name: String,
        #[source]
        source: async_nats::error::Error<jetstream::context::CreateStreamErrorKind>,
    },
    #[error("reading stream {name} failed: {source}")]
    GetStream {
        name: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("provisioning consumer {name} on stream {stream} failed: {source}")]
    Consumer {
        stream: String,
        name: String,
        #[source]
        source: async_nats::error::Error<jetstream::stream::ConsumerErrorKind>,
    },
    #[error("provisioning key-value bucket {name} failed: {source}")]
    Bucket {
        name: String,
        #[source]
        source: async_nats::error::Error<jetstream::context::CreateKeyValueErrorKind>,
    },
}

/// Every name under `TARDIS_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    prefix: Option<String>,
}

impl Names {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let prefix = r.string("TARDIS_PREFIX");
        if let Some(p) = &prefix
            && !crate::config::is_valid_prefix(p)
        {
            r.problem(
                "TARDIS_PREFIX",
                format!("{p:?} may only hold letters, digits, '_' or '-' (at most 32)"),
                "for example TARDIS_PREFIX=staging",
            );
            return Self::default();
        }
        Self { prefix }
    }

    /// Names under `prefix` (tests use a random one per test).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: Some(prefix.into()),
        }
    }

    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    fn name(&self, base: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}_{base}"),
            None => base.to_string(),
        }
    }

    fn subject(&self, rest: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.tardis.{rest}"),
            None => format!("tardis.{rest}"),
        }
    }

    pub fn stream(&self, kind: StreamKind) -> String {
        self.name(kind.base_name())
    }

    /// The wildcard subject a stream captures.
    pub fn stream_subjects(&self, kind: StreamKind) -> String {
        self.subject(&format!("{}.>", kind.subject_token()))
    }

    /// `tardis.records.<source>`.
    pub fn records_subject(&self, source: &str) -> String {
        self.subject(&format!("records.{source}"))
    }

    /// `tardis.enriched.<source>`.
    pub fn enriched_subject(&self, source: &str) -> String {
        self.subject(&format!("enriched.{source}"))
    }

    /// `tardis.dlq.<stage>.<source>`.
    pub fn dlq_subject(&self, stage: crate::messages::Stage, source: &str) -> String {
        self.subject(&format!("dlq.{}.{source}", stage.as_str()))
    }

    /// `tardis.runs.<source>`: fetch run reports.
    pub fn runs_subject(&self, source: &str) -> String {
        self.subject(&format!("runs.{source}"))
    }

    pub fn consumer(&self, kind: ConsumerKind) -> String {
        self.name(kind.base_name())
    }

    /// The key-value bucket holding per-source fetch cursors.
    pub fn fetch_state_bucket(&self) -> String {
        self.name("TARDIS_FETCH_STATE")
    }

    /// The key-value bucket holding the fetchers' run leases (entries expire on the server).
    pub fn fetch_lease_bucket(&self) -> String {
        self.name("TARDIS_FETCH_LEASES")
    }
}

/// The streams of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Record chunks from the fetcher: `TARDIS_RECORDS`, `tardis.records.<source>`.
    Records,
    /// Enriched chunks from the enricher: `TARDIS_ENRICHED`, `tardis.enriched.<source>`.
    Enriched,
    /// Dead letters from any stage: `TARDIS_DLQ`, `tardis.dlq.<stage>.<source>`.
    DeadLetters,
    /// Fetch run reports: `TARDIS_RUNS`, `tardis.runs.<source>`.
    Runs,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Records,
        StreamKind::Enriched,
        StreamKind::DeadLetters,
        StreamKind::Runs,
    ];

    fn base_name(self) -> &'static str {
        match self {
            StreamKind::Records => "TARDIS_RECORDS",
            StreamKind::Enriched => "TARDIS_ENRICHED",
            StreamKind::DeadLetters => "TARDIS_DLQ",
            StreamKind::Runs => "TARDIS_RUNS",
        }
    }

    fn subject_token(self) -> &'static str {
        match self {
            StreamKind::Records => "records",
            StreamKind::Enriched => "enriched",
            StreamKind::DeadLetters => "dlq",
            StreamKind::Runs => "runs",
        }
    }
}

/// The durable pull consumers of the pipeline, one per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerKind {
    /// `enricher` on the records stream.
    Enricher,
    /// `writer` on the enriched stream.
    Writer,
    /// `writer-dlq` on the dead-letter stream.
    WriterDlq,
    /// `writer-runs` on the runs stream.
    WriterRuns,
}

impl ConsumerKind {
    fn base_name(self) -> &'static str {
        match self {
            ConsumerKind::Enricher => "enricher",
            ConsumerKind::Writer => "writer",
            ConsumerKind::WriterDlq => "writer-dlq",
            ConsumerKind::WriterRuns => "writer-runs",
        }
    }

    pub fn stream(self) -> StreamKind {
        match self {
            ConsumerKind::Enricher => StreamKind::Records,
            ConsumerKind::Writer => StreamKind::Enriched,
            ConsumerKind::WriterDlq => StreamKind::DeadLetters,
            ConsumerKind::WriterRuns => StreamKind::Runs,
        }
    }
}

/// Stream settings shared by every worker: `TARDIS_STREAM_REPLICAS`, `TARDIS_STREAM_MAX_BYTES`,
/// `TARDIS_DUPLICATE_WINDOW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// 1 locally, 3 on a cluster.
    pub replicas: usize,
    /// Per stream; `-1` is unlimited. A full stream rejects publishes (`discard: new`).
    pub max_bytes: i64,
    /// How long JetStream remembers a `Nats-Msg-Id` (see the module docs).
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_bytes: -1,
            duplicate_window: Self::DEFAULT_DUPLICATE_WINDOW,
        }
    }
}

impl StreamSettings {
    pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 3600);

    pub fn read(r: &mut Reader<'_>) -> Self {
        let replicas = r.positive_u32("TARDIS_STREAM_REPLICAS", 1);
        if replicas > 5 {
            r.problem(
                "TARDIS_STREAM_REPLICAS",
                format!("JetStream allows at most 5 replicas, got {replicas}"),
                "for example TARDIS_STREAM_REPLICAS=3 on a cluster, 1 on a single server",
            );
        }
        let max_bytes = match r.string("TARDIS_STREAM_MAX_BYTES") {
            None => -1,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n > 0 || n == -1 => n,
                _ => {
                    r.problem(
                        "TARDIS_STREAM_MAX_BYTES",
                        format!("must be a positive number of bytes or -1 (unlimited), got {v:?}"),
                        "for example TARDIS_STREAM_MAX_BYTES=10737418240",
                    );
                    -1
                }
            },
        };
        Self {
            replicas: replicas.clamp(1, 5) as usize,
            max_bytes,
            duplicate_window: r.duration("TARDIS_DUPLICATE_WINDOW", Self::DEFAULT_DUPLICATE_WINDOW),
        }
    }
}

/// How a worker wants its consumer: acknowledgement timing and redelivery bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub kind: ConsumerKind,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries before JetStream gives up on a message (the worker dead-letters it first).
    pub max_deliver: i64,
    /// Messages delivered but not yet acknowledged, across all replicas of the worker.
    pub max_ack_pending: i64,
    /// Redelivery delays (the last one repeats); empty means `ack_wait`.
    pub backoff: Vec<Duration>,
}

impl ConsumerSpec {
    /// Conservative defaults; each worker tunes its own.
    pub fn new(kind: ConsumerKind) -> Self {
        Self {
            kind,
            ack_wait: Duration::from_secs(60),
            max_deliver: 10,
            max_ack_pending: 1000,
            backoff: Vec::new(),
        }
    }
}

/// What provisioning did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioned {
    Created,
    Updated,
    Unchanged,
}

/// The streams, consumers and bucket of one pipeline, defined in one place.
#[derive(Debug, Clone)]
pub struct Topology {
    pub names: Names,
    pub settings: StreamSettings,
}

impl Topology {
    pub fn new(names: Names, settings: StreamSettings) -> Self {
        Self { names, settings }
    }

    /// The configuration of one stream.
    pub fn stream_config(&self, kind: StreamKind) -> stream::Config {
        stream::Config {
            name: self.names.stream(kind),
            subjects: vec![self.names.stream_subjects(kind)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            num_replicas: self.settings.replicas,
            max_bytes: self.settings.max_bytes,
            max_messages: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            max_consumers: -1,
            duplicate_window: self.settings.duplicate_window,
            description: Some(format!("Tardis {kind:?} (work queue)")),
            ..Default::default()
        }
    }

    /// The configuration of one durable pull consumer.
    pub fn consumer_config(&self, spec: &ConsumerSpec) -> consumer::pull::Config {
        let name = self.names.consumer(spec.kind);
        consumer::pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name),
            description: Some(format!("Tardis {:?} worker", spec.kind)),
            filter_subject: self.names.stream_subjects(spec.kind.stream()),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_wait: spec.ack_wait,
            max_deliver: spec.max_deliver,
            max_ack_pending: spec.max_ack_pending,
            backoff: spec.backoff.clone(),
            num_replicas: 0, // inherit from the stream
            ..Default::default()
        }
    }

    /// The configuration of the fetch-state bucket (cursors and run leases).
    pub fn fetch_state_config(&self) -> kv::Config {
        kv::Config {
            bucket: self.names.fetch_state_bucket(),
            description: "Tardis per-source fetch cursors and run leases".to_string(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: self.settings.replicas,
            ..Default::default()
        }
    }

    /// Creates or updates `streams`, then `consumers`, then (if asked) the fetch-state bucket.
    /// Running it again with the same settings changes nothing.
    #[tracing::instrument(name = "provision", skip_all, fields(prefix = self.names.prefix().unwrap_or("")))]
    pub async fn provision(
        &self,
        js: &jetstream::Context,
        streams: &[StreamKind],
        consumers: &[ConsumerSpec],
        fetch_state: bool,
    ) -> Result<HashMap<String, Provisioned>, NatsError> {
        let mut report = HashMap::new();
        let mut wanted: Vec<StreamKind> = streams.to_vec();
        for c in consumers {
            if !wanted.contains(&c.kind.stream()) {
                wanted.push(c.kind.stream());
            }
        }
        for kind in wanted {
            let config = self.stream_config(kind);
            let name = config.name.clone();
            let before = js
                .get_stream(&name)
                .await
                .ok()
                .map(|s| s.cached_info().config.clone());
            let info =
                js.create_or_update_stream(config)
                    .await
                    .map_err(|source| NatsError::Stream {
                        name: name.clone(),
                        source,
                    })?;
            let outcome = match before {
                None => Provisioned::Created,
                Some(b) if b == info.config => Provisioned::Unchanged,
                Some(_) => Provisioned::Updated,
            };
            log_outcome("stream", &name, outcome);
            report.insert(name, outcome);
        }
        for spec in consumers {
            let stream_name = self.names.stream(spec.kind.stream());
            let name = self.names.consumer(spec.kind);
            let stream =
                js.get_stream(&stream_name)
                    .await
                    .map_err(|source| NatsError::GetStream {
                        name: stream_name.clone(),
                        source,
                    })?;
            let before = stream
                .get_consumer::<consumer::pull::Config>(&name)
                .await
                .ok()
                .map(|c| c.cached_info().config.clone());
            let mut consumer = stream
                .create_consumer(self.consumer_config(spec))
                .await
                .map_err(|source| NatsError::Consumer {
                    stream: stream_name.clone(),
                    name: name.clone(),
                    source,
                })?;
            let after = consumer.info().await.ok().map(|i| i.config.clone());
            let outcome = match (before, after) {
                (None, _) => Provisioned::Created,
                (Some(b), Some(a)) if b == a => Provisioned::Unchanged,
                _ => Provisioned::Updated,
            };
            log_outcome("consumer", &name, outcome);
            report.insert(name, outcome);
        }
        if fetch_state {
            let config = self.fetch_state_config();
            let name = config.bucket.clone();
            let before = js
                .get_stream(format!("KV_{name}"))
                .await
                .ok()
                .map(|s| s.cached_info().config.clone());
            let store = js
                .create_or_update_key_value(config)
                .await
                .map_err(|source| NatsError::Bucket {
                    name: name.clone(),
                    source,
                })?;
            let after = js
                .get_stream(format!("KV_{name}"))
                .await
                .ok()
                .map(|s| s.cached_info().config.clone());
            drop(store);
            let outcome = match (before, after) {
                (None, _) => Provisioned::Created,
                (Some(b), Some(a)) if b == a => Provisioned::Unchanged,
                _ => Provisioned::Updated,
            };
            log_outcome("bucket", &name, outcome);
            report.insert(name, outcome);
        }
        Ok(report)
    }
}

fn log_outcome(what: &str, name: &str, outcome: Provisioned) {
    match outcome {
        Provisioned::Created => info!(kind = what, name, "created"),
        Provisioned::Updated => info!(kind = what, name, "configuration updated"),
        Provisioned::Unchanged => tracing::debug!(kind = what, name, "up to date"),
    }
}

/// A shared handle to JetStream for a worker.
pub type JetStream = Arc<jetstream::Context>;

/// Why a publish failed for good.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to {subject} failed after {attempts} attempts: {error}")]
    Failed {
        subject: String,
        attempts: u32,
        error: String,
    },
    #[error("publishing to {subject} interrupted by shutdown")]
    Cancelled { subject: String },
    /// Permanent: the message is larger than the server accepts; retrying cannot help.
    #[error(
        "a message of {bytes} bytes for {subject} is larger than the NATS max payload of {max} bytes"
    )]
    TooLarge {
        subject: String,
        bytes: usize,
        max: usize,
    },
}

/// Publishes `payload` to `subject` with a `Nats-Msg-Id` and the current trace context, and
/// waits for JetStream's acknowledgement — the message is durable when this returns `Ok`.
///
/// Transient failures (no ack in time, no stream reachable, stream full) are retried with
/// backoff for up to `patience`; retrying is safe because the `Nats-Msg-Id` makes a second
/// copy a duplicate that JetStream drops. A message larger than the server's max payload is
/// [`PublishError::TooLarge`] at once: no retry can help.
pub async fn publish_durably(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: bytes::Bytes,
    patience: Duration,
    shutdown: &CancellationToken,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + patience;
    let mut attempt = 0u32;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        crate::telemetry::inject_current(&mut headers);
        let result = async {
            let too_large = |text: &str| {
                text.contains("max payload") || text.contains("message size exceeds maximum")
            };
            let sent = js
                .publish_with_headers(subject.to_string(), headers, payload.clone())
                .await
                .map_err(|e| {
                    let text = e.to_string();
                    (
                        e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                            || too_large(&text),
                        text,
                    )
                })?;
            sent.await.map_err(|e| {
                let text = e.to_string();
                (
                    e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                        || too_large(&text),
                    text,
                )
            })
        };
        let result = tokio::select! {
            r = result => r,
            () = shutdown.cancelled() => return Err(PublishError::Cancelled { subject: subject.to_string() }),
        };
        attempt += 1;
        match result {
            Ok(ack) => return Ok(ack),
            Err((true, _)) => {
                return Err(PublishError::TooLarge {
                    subject: subject.to_string(),
                    bytes: payload.len(),
                    max: js.client().server_info().max_payload,
                });
            }
            Err((false, error)) => {
                let delay = backoff.delay(attempt);
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(PublishError::Failed {
                        subject: subject.to_string(),
                        attempts: attempt,
                        error,
                    });
                }
                warn!(subject, %error, attempt, "publish failed, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Err(PublishError::Cancelled { subject: subject.to_string() }),
                }
            }
        }
    }
}
