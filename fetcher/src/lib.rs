//! The fetcher: per configured source, pulls what is new since its cursor and streams record
//! chunks into JetStream (`tardis.records.<source>`).
//!
//! This crate holds the process around the work — configuration, NATS, provisioning of the
//! records and runs streams and the fetch-state bucket, ops endpoints, shutdown. The
//! collection itself (pagination, auth, cursor, run lease) is not built yet.
#![forbid(unsafe_code)]

pub mod config;

use std::process::ExitCode;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::nats::{NatsError, StreamKind, Topology};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;

/// The component name in logs, metrics and the NATS client name.
pub const COMPONENT: &str = "fetcher";

/// Runs the fetcher until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let nats_ready = ops.readiness.flag("nats");
    let client = match config
        .common
        .nats
        .connect("tardis-fetcher", Some(nats_ready), &shutdown)
        .await
    {
        Ok(c) => c,
        Err(NatsError::Cancelled) => {
            ops.stop().await;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).context("connecting to NATS"),
    };
    let js = async_nats::jetstream::new(client.clone());
    let topology = Topology::new(config.common.names.clone(), config.common.streams.clone());
    topology
        .provision(&js, &[StreamKind::Records, StreamKind::Runs], &[], true)
        .await
        .context("provisioning JetStream")?;
    info!(
        sources = config.sources.sources.len(),
        "fetcher ready; collection is not implemented in this build"
    );
    shutdown.cancelled().await;
    client
        .drain()
        .await
        .context("draining the NATS connection")?;
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}
