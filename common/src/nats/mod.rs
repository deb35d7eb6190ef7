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

use async_nats::jetstream::{self};

pub mod lag;
mod names;
pub mod presence;
mod publish;
mod settings;
mod topology;

pub use names::*;
pub use publish::*;
pub use settings::*;
pub use topology::*;

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
