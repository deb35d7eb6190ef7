//! The fetcher: per configured source, pulls what is new since its cursor, page by page, and
//! streams record chunks into JetStream (`tardis.records.<source>`) as it goes.
//!
//! * [`config`]: command line and environment;
//! * [`collect`]: one run of one source (lease, cursor, pages, chunks, report);
//! * [`http`]: authentication, retries, rate limit, bounded bodies; [`redact`]: credentials
//!   out of URLs and bodies;
//! * the pure pieces: [`pagination`] (with [`link`], the RFC 8288 parser), [`extract`],
//!   [`cursor`], [`advance`] (when the cursor may move), [`chunker`];
//! * [`state`]: cursor and lease in KV buckets; [`report`]: the run report;
//! * [`daemon`]: the schedule loop.
//!
//! Modes: `run` (one pass, the CronJob), `daemon` (cron schedules), `backfill` (a window,
//! cursor untouched). Exit code of `run`/`backfill`: 0 when every selected source succeeded
//! or was skipped (another fetcher held its lease), 1 when any failed or was interrupted,
//! 3 when none failed but one stopped at `max_pages` (`incomplete`: the run could not prove
//! it read everything, so a CronJob's Job fails and alerts).
#![forbid(unsafe_code)]

pub mod admin;
pub mod advance;
pub mod checkpoint;
pub mod chunker;
pub mod collect;
pub mod config;
pub mod content;
pub mod cursor;
pub mod daemon;
pub mod extract;
pub mod http;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod page;
pub mod pagination;
pub mod plan;
pub mod progress;
pub mod publish;
pub mod redact;
pub mod report;
pub mod sources;
pub mod state;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tardis_common::app::Ops;
use tardis_common::messages::RunOutcome;
use tardis_common::nats::{StreamKind, Topology};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{Command, Config};

use crate::collect::{Collector, Mode, RunReport};
use crate::http::{Sleeper, TokioSleeper};

/// The exit code of a pass in which no source failed but one stopped at `max_pages`.
pub const EXIT_INCOMPLETE: u8 = 3;

/// The component name in logs, metrics and the NATS client name.
pub const COMPONENT: &str = "fetcher";

/// Runs the configured command until it is done or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    run_with(config, shutdown, Arc::new(TokioSleeper)).await
}

/// [`run`] with the retry waits delegated to `sleeper` (tests record them).
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    sleeper: Arc<dyn Sleeper>,
) -> anyhow::Result<ExitCode> {
    let ops = Ops::start(COMPONENT, &config.common.ops).await?;
    let metrics = metrics::FetchMetrics::register(&ops.registry).context("registering metrics")?;
    let nats_ready = ops.readiness.flag("nats");
    let Some(client) = tardis_common::app::connect_nats(
        &config.common.nats,
        "tardis-fetcher",
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
    topology
        .provision(
            &js,
            &[
                StreamKind::Records,
                StreamKind::Runs,
                StreamKind::DeadLetters,
            ],
            &[],
            true,
        )
        .await
        .context("provisioning JetStream")?;
    let store = js
        .get_key_value(config.common.names.fetch_state_bucket())
        .await
        .context("opening the fetch-state bucket")?;
    let lease_bucket = state::lease_bucket_config(
        config.common.names.fetch_lease_bucket(),
        config.lease_ttl,
        config.common.streams.replicas,
    );
    let leases = tardis_common::nats::retrying("bucket", &lease_bucket.bucket.clone(), || {
        js.create_or_update_key_value(lease_bucket.clone())
    })
    .await
    .context("creating the fetch-lease bucket")?;
    let checkpoints = match &config.postgres {
        Some(pg) => Some(checkpoint::Checkpoints::new(
            pg.pool().context("building the Postgres pool")?,
        )),
        None => None,
    };
    let collector = Collector {
        js,
        names: config.common.names.clone(),
        state: state::FetchState::new(store, leases, config.lease_ttl),
        metrics,
        max_payload: client.server_info().max_payload,
        holder: holder_id(),
        sleeper,
        checkpoints,
    };
    let chunk_size = config.sources.chunk_size;
    let code = match config.command.clone() {
        Command::Run { sources } => {
            let selected: Vec<_> = config
                .sources
                .sources
                .iter()
                .filter(|s| sources.is_empty() || sources.contains(&s.name))
                .cloned()
                .collect();
            let mut runs = JoinSet::new();
            for source in selected {
                let collector = collector.clone();
                let shutdown = shutdown.clone();
                runs.spawn(async move {
                    collector
                        .run_source(Arc::new(source), chunk_size, Mode::Incremental, &shutdown)
                        .await
                });
            }
            let mut reports = Vec::new();
            while let Some(r) = runs.join_next().await {
                reports.push(r.context("a source run panicked")?);
            }
            reports.sort_by(|a, b| a.source.cmp(&b.source));
            exit_code(&reports)
        }
        Command::Backfill {
            source,
            since,
            until,
        } => {
            let source = config
                .sources
                .source(&source)
                .cloned()
                .context("unknown source")?;
            let report = collector
                .run_source(
                    Arc::new(source),
                    chunk_size,
                    Mode::Backfill { since, until },
                    &shutdown,
                )
                .await;
            exit_code(&[report])
        }
        Command::Daemon { run_at_start } => {
            daemon::run(&collector, &config.sources, run_at_start, &shutdown).await;
            ExitCode::SUCCESS
        }
        Command::Cursor(_) => anyhow::bail!("`fetcher cursor` is a day-2 command, not a run"),
    };
    client.flush().await.context("flushing NATS")?;
    client
        .drain()
        .await
        .context("draining the NATS connection")?;
    ops.stop().await;
    Ok(code)
}

/// Prints one line per source on stderr and turns the outcomes into an exit code.
fn exit_code(reports: &[RunReport]) -> ExitCode {
    for r in reports {
        eprintln!("{}", r.summary());
    }
    let failed = reports
        .iter()
        .filter(|r| matches!(r.outcome, RunOutcome::Failed | RunOutcome::Interrupted))
        .count();
    let incomplete = reports
        .iter()
        .filter(|r| r.outcome == RunOutcome::Incomplete)
        .count();
    info!(
        sources = reports.len(),
        failed, incomplete, "fetch pass finished"
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else if incomplete > 0 {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    }
}

/// `hostname:pid`, to tell lease holders apart.
fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}
