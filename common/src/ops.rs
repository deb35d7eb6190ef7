//! The ops HTTP server: `/health` (liveness), `/ready` (readiness), `/metrics` (Prometheus).
//!
//! Readiness is a set of latches ([`ReadyFlag`]), one per dependency or condition a component
//! registers ("nats", "postgres", ...). `/ready` answers 200 only when every latch is set and
//! lists the ones that are not otherwise; each latch is also exported as
//! `tardis_ready{check="..."}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Reader;

/// `OPS_ADDR`, default `0.0.0.0:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsSettings {
    pub addr: SocketAddr,
}

impl OpsSettings {
    pub const DEFAULT_ADDR: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

    pub fn read(r: &mut Reader<'_>) -> Self {
        Self {
            addr: r.socket_addr("OPS_ADDR", Self::DEFAULT_ADDR),
        }
    }
}

/// The readiness latches of a component.
#[derive(Clone)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Arc<AtomicBool>>>>,
    gauge: IntGaugeVec,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("not_ready", &self.not_ready())
            .finish()
    }
}

impl Readiness {
    /// Creates the latches and registers `tardis_ready` in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "tardis_ready",
                "1 when a readiness check passes, 0 when it does not",
            ),
            &["check"],
        )?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(Self {
            checks: Arc::new(Mutex::new(BTreeMap::new())),
            gauge,
        })
    }

    /// A new latch named `check`, initially not ready.
    pub fn flag(&self, check: &str) -> ReadyFlag {
        let state = Arc::new(AtomicBool::new(false));
        self.lock().insert(check.to_string(), state.clone());
        let gauge = self.gauge.with_label_values(&[check]);
        gauge.set(0);
        ReadyFlag { state, gauge }
    }

    /// The checks that are not ready, in name order.
    pub fn not_ready(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, v)| !v.load(Ordering::SeqCst))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<AtomicBool>>> {
        // A poisoned lock only means a panic elsewhere while inserting; the map is still valid.
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One readiness latch.
#[derive(Clone, Debug)]
pub struct ReadyFlag {
    state: Arc<AtomicBool>,
    gauge: prometheus::IntGauge,
}

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.state.store(ready, Ordering::SeqCst);
        self.gauge.set(i64::from(ready));
    }

    pub fn get(&self) -> bool {
        self.state.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    readiness: Readiness,
}

/// The ops server, bound and ready to serve.
#[derive(Debug)]
pub struct OpsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl OpsServer {
    /// Binds `addr` (port 0 picks a free port; see [`OpsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` fires, in a background task.
    pub fn spawn(
        self,
        registry: Registry,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let app = router(registry, readiness);
        let addr = self.local_addr;
        tokio::spawn(async move {
            info!(%addr, "ops server listening");
            if let Err(error) = axum::serve(self.listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
            {
                error!(%error, "ops server failed");
            }
        })
    }
}

fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            registry,
            readiness,
        })
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    let not_ready = state.readiness.not_ready();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", not_ready.join(", ")),
        )
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            format!("cannot encode metrics: {e}\n").into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_latch() {
        let registry = Registry::new();
        let readiness = Readiness::new(&registry).unwrap();
        let nats = readiness.flag("nats");
        let pg = readiness.flag("postgres");
        assert_eq!(readiness.not_ready(), vec!["nats", "postgres"]);
        nats.set(true);
        assert_eq!(readiness.not_ready(), vec!["postgres"]);
        pg.set(true);
        assert!(readiness.is_ready());
        nats.set(false);
        assert!(!readiness.is_ready());
        let text = String::from_utf8({
            let mut b = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut b)
                .unwrap();
            b
        })
        .unwrap();
        assert!(text.contains("tardis_ready{check=\"nats\"} 0"), "{text}");
        assert!(
            text.contains("tardis_ready{check=\"postgres\"} 1"),
            "{text}"
        );
    }
}
