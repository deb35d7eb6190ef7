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

use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;
use tardis_common::config::{Pagination, SourceConfig};
use tardis_common::messages::{
    self, Cursor, DeadLetter, RecordChunk, RunOutcome, SCHEMA_VERSION, SourceRecord, Stage,
};
use tardis_common::nats::{Names, publish_durably};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::advance::{Advance, Observed};
use crate::chunker;
use crate::cursor;
use crate::extract;
use crate::http::{FetchError, Sleeper, SourceClient};
use crate::metrics::FetchMetrics;
use crate::pagination::{End, PageInfo, Pager, Step};
pub use crate::report::RunReport;
use crate::state::{
    Acquired, CursorState, FetchState, HeldCursor, HeldLease, lease_key, retry_renewal,
};

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

struct Progress {
    records: u64,
    pages: u64,
    chunks: u64,
    bytes: u64,
    cursor: Option<Cursor>,
    published_total: u64,
    /// The cursor as this run holds it (incremental runs).
    held: Option<HeldCursor>,
    warnings: Vec<String>,
}

fn new_run_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:08x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::random::<u32>()
    )
}

/// Keeps the lease alive until `run_token` fires; on loss, sets `lost` and cancels the run.
/// A renewal that fails for a reason other than loss (a NATS blip) is retried until the TTL
/// since the last good renewal has nearly passed.
async fn keep_lease(
    state: FetchState,
    mut held: HeldLease,
    run_token: CancellationToken,
    lost: Arc<AtomicBool>,
) -> HeldLease {
    let ttl = state.lease_ttl();
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    let mut wait = every;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = run_token.cancelled() => return held,
        }
        match state.renew(&mut held).await {
            Ok(()) => {
                last_ok = tokio::time::Instant::now();
                wait = every;
            }
            Err(error) if error.is_lost() => {
                warn!(%error, "lease lost, stopping the run");
                lost.store(true, Ordering::SeqCst);
                run_token.cancel();
                return held;
            }
            Err(error) => match retry_renewal(ttl, last_ok.elapsed()) {
                Some(retry) => {
                    warn!(%error, retry_in_ms = retry.as_millis() as u64, "renewing the lease failed; retrying");
                    wait = retry;
                }
                None => {
                    warn!(%error, "the lease could not be renewed within its lifetime, stopping the run");
                    lost.store(true, Ordering::SeqCst);
                    run_token.cancel();
                    return held;
                }
            },
        }
    }
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
    async fn save(&self, source: &SourceConfig, progress: &mut Progress) -> Result<(), FetchError> {
        let Some(held) = progress.held.as_mut() else {
            return Ok(());
        };
        let state = CursorState {
            cursor: progress.cursor.clone(),
            published_total: progress.published_total,
            updated_at: Utc::now(),
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
        let start_cursor = match saved.as_ref().and_then(|s| s.cursor.clone()) {
            Some(c) => Some(c),
            None if incremental => self.checkpoint_cursor(&source.name).await,
            None => None,
        };
        let mut progress = Progress {
            records: 0,
            pages: 0,
            chunks: 0,
            bytes: 0,
            cursor: start_cursor.clone(),
            published_total: saved.as_ref().map_or(0, |s| s.published_total),
            held,
            warnings: Vec::new(),
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
            let page = client.get(&url, token).await?;
            progress.pages += 1;
            progress.bytes += page.bytes as u64;
            self.metrics.pages.with_label_values(&[&source.name]).inc();
            self.metrics
                .bytes
                .with_label_values(&[&source.name])
                .inc_by(page.bytes as u64);
            let records = extract::records(
                &page.body,
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
            let beyond_window = match mode {
                Mode::Backfill { until: Some(u), .. } => {
                    source.updated_at_pointer.is_some()
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
            let step = pager.next(&PageInfo {
                url: &url,
                body: &page.body,
                link: page.link.as_deref(),
                records: on_page,
            });
            drop(page);
            // The run's last page carries an unsorted source's cursor for the whole run.
            let final_cursor =
                (incremental && advance.unsorted() && matches!(step, Ok(Step::End(_))))
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
    async fn checkpoint_cursor(&self, source: &str) -> Option<Cursor> {
        let cursor = self.checkpoints.as_ref()?.cursor(source).await?;
        info!(
            ?cursor,
            "no fetch state; starting from the written checkpoint in Postgres"
        );
        Some(cursor)
    }

    /// Cuts a page's records into chunks and publishes them, saving the cursor after each.
    /// `final_cursor`, when given, is the cursor of the page's last chunk.
    #[allow(clippy::too_many_arguments)]
    async fn publish_page(
        &self,
        source: &SourceConfig,
        chunk_size: u32,
        mode: &Mode,
        run_id: &str,
        records: Vec<SourceRecord>,
        page_token: Option<String>,
        advance: &Advance,
        final_cursor: Option<Option<Cursor>>,
        progress: &mut Progress,
        token: &CancellationToken,
    ) -> Result<(), FetchError> {
        let (groups, oversized) =
            chunker::split(records, chunk_size.max(1) as usize, self.max_payload);
        for record in oversized {
            self.dead_letter_oversized(source, run_id, record, token)
                .await?;
        }
        let mut queue: std::collections::VecDeque<Vec<SourceRecord>> = groups.into();
        while let Some(group) = queue.pop_front() {
            let cursor_after = match (mode, &final_cursor) {
                (Mode::Backfill { .. }, _) => None,
                (Mode::Incremental, Some(end)) if queue.is_empty() => end.clone(),
                (Mode::Incremental, _) if source.updated_at_pointer.is_some() => {
                    advance.after_chunk(progress.cursor.clone(), &group)
                }
                (Mode::Incremental, _) => page_token
                    .clone()
                    .map(|token| Cursor::Token { token })
                    .or(progress.cursor.clone()),
            };
            let chunk = RecordChunk {
                schema_version: SCHEMA_VERSION,
                source: source.name.clone(),
                chunk_id: messages::chunk_id(&source.name, &group),
                run_id: run_id.to_string(),
                chunk_seq: progress.chunks,
                records: group,
                cursor_after: cursor_after.clone(),
                fetched_at: Utc::now(),
            };
            let bytes = messages::encode(&chunk).map_err(|e| internal(source, e))?;
            if bytes.len() > self.max_payload && chunk.records.len() > 1 {
                // The estimate was short: halve and try again.
                let mut records = chunk.records;
                let second = records.split_off(records.len() / 2);
                queue.push_front(second);
                queue.push_front(records);
                continue;
            }
            let subject = self.names.records_subject(&source.name);
            let ack = publish_durably(
                &self.js,
                &subject,
                &chunk.msg_id(),
                bytes.into(),
                PUBLISH_PATIENCE,
                token,
            )
            .await
            .map_err(|e| publish_error(source, e))?;
            let n = chunk.records.len() as u64;
            progress.chunks += 1;
            if ack.duplicate {
                tracing::debug!(chunk_id = %chunk.chunk_id, "chunk already queued by an earlier run");
            } else {
                progress.records += n;
                progress.published_total += n;
                self.metrics
                    .records
                    .with_label_values(&[&source.name])
                    .inc_by(n);
            }
            self.metrics.chunks.with_label_values(&[&source.name]).inc();
            if matches!(mode, Mode::Incremental) {
                progress.cursor = cursor_after;
                self.save(source, progress).await?;
            }
        }
        Ok(())
    }

    async fn dead_letter_oversized(
        &self,
        source: &SourceConfig,
        run_id: &str,
        record: SourceRecord,
        token: &CancellationToken,
    ) -> Result<(), FetchError> {
        let size = record.payload.get().len();
        let head: String = record.payload.get().chars().take(4096).collect();
        let stub = serde_json::json!({"truncated": true, "original_bytes": size, "head": head});
        let payload = RawValue::from_string(stub.to_string()).map_err(|e| internal(source, e))?;
        let record = SourceRecord {
            id: record.id,
            updated_at: record.updated_at,
            payload,
        };
        let letter = DeadLetter {
            schema_version: SCHEMA_VERSION,
            source: source.name.clone(),
            stage: Stage::Fetch,
            chunk_id: messages::chunk_id(&source.name, std::slice::from_ref(&record)),
            run_id: run_id.to_string(),
            record,
            reason: format!(
                "record is {size} bytes, more than the NATS max payload of {} bytes",
                self.max_payload
            ),
            attempts: 1,
            last_error: None,
            failed_at: Utc::now(),
        };
        warn!(record_id = %letter.record.id, size, "record too large for NATS, dead-lettered");
        let bytes = messages::encode(&letter).map_err(|e| internal(source, e))?;
        let subject = self.names.dlq_subject(Stage::Fetch, &source.name);
        publish_durably(
            &self.js,
            &subject,
            &letter.msg_id(),
            bytes.into(),
            PUBLISH_PATIENCE,
            token,
        )
        .await
        .map_err(|e| publish_error(source, e))?;
        self.metrics
            .oversized
            .with_label_values(&[&source.name])
            .inc();
        Ok(())
    }
}

/// The incremental query parameters and the starting token of a run.
pub fn incremental_params(
    source: &SourceConfig,
    mode: &Mode,
    cursor: Option<&Cursor>,
    now: DateTime<Utc>,
) -> (Vec<(String, String)>, Option<String>) {
    let mut params = Vec::new();
    let fmt = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let mut token = None;
    let mut since_text = None;
    let since = match (mode, cursor) {
        (Mode::Backfill { since, .. }, _) => Some(*since),
        (
            Mode::Incremental,
            Some(Cursor::Position {
                updated_at,
                id,
                since,
            }),
        ) => {
            if let Some(p) = &source.after_id_param {
                params.push((p.clone(), id.clone()));
            }
            // Exactly as the source wrote it: a source comparing strings skips nothing.
            since_text = since.clone();
            Some(*updated_at)
        }
        (Mode::Incremental, Some(Cursor::Token { token: t })) => {
            if matches!(source.pagination, Pagination::Cursor { .. }) {
                token = Some(t.clone());
            }
            None
        }
        (Mode::Incremental, None) => chrono::Duration::from_std(source.initial_lookback)
            .ok()
            .map(|d| now - d),
    };
    if let (Some(p), Some(since)) = (&source.since_param, since) {
        params.insert(0, (p.clone(), since_text.unwrap_or_else(|| fmt(&since))));
    }
    (params, token)
}

/// Why a run stopped at `max_pages`, and what the next run does.
fn max_pages_note(source: &SourceConfig, mode: &Mode, unsorted: bool) -> String {
    let n = source.max_pages;
    match mode {
        Mode::Backfill { .. } => format!(
            "max_pages ({n}) reached before the last page; the window is not complete: run the backfill again from where it stopped, or raise max_pages"
        ),
        Mode::Incremental if unsorted || source.order == tardis_common::config::Order::Unsorted => {
            format!(
                "max_pages ({n}) reached before the last page of an unsorted source: the cursor stays where this run started and the next run reads from there again; raise max_pages so one run can read every page"
            )
        }
        Mode::Incremental => format!(
            "max_pages ({n}) reached before the last page; the next run continues from the cursor"
        ),
    }
}

fn internal(source: &SourceConfig, e: impl std::fmt::Display) -> FetchError {
    FetchError::Transport {
        source_name: source.name.clone(),
        url: "internal".into(),
        error: e.to_string(),
    }
}

fn publish_error(source: &SourceConfig, e: tardis_common::nats::PublishError) -> FetchError {
    match e {
        tardis_common::nats::PublishError::Cancelled { .. } => FetchError::Cancelled {
            source_name: source.name.clone(),
        },
        other => FetchError::Transport {
            source_name: source.name.clone(),
            url: "NATS".into(),
            error: other.to_string(),
        },
    }
}
