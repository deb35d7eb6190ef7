//! One run of one source: lease, cursor, pages, chunks, publishes, report.
//!
//! The delivery contract: a chunk is published with a content-derived `Nats-Msg-Id` and the
//! fetch cursor is saved only after JetStream acknowledged it, by compare-and-set on the
//! revision this run last wrote (the run fenced the cursor when it took the lease, so a
//! fetcher that lost its lease can never move it). A crash between the publish and the save
//! makes the next run publish the same chunk again, which JetStream drops as a duplicate; a
//! crash before the publish loses nothing because the cursor had not moved. How far the
//! cursor may move is [`crate::advance`]'s decision: with each chunk for a sorted source, only
//! after the last page for an unsorted one. Memory holds one page.
//!
//! A run never reports `succeeded` unless it read every page: reaching `max_pages` is
//! `incomplete`; a page, `Link` header or pagination value it cannot read fails the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::sources::SourceConfig;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use tardis_common::messages::{Cursor, RunOutcome, SourceRecord};
use tardis_common::nats::Names;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::advance::{Advance, Observed};
use crate::cursor;
use crate::extract;
use crate::http::{FetchError, Sleeper, SourceClient};
use crate::lease::keep_lease;
use crate::metrics::FetchMetrics;
use crate::pagination::{End, PageInfo, Pager, Step};
use crate::plan::incremental_params;
use crate::plan::max_pages_note;
pub use crate::report::RunReport;
use crate::state::{Acquired, CursorState, FetchState, HeldCursor, lease_key};

/// How long a publish may keep failing (NATS restarting, stream full) before the run fails.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(120);

/// What a run fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// From the source's cursor onwards; moves the cursor.
    Incremental,
    /// A historical window; never touches the cursor.
    Backfill {
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    },
}

/// Everything a run needs besides its source.
#[derive(Debug, Clone)]
pub struct Collector {
    pub js: jetstream::Context,
    pub names: Names,
    pub state: FetchState,
    pub metrics: FetchMetrics,
    /// The server's maximum message size.
    pub max_payload: usize,
    /// Identifies this process in leases.
    pub holder: String,
    pub sleeper: Arc<dyn Sleeper>,
    /// Where to read the written checkpoint (fallback cursor, in-flight gauge).
    pub checkpoints: Option<crate::checkpoint::Checkpoints>,
}

/// How a run's page loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walked {
    /// The source said there was nothing more.
    AllPages,
    /// Past the end of a backfill window.
    WindowEnd,
    /// `max_pages` pages read and the source has more.
    MaxPages,
}

pub(crate) struct Progress {
    pub(crate) records: u64,
    pages: u64,
    pub(crate) chunks: u64,
    bytes: u64,
    pub(crate) cursor: Option<Cursor>,
    pub(crate) published_total: u64,
    /// The cursor as this run holds it (incremental runs).
    held: Option<HeldCursor>,
    warnings: Vec<String>,
    /// A backfill's progress line or log.
    backfill: Option<crate::progress::BackfillProgress>,
    /// Whether this run looks up the stored enrichments of what it fetches.
    pub(crate) lookups: crate::publish::Lookups,
}

fn new_run_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:08x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::random::<u32>()
    )
}

impl Collector {
    /// Runs `source` once. Never panics on bad input: every problem ends in the report.
    pub async fn run_source(
        &self,
        source: Arc<SourceConfig>,
        chunk_size: u32,
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> RunReport {
        let started_at = Utc::now();
        let run_id = new_run_id(started_at);
        let span = tracing::info_span!("fetch_run", source = %source.name, run_id = %run_id);
        self.run_inner(source, chunk_size, mode, run_id, started_at, shutdown)
            .instrument(span)
            .await
    }

    async fn run_inner(
        &self,
        source: Arc<SourceConfig>,
        chunk_size: u32,
        mode: Mode,
        run_id: String,
        started_at: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> RunReport {
        let name = source.name.clone();
        let mut report = RunReport::new(name.clone(), run_id.clone(), started_at);
        let backfill = matches!(mode, Mode::Backfill { .. });
        let key = lease_key(&name, backfill);
        let held = match self.state.acquire(&key, &self.holder, &run_id).await {
            Ok(Acquired::Yes(held)) => held,
            Ok(Acquired::No(lease)) => {
                report.outcome = RunOutcome::Skipped;
                report.error = Some(format!(
                    "another fetcher ({}, run {}) holds the lease",
                    lease.holder, lease.run_id
                ));
                return self.finish(report, shutdown).await;
            }
            Err(e) => {
                report.outcome = RunOutcome::Failed;
                report.error = Some(e.to_string());
                return self.finish(report, shutdown).await;
            }
        };
        // The run stops if the lease is lost (another fetcher took it after we stalled).
        let run_token = shutdown.child_token();
        // Whatever ends this run, even a panic, stops the lease keeper: a lease must never
        // outlive its run.
        let _stop_keeper = run_token.clone().drop_guard();
        let lease_lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn(keep_lease(
            self.state.clone(),
            held,
            run_token.clone(),
            lease_lost.clone(),
        ));
        let result = self
            .collect(&source, chunk_size, &mode, &run_id, &mut report, &run_token)
            .await;
        run_token.cancel();
        let held = match renewer.await {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(error = %e, "lease renewal task failed");
                None
            }
        };
        let lost = lease_lost.load(Ordering::SeqCst);
        match result {
            Ok(Walked::AllPages | Walked::WindowEnd) => {}
            Ok(Walked::MaxPages) => {
                report.outcome = RunOutcome::Incomplete;
                report.error = Some(max_pages_note(&source, &mode, report.out_of_order > 0));
            }
            Err(FetchError::Cancelled { .. }) if lost => {
                report.outcome = RunOutcome::Failed;
                report.error = Some("the run lease was lost (not renewed within FETCH_LEASE_TTL, or taken by another fetcher); the cursor did not move past what was published".into());
            }
            Err(FetchError::Cancelled { .. }) => {
                report.outcome = RunOutcome::Interrupted;
                report.error = Some("interrupted by shutdown".into());
            }
            Err(e) => {
                report.outcome = RunOutcome::Failed;
                report.error = Some(e.to_string());
            }
        }
        if let Some(held) = held
            && !lost
            && let Err(error) = self.state.release(&held).await
        {
            warn!(%error, "releasing the lease failed; it expires by itself");
        }
        self.finish(report, shutdown).await
    }

    fn state_error(source: &SourceConfig, error: crate::state::StateError) -> FetchError {
        FetchError::State {
            source_name: source.name.clone(),
            error,
        }
    }

    /// Saves the cursor (incremental runs), if this run still holds it.
    pub(crate) async fn save(
        &self,
        source: &SourceConfig,
        progress: &mut Progress,
    ) -> Result<(), FetchError> {
        let Some(held) = progress.held.as_mut() else {
            return Ok(());
        };
        let state = CursorState {
            cursor: progress.cursor.clone(),
            published_total: progress.published_total,
            updated_at: Utc::now(),
            reset: false,
        };
        self.state
            .save_cursor(held, &state)
            .await
            .map_err(|e| Self::state_error(source, e))
    }

    /// Reads pages and publishes chunks until the source has nothing more.
    async fn collect(
        &self,
        source: &SourceConfig,
        chunk_size: u32,
        mode: &Mode,
        run_id: &str,
        report: &mut RunReport,
        token: &CancellationToken,
    ) -> Result<Walked, FetchError> {
        let client = SourceClient::new(
            Arc::new(source.clone()),
            self.metrics.clone(),
            self.sleeper.clone(),
        )
        .map_err(|e| FetchError::Transport {
            source_name: source.name.clone(),
            url: source.url.to_string(),
            error: format!("cannot build the HTTP client: {e}"),
        })?;
        let incremental = matches!(mode, Mode::Incremental);
        let (saved, held) = if incremental {
            let (saved, held) = self
                .state
                .fence_cursor(&source.name)
                .await
                .map_err(|e| Self::state_error(source, e))?;
            (saved, Some(held))
        } else {
            (None, None)
        };
        let reset = saved.as_ref().is_some_and(|s| s.reset);
        let start_cursor = match saved.as_ref().and_then(|s| s.cursor.clone()) {
            Some(c) => Some(c),
            // `fetcher cursor reset`: from the initial lookback, not the written checkpoint.
            None if reset => None,
            None if incremental => self.checkpoint_cursor(&source.name).await?,
            None => None,
        };
        let lookups = self.lookups(&source.name).await;
        let mut progress =
            Progress {
                records: 0,
                pages: 0,
                chunks: 0,
                bytes: 0,
                cursor: start_cursor.clone(),
                published_total: saved.as_ref().map_or(0, |s| s.published_total),
                held,
                warnings: Vec::new(),
                lookups,
                backfill: match mode {
                    Mode::Backfill { since, until } => Some(
                        crate::progress::BackfillProgress::new(&source.name, *since, *until),
                    ),
                    Mode::Incremental => None,
                },
            };
        let mut advance = Advance::new(
            source.order,
            start_cursor.clone(),
            source.updated_at_pointer.clone(),
        );
        let result = self
            .walk(
                &client,
                source,
                chunk_size,
                mode,
                run_id,
                &mut advance,
                &mut progress,
                token,
            )
            .await;
        let out_of_order = advance.out_of_order();
        if out_of_order > 0 {
            self.metrics
                .out_of_order
                .with_label_values(&[&source.name])
                .inc_by(out_of_order);
        }
        report.records = progress.records;
        report.pages = progress.pages;
        report.chunks = progress.chunks;
        report.bytes = progress.bytes;
        report.cursor_after = progress.cursor.clone();
        report.warnings = std::mem::take(&mut progress.warnings);
        report.out_of_order = out_of_order;
        if let Some(cp) = &self.checkpoints {
            cp.update_in_flight(&source.name, progress.published_total, &self.metrics)
                .await;
        }
        result
    }

    /// The page loop of [`Self::collect`].
    #[allow(clippy::too_many_arguments)]
    async fn walk(
        &self,
        client: &SourceClient,
        source: &SourceConfig,
        chunk_size: u32,
        mode: &Mode,
        run_id: &str,
        advance: &mut Advance,
        progress: &mut Progress,
        token: &CancellationToken,
    ) -> Result<Walked, FetchError> {
        let incremental = matches!(mode, Mode::Incremental);
        let (params, start_token) = incremental_params(source, mode, advance.start(), Utc::now());
        let mut pager = Pager::new(
            source.pagination.clone(),
            source.url.clone(),
            params,
            source.page_size.max(1),
            start_token,
        );
        let mut url = pager.first();
        loop {
            if progress.pages >= u64::from(source.max_pages) {
                return Ok(Walked::MaxPages);
            }
            let mut page = client.get(&url, token).await?;
            progress.pages += 1;
            progress.bytes += page.bytes as u64;
            self.metrics.pages.with_label_values(&[&source.name]).inc();
            self.metrics
                .bytes
                .with_label_values(&[&source.name])
                .inc_by(page.bytes as u64);
            let records = extract::records(
                page.records.take(),
                &source.records_pointer,
                &source.id_pointer,
                source.updated_at_pointer.as_deref(),
            )
            .map_err(|e| FetchError::BadPage {
                source_name: source.name.clone(),
                url: client.redact(&url),
                problem: e.to_string(),
            })?;
            let on_page = records.len();
            if incremental
                && source.updated_at_pointer.is_some()
                && advance.observe(&records) == Observed::FirstDisorder
            {
                self.on_first_disorder(source, advance, progress).await?;
            }
            let token_for_page = pager.current_token().map(str::to_string);
            // Past the window's end: only a sorted source says so with one page.
            let beyond_window = match mode {
                Mode::Backfill { until: Some(u), .. } => {
                    source.order == crate::sources::Order::Sorted
                        && source.updated_at_pointer.is_some()
                        && on_page > 0
                        && records
                            .iter()
                            .all(|r| r.updated_at.is_some_and(|t| t >= *u))
                }
                _ => false,
            };
            let wanted: Vec<SourceRecord> = records
                .into_iter()
                .filter(|r| match mode {
                    Mode::Incremental => cursor::is_after(r, advance.start()),
                    Mode::Backfill { since, until } => r
                        .updated_at
                        .is_none_or(|t| t >= *since && until.is_none_or(|u| t < u)),
                })
                .collect();
            let newest = wanted.iter().filter_map(|r| r.updated_at).max();
            let step = pager.next(&PageInfo {
                url: &url,
                body: &page.envelope,
                link: page.link.as_deref(),
                records: on_page,
            });
            drop(page);
            // The run's last page carries an unsorted source's cursor for the whole run; only
            // when the source said it was the last page: a full page with no way on proves
            // nothing.
            let final_cursor =
                (incremental && advance.unsorted() && matches!(step, Ok(Step::End(End::LastPage))))
                    .then(|| advance.at_end(progress.cursor.clone()));
            self.publish_page(
                source,
                chunk_size,
                mode,
                run_id,
                wanted,
                token_for_page,
                advance,
                final_cursor.clone(),
                progress,
                token,
            )
            .await?;
            if let Some(backfill) = progress.backfill.as_mut() {
                backfill.page(progress.pages, progress.records, newest);
            }
            if let Some(end) = final_cursor
                && progress.cursor != end
            {
                progress.cursor = end;
                self.save(source, progress).await?;
            }
            if beyond_window {
                return Ok(Walked::WindowEnd);
            }
            match step {
                Ok(Step::Next(next)) => url = next,
                Ok(Step::End(End::LastPage)) => return Ok(Walked::AllPages),
                Ok(Step::End(End::FullPageWithoutNext)) => {
                    let note = format!(
                        "page full and no next page: is the pagination configured? ({} records with page_size {} and no way to a next page from {})",
                        on_page,
                        source.page_size,
                        client.redact(&url)
                    );
                    warn!(source = %source.name, "{note}");
                    progress.warnings.push(note);
                    return Ok(Walked::AllPages);
                }
                Err(e) => {
                    return Err(FetchError::BadPage {
                        source_name: source.name.clone(),
                        url: client.redact(e.url().unwrap_or(&url)),
                        problem: e.to_string(),
                    });
                }
            }
        }
    }

    /// The run's first out-of-order record: from now on the source is handled as unsorted,
    /// and the cursor goes back to where the run started.
    async fn on_first_disorder(
        &self,
        source: &SourceConfig,
        advance: &Advance,
        progress: &mut Progress,
    ) -> Result<(), FetchError> {
        let note = format!(
            "records are not in (updated_at, id) order: the cursor moves only when a run reads every page (set \"order\": \"unsorted\" to say so from the first record{})",
            if progress.cursor.as_ref() == advance.start() {
                ""
            } else {
                "; it went back to where this run started"
            }
        );
        warn!(source = %source.name, "{note}");
        progress.warnings.push(note);
        if progress.cursor.as_ref() != advance.start() {
            progress.cursor = advance.start().cloned();
            self.save(source, progress).await?;
        }
        Ok(())
    }

    /// The written checkpoint in Postgres, when the fetch state has no cursor.
    async fn checkpoint_cursor(&self, source: &str) -> Result<Option<Cursor>, FetchError> {
        let Some(checkpoints) = self.checkpoints.as_ref() else {
            return Ok(None);
        };
        let cursor = checkpoints
            .cursor(source)
            .await
            .map_err(|error| FetchError::Checkpoint {
                source_name: source.to_string(),
                error,
            })?;
        if let Some(cursor) = &cursor {
            info!(
                ?cursor,
                "no fetch state; starting from the written checkpoint in Postgres"
            );
        }
        Ok(cursor)
    }
}
