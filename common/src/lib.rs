//! Shared runtime of the Tardis workers.
//!
//! Everything the fetcher, the enricher and the writer agree on lives here, and only here:
//!
//! * [`config`] — typed settings read from an [`config::Env`] (never from `std::env`
//!   directly), validated before any network call, every problem reported at once;
//! * [`messages`] — the only types that cross NATS, versioned by `schema_version`;
//! * [`nats`] — connection with retry, and the one definition of every stream, consumer
//!   and bucket name ([`nats::Names`]) and their provisioning ([`nats::Topology`]);
//! * [`postgres`] — the deadpool pool;
//! * [`telemetry`] — JSON logs, OpenTelemetry traces, W3C trace context in NATS headers;
//! * [`ops`] — `/health`, `/ready`, `/metrics`;
//! * [`shutdown`] — signals to a cancellation token, draining in-flight work;
//! * [`backoff`] — exponential backoff with full jitter and `Retry-After`.
#![forbid(unsafe_code)]

pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod error;
pub mod faults;
pub mod messages;
pub mod metrics;
pub mod nats;
pub mod ops;
pub mod postgres;
pub mod probe;
pub mod secret;
pub mod shutdown;
pub mod telemetry;

pub use secret::Secret;

/// Installs the process-wide rustls crypto provider (ring), once.
///
/// Every TLS client of the workers (NATS, Postgres, HTTP) uses rustls with ring; reqwest is
/// built without a provider of its own, so this must run before the first TLS handshake.
/// Calling it more than once is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::trace!("rustls crypto provider already installed");
    }
}
