//! The enricher: pulls record chunks (durable consumer `enricher`, shared by all replicas),
//! enriches their records with an OpenAI-compatible LLM and publishes enriched chunks and dead
//! letters, acking each chunk only after its outputs are durable.
//!
//! * [`config`]: endpoint, limits, schema, prompt;
//! * [`protocol`], [`schema`]: the wire protocol and validation, pure;
//! * [`llm`]: the HTTP client, its concurrency and failure classes;
//! * [`budget`]: the fleet's shared LLM rate limits (requests and tokens a minute), pure;
//! * [`fleet`]: that budget kept in NATS KV, shared by every replica;
//! * [`enrich`]: one batch — retries, splitting, dead letters;
//! * [`batching`]: batches across chunks by count, token budget and linger, pure;
//! * [`outcome`]: a chunk's outcome as messages (enriched and dead records, parts), pure;
//! * [`pipeline`]: pulling, heartbeats, publishing each chunk's outcome, acking.
#![forbid(unsafe_code)]

pub mod batching;
pub mod budget;
pub mod config;
pub mod enrich;
mod finalize;
pub mod fleet;
mod fleet_pending;
mod fleet_store;
mod health;
pub mod llm;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod protocol;
pub mod result_reader;
pub mod schema;
pub mod spend;

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

/// The consumer this worker owns. Heartbeats (`+WPI` every third of the ack wait) keep a
/// chunk that is being worked on, however slow the LLM; so the ack wait only bounds how long
/// a crashed replica's chunks wait before another replica gets them.
pub fn consumer_spec(config: &Config) -> ConsumerSpec {
    let ack_wait = config.enrich.ack_wait;
    ConsumerSpec {
        ack_wait,
        // Never given up on by JetStream: a message past MaxDeliver would stay in the
        // work-queue stream undelivered and out of every pending count. Hand-backs on
        // shutdown must not use up anything; ENRICH_MAX_DELIVER, when set, is enforced by the
        // enricher, which dead-letters the chunk's records instead.
        max_deliver: -1,
        // Every replica the autoscaler may start must be able to hold its ENRICH_MAX_IN_FLIGHT
        // chunks: the consumer's cap is for the whole fleet.
        max_ack_pending: i64::from(config.enrich.max_in_flight)
            * i64::from(config.enrich.max_replicas),
        // Redeliveries (a replica died, a publish failed) back off: 1, 2, 4, 8 ack waits.
        backoff: (0..4u32).map(|k| ack_wait * 2u32.pow(k)).collect(),
        ..ConsumerSpec::new(ConsumerKind::Enricher)
    }
}

/// Creates or updates what the enricher needs in JetStream — the streams, its consumer, the
/// budget bucket — and exits: `enricher provision`, the bootstrap step of a deployment.
pub async fn provision(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let Some(client) = config
        .common
        .nats
        .connect("tardis-enricher-provision", None, &shutdown)
        .await
        .map(Some)
        .or_else(|e| match e {
            tardis_common::nats::NatsError::Cancelled => Ok(None),
            e => Err(e),
        })
        .context("connecting to NATS")?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let js = async_nats::jetstream::new(client.clone());
    provision_jetstream(&config, &js).await?;
    println!(
        "provisioned: streams, consumer {} (max_ack_pending {}), bucket {}",
        config.common.names.consumer(ConsumerKind::Enricher),
        consumer_spec(&config).max_ack_pending,
        config.common.names.llm_budget_bucket()
    );
    if let Err(e) = client.drain().await {
        tracing::debug!(error = %e, "draining the NATS connection failed");
    }
    Ok(ExitCode::SUCCESS)
}

async fn provision_jetstream(
    config: &Config,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let topology = Topology::new(config.common.names.clone(), config.common.streams.clone());
    topology
        .provision(
            js,
            &[
                StreamKind::Records,
                StreamKind::Enriched,
                StreamKind::DeadLetters,
            ],
            &[consumer_spec(config)],
            false,
        )
        .await
        .context("provisioning JetStream")?;
    let bucket = budget_bucket_config(config);
    let name = bucket.bucket.clone();
    tardis_common::nats::retrying("bucket", &name, || {
        js.create_or_update_key_value(bucket.clone())
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the LLM budget bucket: {e}"))
}

fn budget_bucket_config(config: &Config) -> async_nats::jetstream::kv::Config {
    fleet::bucket_config(
        config.common.names.llm_budget_bucket(),
        config.common.streams.replicas,
    )
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
    metrics.precreate(&config.llm.model);
    if let Some(usd) = config.llm.daily_budget_usd {
        metrics::EnrichMetrics::register_daily_budget(&ops.registry, usd)
            .context("registering metrics")?;
    }
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
    tardis_common::nats::presence::announce(
        js.clone(),
        &config.common.names,
        config.common.streams.replicas,
        COMPONENT,
        shutdown.clone(),
    );
    let spec = consumer_spec(&config);
    let bucket = provision_jetstream(&config, &js).await?;
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
    let budget = Arc::new(fleet::Budget::new(
        Arc::new(fleet::KvStore::new(
            bucket.clone(),
            fleet::budget_key(
                &llm.model,
                &llm::endpoint_without_credentials(&llm.endpoint),
            ),
            js.clone(),
            budget_bucket_config(&config),
        )),
        budget::Ceiling {
            rpm: llm.rpm.map(f64::from),
            tpm: llm.tpm.map(f64::from),
            counts_max_tokens: llm.tpm_counts_max_tokens,
        },
        fleet::Clock::System,
        Some(metrics.clone()),
    ));
    let spend = Arc::new(spend::DailySpend::new(
        Box::new(spend::KvSpend {
            store: bucket.clone(),
        }),
        llm.daily_budget_usd,
        Some(metrics.spend_today.clone()),
    ));
    // The spend is saved once a second, not per answer, and once more after the pipeline
    // stopped (before the NATS connection is drained).
    let saver_stop = CancellationToken::new();
    let saver = tokio::spawn({
        let (spend, stop) = (spend.clone(), saver_stop.clone());
        async move { spend.run_saver(stop).await }
    });
    let llm_client = llm::LlmClient::new(
        llm.endpoint.clone(),
        llm.api_key.clone(),
        llm.model.clone(),
        llm.timeout,
        llm.concurrency,
        budget,
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
    let health =
        Arc::new(enrich::LlmHealth::new(llm_ready).with_halted_gauge(metrics.halted.clone()));
    let processor = Arc::new(enrich::BatchProcessor {
        client: Arc::new(llm_client),
        schema: config.enrich.schema.clone(),
        system_prompt,
        settings: llm.clone(),
        metrics: metrics.clone(),
        health,
        stop: CancellationToken::new(),
        spend: Some(spend.clone()),
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
        max_held_records: (llm.batch_size as usize)
            .saturating_mul(llm.concurrency as usize)
            .saturating_mul(2)
            .max(1),
        ack_wait: spec.ack_wait,
        consumer_name: config.common.names.consumer(ConsumerKind::Enricher),
        faults,
        shutdown_grace: config.enrich.shutdown_grace,
        max_deliver: config.enrich.max_deliver,
        paused_until: std::sync::Mutex::new(None),
        spend,
    };
    let ran = pipeline.run(shutdown).await;
    saver_stop.cancel();
    if saver.await.is_err() {
        tracing::warn!("saving the daily spend failed");
    }
    ran?;
    match tokio::time::timeout(Duration::from_secs(5), client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "draining the NATS connection failed"),
        Err(_) => tracing::warn!("draining the NATS connection timed out"),
    }
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}
