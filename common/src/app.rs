//! What every worker binary does around its own work: load the configuration (exit 64 with
//! every problem on stderr when it is bad), start telemetry, run on a Tokio runtime until
//! SIGTERM/SIGINT, flush telemetry, exit.
//!
//! Also the start of every `run`: the ops server with its registry and readiness latches.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{ConfigError, Env, ProcessEnv};
use crate::ops::{OpsServer, OpsSettings, Readiness};
use crate::telemetry::TelemetrySettings;

/// A worker's configuration knows its telemetry settings.
pub trait ComponentConfig {
    fn telemetry(&self) -> &TelemetrySettings;
}

/// The body of a worker's `main`.
///
/// `load` reads the configuration from the process environment; `run` is the worker's
/// `run(config, shutdown)`, whose `Ok` value is the exit code.
pub fn main<C, F, Fut>(
    component: &'static str,
    load: impl FnOnce(&dyn Env) -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    C: ComponentConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let config = match load(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{component}: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    let guard = match crate::telemetry::init(config.telemetry()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{component}: cannot start telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{component}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = crate::shutdown::on_signals().context("installing signal handlers")?;
        info!(component, version = env!("CARGO_PKG_VERSION"), "starting");
        run(config, shutdown).await
    });
    let code = match result {
        Ok(code) => {
            info!(component, "stopped");
            code
        }
        Err(e) => {
            error!(component, error = format!("{e:#}"), "failed");
            eprintln!("{component}: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    drop(guard);
    code
}

/// The ops server of a running worker, its registry and readiness latches.
#[derive(Debug)]
pub struct Ops {
    pub registry: Registry,
    pub readiness: Readiness,
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Ops {
    /// Binds `OPS_ADDR` and serves `/health`, `/ready`, `/metrics` with the common metrics
    /// registered, until [`Ops::stop`].
    pub async fn start(component: &str, settings: &OpsSettings) -> anyhow::Result<Self> {
        let registry = Registry::new();
        crate::metrics::register_common(&registry, component).context("registering metrics")?;
        let readiness = Readiness::new(&registry).context("registering readiness metrics")?;
        let server = OpsServer::bind(settings.addr)
            .await
            .with_context(|| format!("binding the ops server to OPS_ADDR={}", settings.addr))?;
        let addr = server.local_addr();
        let stop = CancellationToken::new();
        let handle = server.spawn(registry.clone(), readiness.clone(), stop.clone());
        Ok(Self {
            registry,
            readiness,
            addr,
            stop,
            handle,
        })
    }

    /// Stops serving (after the worker has drained its work, so `/metrics` stays scrapeable
    /// until the end).
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            error!(error = %e, "ops server task failed");
        }
    }
}

/// Connects to NATS with the worker's readiness latch; `None` when shutdown came first.
pub async fn connect_nats(
    settings: &crate::nats::NatsSettings,
    client_name: &str,
    ready: crate::ops::ReadyFlag,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<async_nats::Client>> {
    match settings.connect(client_name, Some(ready), shutdown).await {
        Ok(c) => Ok(Some(c)),
        Err(crate::nats::NatsError::Cancelled) => Ok(None),
        Err(e) => Err(e).context("connecting to NATS"),
    }
}
