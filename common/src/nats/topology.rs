//! Provisioning: stream and consumer settings, created or updated idempotently.
//!
//! Every JetStream API call of provisioning is retried ([`retrying`]) while it times out or
//! the cluster answers that it is not ready (a meta leader election, a cluster forming, peers
//! still joining) — with backoff, for up to [`PROVISION_DEADLINE`]. Workers of a fresh install
//! and the replicas of a Deployment start at the same moment; on a 3-node cluster their
//! concurrent requests time out while the cluster settles, and a worker must not exit on the
//! first timeout. A configuration the server refuses fails at once.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, consumer, kv, stream};
use tracing::{info, warn};

use crate::config::Reader;

use super::{ConsumerKind, Names, NatsError, StreamKind};

/// How long provisioning keeps retrying timeouts and a cluster that is not ready.
pub const PROVISION_DEADLINE: Duration = Duration::from_secs(120);

/// A JetStream API error that may go away if the call is repeated.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

/// Cluster states that pass: no leader yet, peers joining, an asset offline during a move.
fn cluster_settling(code: ErrorCode) -> bool {
    [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_NOT_ASSIGNED,
        ErrorCode::CLUSTER_INCOMPLETE,
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::CLUSTER_SERVER_MEMBER_CHANGE_INFLIGHT,
        ErrorCode::PEER_REMAP,
        ErrorCode::STREAM_OFFLINE,
        ErrorCode::CONSUMER_OFFLINE,
    ]
    .contains(&code)
}

impl Transient for async_nats::error::Error<jetstream::context::CreateStreamErrorKind> {
    fn is_transient(&self) -> bool {
        use jetstream::context::CreateStreamErrorKind as K;
        match self.kind() {
            K::TimedOut | K::JetStreamUnavailable | K::Response => true,
            K::JetStream(e) => cluster_settling(e.error_code()),
            _ => false,
        }
    }
}

impl Transient for async_nats::error::Error<jetstream::context::GetStreamErrorKind> {
    fn is_transient(&self) -> bool {
        use jetstream::context::GetStreamErrorKind as K;
        match self.kind() {
            K::Request => true,
            K::JetStream(e) => cluster_settling(e.error_code()),
            _ => false,
        }
    }
}

impl Transient for async_nats::error::Error<stream::ConsumerErrorKind> {
    fn is_transient(&self) -> bool {
        use stream::ConsumerErrorKind as K;
        match self.kind() {
            K::TimedOut | K::Request => true,
            K::JetStream(e) => cluster_settling(e.error_code()),
            _ => false,
        }
    }
}

impl Transient for async_nats::error::Error<jetstream::context::CreateKeyValueErrorKind> {
    fn is_transient(&self) -> bool {
        use jetstream::context::CreateKeyValueErrorKind as K;
        // The kind does not carry the server's code: a bucket's stream that could not be
        // created is retried within the deadline, like a timeout.
        matches!(self.kind(), K::TimedOut | K::JetStream | K::BucketCreate)
    }
}

/// Runs `op` until it succeeds, fails for good, or [`PROVISION_DEADLINE`] has passed since
/// the first try; waits with backoff between tries.
pub async fn retrying<T, E, F, Fut>(what: &str, name: &str, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let backoff = crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && started.elapsed() < PROVISION_DEADLINE => {
                let delay = backoff.delay(attempt);
                attempt += 1;
                warn!(kind = what, name, error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "provisioning timed out or the cluster is not ready; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
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
            let info = retrying("stream", &name, || {
                js.create_or_update_stream(config.clone())
            })
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
            let stream = retrying("stream", &stream_name, || js.get_stream(&stream_name))
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
            let mut consumer = retrying("consumer", &name, || {
                stream.create_consumer(self.consumer_config(spec))
            })
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
            let store = retrying("bucket", &name, || {
                js.create_or_update_key_value(config.clone())
            })
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
