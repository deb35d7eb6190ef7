//! The writer: pulls enriched chunks, dead letters and fetch runs and persists them in Postgres
//! with the per-source checkpoint, in one transaction, idempotently.
//!
//! This crate holds the process around the work — configuration, NATS, provisioning of its
//! streams and consumers, the Postgres pool and its readiness, ops endpoints, shutdown. The
//! persistence itself is not built yet.
#![forbid(unsafe_code)]

pub mod config;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::nats::{ConsumerKind, ConsumerSpec, NatsError, StreamKind, Topology};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;

pub const COMPONENT: &str = "writer";

/// The consumers this worker owns.
pub fn consumer_specs() -> Vec<ConsumerSpec> {
    [
        ConsumerKind::Writer,
        ConsumerKind::WriterDlq,
        ConsumerKind::WriterRuns,
    ]
    .into_iter()
    .map(ConsumerSpec::new)
    .collect()
}

/// Runs the writer until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let nats_ready = ops.readiness.flag("nats");
    let pg_ready = ops.readiness.flag("postgres");
    let pool = config
        .postgres
        .pool()
        .context("building the Postgres pool")?;
    let watcher = tokio::spawn(tardis_common::postgres::watch_reachability(
        pool.clone(),
        pg_ready,
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    let client = match config
        .common
        .nats
        .connect("tardis-writer", Some(nats_ready), &shutdown)
        .await
    {
        Ok(c) => c,
        Err(NatsError::Cancelled) => {
            watcher.await.context("postgres watcher")?;
            ops.stop().await;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).context("connecting to NATS"),
    };
    let js = async_nats::jetstream::new(client.clone());
    let topology = Topology::new(config.common.names.clone(), config.common.streams.clone());
    topology
        .provision(
            &js,
            &[
                StreamKind::Enriched,
                StreamKind::DeadLetters,
                StreamKind::Runs,
            ],
            &consumer_specs(),
            false,
        )
        .await
        .context("provisioning JetStream")?;
    info!(
        postgres = %config.postgres.display_target(),
        "writer ready; persistence is not implemented in this build"
    );
    shutdown.cancelled().await;
    watcher.await.context("postgres watcher")?;
    client
        .drain()
        .await
        .context("draining the NATS connection")?;
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}
