//! The writer: pulls enriched chunks (`writer`), dead letters (`writer-dlq`) and fetch runs
//! (`writer-runs`) and persists them in Postgres — records and the per-source checkpoint in
//! one transaction, idempotently — acking only after the commit.
//!
//! Delivery contract:
//! * Acked when: after `COMMIT` of the batch's transaction (records, dead records and the
//!   checkpoint advance together); a failed transaction naks the batch.
//! * Idempotent: upserts keyed by `(source, record_id)` that only a newer version changes; a
//!   replay of a committed batch writes nothing.
//! * Unit of atomicity: one batch of up to `WRITER_BATCH_MESSAGES` messages and
//!   `WRITER_BATCH_BYTES` bytes; `WRITER_CONCURRENCY` batches are written at once, each in its
//!   own transaction.
//! * While a batch is written its messages get `+WPI` every third of `WRITER_ACK_WAIT`, so a
//!   slow commit is never redelivered; a crashed writer's messages go to another after the ack
//!   wait (15 s), and a redelivered message is logged with its delivery number.
//!
//! * [`migrate`]: embedded, versioned migrations (`writer migrate`), the schema check;
//! * [`records`]: the records' SQL (binary `COPY` into a staging table and one merge per
//!   batch, newest version wins, or a `COPY` straight into `records` after a batch whose keys
//!   were all new; monotonic checkpoint), with the money columns' binary `numeric` in
//!   `numeric`; [`store`]: the rest of the SQL (dead letters, runs, checkpoints' order);
//! * [`consume`]: the batch loops (pull, write, ack or hand back), with the batch's
//!   transaction in `write`, the SQLSTATE classes in `failure` (pure), the `+WPI` heartbeat in
//!   `heartbeat`, and what cannot be written (newer, unreadable, refused) in `refuse`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod consume;
mod failure;
mod heartbeat;
pub mod metrics;
pub mod migrate;
mod numeric;
pub mod records;
mod refuse;
pub mod roles;
pub mod store;
mod write;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::faults::Faults;
use tardis_common::nats::{ConsumerKind, ConsumerSpec, StreamKind, Topology};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info};

pub use config::{Command, Config};

pub const COMPONENT: &str = "writer";

/// The consumers this worker owns. Deliveries are unlimited on the JetStream side: a
/// Postgres outage must never exhaust them; the writer itself dead-letters a message that
/// Postgres keeps rejecting (`WRITER_MAX_DELIVER`).
pub fn consumer_specs(config: &Config) -> Vec<ConsumerSpec> {
    [
        ConsumerKind::Writer,
        ConsumerKind::WriterDlq,
        ConsumerKind::WriterRuns,
    ]
    .into_iter()
    .map(|kind| ConsumerSpec {
        max_deliver: -1,
        ack_wait: config.ack_wait,
        max_ack_pending: 2000,
        ..ConsumerSpec::new(kind)
    })
    .collect()
}

/// A pooled connection, retried with backoff until Postgres answers or `shutdown` fires.
async fn connect_with_retry(
    pool: &deadpool_postgres::Pool,
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<deadpool_postgres::Object> {
    let backoff =
        tardis_common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempt = 0;
    loop {
        match pool.get().await {
            Ok(c) => return Ok(c),
            Err(e) => {
                let delay = backoff.delay(attempt);
                attempt += 1;
                tracing::warn!(error = %tardis_common::error::chain(&e), postgres = %config.postgres.display_target(), attempt, "postgres unreachable, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => anyhow::bail!("shutdown requested before Postgres was reachable"),
                }
            }
        }
    }
}

/// Runs the writer (or its migrations) until done or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    run_with(config, shutdown, std::sync::Arc::new(Faults::none())).await
}

/// [`run`] with faults injected (tests).
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    faults: std::sync::Arc<Faults>,
) -> anyhow::Result<ExitCode> {
    let span = tracing::info_span!("writer", ordinal = config.ordinal);
    run_inner(config, shutdown, faults).instrument(span).await
}

async fn run_inner(
    config: Config,
    shutdown: CancellationToken,
    faults: std::sync::Arc<Faults>,
) -> anyhow::Result<ExitCode> {
    let pool = config
        .postgres
        .pool()
        .context("building the Postgres pool")?;
    if config.command == Command::Migrate {
        let mut client = connect_with_retry(&pool, &config, &shutdown).await?;
        let (applied, roles) = migrate::migrate_with_roles(
            &mut client,
            config
                .roles
                .create
                .then_some(config.roles.passwords.as_slice()),
        )
        .await?;
        if applied.is_empty() {
            println!("schema up to date (version {})", migrate::latest());
        }
        for (version, name) in applied {
            println!("applied migration {version} ({name})");
        }
        for line in roles {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let metrics = metrics::WriterMetrics::register(&ops.registry).context("registering metrics")?;
    metrics
        .info
        .with_label_values(&[&config.ordinal.to_string()])
        .set(1);
    metrics.precreate(&[
        consume::Kind::Records.label(),
        consume::Kind::DeadLetters.label(),
        consume::Kind::Runs.label(),
    ]);
    let nats_ready = ops.readiness.flag("nats");
    let pg_ready = ops.readiness.flag("postgres");

    let Some(client) = tardis_common::app::connect_nats(
        &config.common.nats,
        "tardis-writer",
        nats_ready,
        &shutdown,
    )
    .await?
    else {
        ops.stop().await;
        return Ok(ExitCode::SUCCESS);
    };
    tardis_common::nats::presence::announce(
        async_nats::jetstream::new(client.clone()),
        &config.common.names,
        config.common.streams.replicas,
        COMPONENT,
        shutdown.clone(),
    );
    // The work left in every stage, from as soon as NATS answers (Postgres may still be
    // down): the writer always runs, so a scaler always has the series.
    let lag = tokio::spawn(
        tardis_common::nats::lag::export(
            async_nats::jetstream::new(client.clone()),
            config.common.names.clone(),
            tardis_common::nats::lag::LagMetrics::register(&ops.registry)
                .context("registering metrics")?,
            Duration::from_secs(5),
            shutdown.clone(),
        )
        .in_current_span(),
    );
    // The schema must be the one this build knows; wait for Postgres if it is not up yet.
    let copy_allowed: bool;
    match connect_with_retry(&pool, &config, &shutdown).await {
        Ok(client) => {
            match migrate::check(&client).await? {
                migrate::SchemaStatus::Current => {}
                migrate::SchemaStatus::AheadAdditive { found, unknown } => tracing::warn!(
                    found,
                    known = migrate::latest(),
                    newer = %unknown.join(", "),
                    "the schema is newer than this writer, by additive migrations only: running (upgrade the writer when you can)"
                ),
            }
            // Records are staged in a temporary table (`records`): without the privilege every
            // batch would fail, so say so now.
            let temp: bool = client
                .query_one(
                    "SELECT has_database_privilege(current_database(), 'TEMPORARY')",
                    &[],
                )
                .await
                .context("checking the TEMPORARY privilege")?
                .get(0);
            if !temp {
                anyhow::bail!(
                    "the writer's database user may not create temporary tables, which the writer stages records in: \
                     GRANT TEMPORARY ON DATABASE <db> TO <user> (`writer migrate` with TARDIS_DB_ROLES=true grants it to tardis_writer)"
                );
            }
            copy_allowed = store::copy_fits(&client)
                .await
                .context("reading the types of records' columns")?;
            if !copy_allowed {
                tracing::warn!(
                    "records' columns are not of the types this writer sends with COPY: every batch is merged (correct, slower); upgrade the writer"
                );
            }
        }
        Err(_) if shutdown.is_cancelled() => {
            ops.stop().await;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    }
    let watcher = tokio::spawn(tardis_common::postgres::watch_reachability(
        pool.clone(),
        pg_ready.clone(),
        Duration::from_secs(2),
        shutdown.clone(),
    ));
    let checkpoints = tokio::spawn(
        export_checkpoints(
            pool.clone(),
            metrics.clone(),
            Duration::from_secs(30),
            shutdown.clone(),
        )
        .in_current_span(),
    );
    let js = async_nats::jetstream::new(client.clone());
    let names = config.common.names.clone();
    let topology = Topology::new(names.clone(), config.common.streams.clone());
    topology
        .provision(
            &js,
            &[
                StreamKind::Enriched,
                StreamKind::DeadLetters,
                StreamKind::Runs,
            ],
            &consumer_specs(&config),
            false,
        )
        .await
        .context("provisioning JetStream")?;
    info!(postgres = %config.postgres.display_target(), ordinal = config.ordinal, "writer ready");
    let mut loops = JoinSet::new();
    for (kind, consumer_kind, copies) in [
        (
            consume::Kind::Records,
            ConsumerKind::Writer,
            config.concurrency,
        ),
        (consume::Kind::DeadLetters, ConsumerKind::WriterDlq, 1),
        (consume::Kind::Runs, ConsumerKind::WriterRuns, 1),
    ] {
        let consumer = js
            .get_stream(names.stream(consumer_kind.stream()))
            .await
            .context("opening a stream")?
            .get_consumer(&names.consumer(consumer_kind))
            .await
            .map_err(|e| {
                anyhow::anyhow!("opening consumer {}: {e}", names.consumer(consumer_kind))
            })?;
        for _ in 0..copies {
            let l = consume::Loop {
                kind,
                consumer: consumer.clone(),
                pool: pool.clone(),
                js: js.clone(),
                names: names.clone(),
                metrics: metrics.clone(),
                batch_messages: config.batch_messages,
                batch_bytes: config.batch_bytes,
                batch_wait: config.batch_wait,
                max_deliver: config.max_deliver,
                ack_wait: config.ack_wait,
                pg_ready: pg_ready.clone(),
                crash_after_commit: config.crash_after_commit,
                faults: faults.clone(),
                copy_allowed,
                copy_next: Default::default(),
            };
            loops.spawn(l.run(shutdown.clone()).in_current_span());
        }
    }
    while let Some(r) = loops.join_next().await {
        r.context("a writer loop panicked")?;
    }
    watcher.await.context("postgres watcher")?;
    checkpoints.await.context("the checkpoint exporter")?;
    lag.await.context("the lag exporter")?;
    match tokio::time::timeout(Duration::from_secs(5), client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "draining the NATS connection failed"),
        Err(_) => tracing::warn!("draining the NATS connection timed out"),
    }
    ops.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Exports every source's written checkpoint from Postgres now and every `interval`, so that
/// `tardis_writer_checkpoint_written_timestamp_seconds` and `..._checkpoint_timestamp_seconds`
/// exist from the start and keep their values (and `time() - it` grows) while nothing is
/// written; a failed read keeps the last values.
async fn export_checkpoints(
    pool: deadpool_postgres::Pool,
    metrics: metrics::WriterMetrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let read = match pool.get().await {
            Ok(client) => store::checkpoint_times(&client)
                .await
                .map_err(|e| tardis_common::error::chain(&e)),
            Err(e) => Err(tardis_common::error::chain(&e)),
        };
        match read {
            Ok(times) => {
                for (source, written, newest) in times {
                    let gauges = [
                        (
                            metrics.checkpoint_written.with_label_values(&[&source]),
                            Some(written),
                        ),
                        (
                            metrics.checkpoint_timestamp.with_label_values(&[&source]),
                            newest,
                        ),
                    ];
                    for (gauge, at) in gauges {
                        if let Some(at) = at.filter(|at| *at > gauge.get()) {
                            gauge.set(at);
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "reading the checkpoints failed; retried"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
