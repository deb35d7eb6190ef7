//! The enricher: pulls record chunks (durable consumer `enricher`, shared by all replicas),
//! enriches their records with an OpenAI-compatible LLM and publishes enriched chunks and dead
//! letters, acking each chunk only after its outputs are durable.
//!
//! * [`config`]: endpoint, limits, schema, prompt;
//! * [`protocol`], [`schema`]: the wire protocol and validation, pure;
//! * [`llm`]: the HTTP client with client-side limits and failure classes;
//! * [`enrich`]: one batch — retries, splitting, dead letters;
//! * [`batching`]: batches across chunks by count, token budget and linger, pure;
//! * [`outcome`]: a chunk's outcome as messages (enriched and dead records, parts), pure;
//! * [`pipeline`]: pulling, heartbeats, publishing each chunk's outcome, acking.
#![forbid(unsafe_code)]

pub mod batching;
pub mod config;
pub mod enrich;
pub mod llm;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod protocol;
pub mod schema;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::faults::Faults;
use tardis_common::nats::{ConsumerKind, ConsumerSpec, StreamKind, Topology};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;

pub const COMPONENT: &str = "enricher";

/// The consumer this worker owns. The ack wait covers one LLM request; heartbeats extend it
/// while a chunk is in flight, so it bounds how long a crashed replica's chunks wait.
pub fn consumer_spec(config: &Config) -> ConsumerSpec {
    ConsumerSpec {
        ack_wait: config.llm.timeout * 2,
        // Never given up on by JetStream: a message past MaxDeliver would stay in the
        // work-queue stream undelivered and out of every pending count. Hand-backs on
        // shutdown must not use up anything; ENRICH_MAX_DELIVER, when set, is enforced by the
        // enricher, which dead-letters the chunk's records instead.
        max_deliver: -1,
        max_ack_pending: i64::from(config.enrich.max_in_flight) * 8,
        // Redeliveries (a replica died, a publish failed) back off: 1, 2, 4, 8 ack waits.
        backoff: (0..4u32)
            .map(|k| config.llm.timeout * 2 * 2u32.pow(k))
            .collect(),
        ..ConsumerSpec::new(ConsumerKind::Enricher)
    }
}

/// Runs the enricher until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    run_with(config, shutdown, Arc::new(Faults::none())).await
}

/// [`run`] with faults injected (tests).
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    faults: Arc<Faults>,
) -> anyhow::Result<ExitCode> {
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let metrics = metrics::EnrichMetrics::register(&ops.registry).context("registering metrics")?;
    let nats_ready = ops.readiness.flag("nats");
    let llm_ready = ops.readiness.flag("llm");
    let Some(client) = tardis_common::app::connect_nats(
        &config.common.nats,
        "tardis-enricher",
        nats_ready,
        &shutdown,
    )
    .await?
    else {
        ops.stop().await;
        return Ok(ExitCode::SUCCESS);
    };
    let js = async_nats::jetstream::new(client.clone());
    let topology = Topology::new(config.common.names.clone(), config.common.streams.clone());
    let spec = consumer_spec(&config);
    topology
        .provision(
            &js,
            &[
                StreamKind::Records,
                StreamKind::Enriched,
                StreamKind::DeadLetters,
            ],
            std::slice::from_ref(&spec),
            false,
        )
        .await
        .context("provisioning JetStream")?;
    let names = config.common.names.clone();
    let consumer = js
        .get_stream(names.stream(StreamKind::Records))
        .await
        .context("opening the records stream")?
        .get_consumer(&names.consumer(ConsumerKind::Enricher))
        .await
        .map_err(|e| anyhow::anyhow!("opening the enricher consumer: {e}"))?;
    let system_prompt =
        protocol::system_prompt(config.enrich.prompt.as_deref(), &config.enrich.schema);
    let prompt_version = protocol::prompt_version(&system_prompt, &config.enrich.schema);
    let llm = &config.llm;
    let limits = llm::Limits {
        rpm: llm.rpm,
        tpm: llm.tpm,
        concurrency: llm.concurrency,
        max_request_tokens: llm.max_input_tokens
            + llm.max_tokens_per_record * llm.batch_size
            + 2000,
    };
    let llm_client = llm::LlmClient::new(
        llm.endpoint.clone(),
        llm.api_key.clone(),
        llm.model.clone(),
        llm.timeout,
        limits,
        metrics.clone(),
    )
    .context("building the HTTP client")?;
    info!(
        endpoint = %llm_client.endpoint_for_logs(),
        model = %llm.model,
        prompt_version = %prompt_version,
        batch_size = llm.batch_size,
        response_format = llm.response_format.as_str(),
        "enricher ready"
    );
    let health = Arc::new(enrich::LlmHealth::new(llm_ready));
    let processor = Arc::new(enrich::BatchProcessor {
        client: Arc::new(llm_client),
        schema: config.enrich.schema.clone(),
        system_prompt,
        settings: llm.clone(),
        metrics: metrics.clone(),
        health,
        stop: CancellationToken::new(),
    });
    let pipeline = pipeline::Pipeline {
        js,
        client: client.clone(),
        consumer,
        names,
        processor,
        metrics,
        prompt_version,
        batch_size: llm.batch_size as usize,
        max_input_tokens: llm.max_input_tokens,
        linger: config.enrich.linger,
        max_in_flight: config.enrich.max_in_flight as usize,
        ack_wait: spec.ack_wait,
        consumer_name: config.common.names.consumer(ConsumerKind::Enricher),
        faults,
        shutdown_grace: config.enrich.shutdown_grace,
        max_deliver: config.enrich.max_deliver,
        paused_until: std::sync::Mutex::new(None),
    };
    pipeline.run(shutdown).await?;
    match tokio::time::timeout(Duration::from_secs(5), client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "draining the NATS connection failed"),
        Err(_) => tracing::warn!("draining the NATS connection timed out"),
    }
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}
