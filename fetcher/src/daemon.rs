//! Daemon mode (optionally one run of every source at start, then): each source runs on its own schedule (cron with time zone, or every
//! `COLLECTION_INTERVAL`), one run at a time per source. A run that overruns its next slot
//! makes that slot be skipped, not queued. SIGTERM interrupts runs between pages; their
//! progress is kept.

use std::sync::Arc;

use crate::sources::SourcesConfig;
use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::collect::{Collector, Mode};

pub async fn run(
    collector: &Collector,
    sources: &SourcesConfig,
    run_at_start: bool,
    shutdown: &CancellationToken,
) {
    let mut loops = JoinSet::new();
    for source in &sources.sources {
        let source = Arc::new(source.clone());
        let collector = collector.clone();
        let shutdown = shutdown.clone();
        let chunk_size = sources.chunk_size;
        loops.spawn(async move {
            if run_at_start {
                run_once(&collector, &source, chunk_size, &shutdown).await;
            }
            loop {
                let now = Utc::now();
                let Some(next) = source.schedule.next_after(now) else {
                    warn!(source = %source.name, "the schedule never fires again; stopping this source");
                    return;
                };
                info!(source = %source.name, next = %next.to_rfc3339(), "next run scheduled");
                let wait = (next - now).to_std().unwrap_or_default();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
                run_once(&collector, &source, chunk_size, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
            }
        });
    }
    while let Some(r) = loops.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "a source loop panicked");
        }
    }
}

/// One run in a task of its own, so that even a bug that panics a run leaves the source's
/// schedule running.
async fn run_once(
    collector: &Collector,
    source: &Arc<crate::sources::SourceConfig>,
    chunk_size: u32,
    shutdown: &CancellationToken,
) {
    let run = tokio::spawn({
        let collector = collector.clone();
        let source = source.clone();
        let shutdown = shutdown.clone();
        async move {
            collector
                .run_source(source, chunk_size, Mode::Incremental, &shutdown)
                .await
        }
    });
    match run.await {
        Ok(report) => eprintln!("{}", report.summary()),
        Err(e) => {
            tracing::error!(source = %source.name, error = %e, "a fetch run panicked; the next one runs on schedule")
        }
    }
}
