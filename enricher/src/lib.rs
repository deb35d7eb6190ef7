//! The enricher: pulls record chunks (durable consumer `enricher`), enriches the records with
//! an OpenAI-compatible LLM and publishes enriched chunks and dead letters.
//!
//! This crate holds the process around the work — configuration, NATS, provisioning of its
//! streams and consumer, ops endpoints, shutdown. The enrichment itself is not built yet.
#![forbid(unsafe_code)]

pub mod config;

use std::process::ExitCode;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::nats::{ConsumerKind, ConsumerSpec, NatsError, StreamKind, Topology};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;

pub const COMPONENT: &str = "enricher";

/// The consumer this worker owns. The ack wait covers one LLM request with its retries.
pub fn consumer_spec(config: &Config) -> ConsumerSpec {
    ConsumerSpec {
        ack_wait: config.llm.timeout * 2,
        ..ConsumerSpec::new(ConsumerKind::Enricher)
    }
}

/// Runs the enricher until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let nats_ready = ops.readiness.flag("nats");
    let client = match config
        .common
        .nats
        .connect("tardis-enricher", Some(nats_ready), &shutdown)
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
        .provision(
            &js,
            &[
                StreamKind::Records,
                StreamKind::Enriched,
                StreamKind::DeadLetters,
            ],
            &[consumer_spec(&config)],
            false,
        )
        .await
        .context("provisioning JetStream")?;
    info!(
        endpoint = %config.llm.endpoint,
        model = %config.llm.model,
        "enricher ready; enrichment is not implemented in this build"
    );
    shutdown.cancelled().await;
    client
        .drain()
        .await
        .context("draining the NATS connection")?;
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}
