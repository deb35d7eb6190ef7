//! Publishing a page: chunks (cut by count and bytes) with content-derived ids, oversized
//! records to the dead-letter stream, and the cursor saved after each acknowledged chunk.

use crate::sources::SourceConfig;
use chrono::Utc;
use serde_json::value::RawValue;
use tardis_common::messages::{
    self, Cursor, DeadLetter, RecordChunk, SCHEMA_VERSION, SourceRecord, Stage,
};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest a chunk waits for its stored enrichments to be looked up.
const PRIOR_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

use crate::advance::Advance;
use crate::chunker;
use crate::collect::{Collector, Mode, PUBLISH_PATIENCE, Progress};
use crate::content::content_key;
use crate::http::FetchError;

/// Whether a run looks up the stored enrichments of the records it fetches
/// ([`crate::checkpoint::Checkpoints::priors`], one query per chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookups {
    /// The source had stored records when the run started, or whether it had is unknown.
    On,
    /// The source had no stored record when the run started (a first load, or a backfill
    /// into an empty table): there is nothing to find, so nothing is looked up. A record the
    /// run meets twice (pages that overlap, a backfill running beside it) is then enriched
    /// twice; the writer keeps one row, the newest.
    FirstLoad,
    /// A lookup failed in this run: the rest of the run does not try again, and its records
    /// go to the LLM at full price.
    Failed,
}

impl Collector {
    /// Whether a run of `source` starting now looks up stored enrichments.
    pub(crate) async fn lookups(&self, source: &str) -> Lookups {
        let Some(checkpoints) = &self.checkpoints else {
            return Lookups::On;
        };
        match tokio::time::timeout(PRIOR_LOOKUP_TIMEOUT, checkpoints.has_records(source)).await {
            Ok(Ok(true)) => Lookups::On,
            Ok(Ok(false)) => {
                info!(
                    "no record of this source is stored yet: this run does not look up stored enrichments"
                );
                Lookups::FirstLoad
            }
            Ok(Err(error)) => {
                debug!(%error, "whether records are stored is unknown; looking up per chunk");
                Lookups::On
            }
            Err(_) => {
                debug!("whether records are stored is unknown (timed out); looking up per chunk");
                Lookups::On
            }
        }
    }

    /// Cuts a page's records into chunks and publishes them, saving the cursor after each.
    /// `final_cursor`, when given, is the cursor of the page's last chunk.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn publish_page(
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
        while let Some(mut group) = queue.pop_front() {
            self.attach_priors(source, &mut group, progress).await;
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

    /// Sets each record's content key and, when Postgres is configured and readable, the
    /// stored enrichment of the same content (one query per chunk; none in a first load). A
    /// lookup that fails is logged, counted, and not tried again in this run: the records go
    /// at full price.
    async fn attach_priors(
        &self,
        source: &SourceConfig,
        group: &mut [SourceRecord],
        progress: &mut Progress,
    ) {
        for record in group.iter_mut() {
            if record.content_key.is_none() {
                record.content_key = content_key(&record.payload, &source.content_ignore);
            }
        }
        let Some(checkpoints) = &self.checkpoints else {
            return;
        };
        if progress.lookups == Lookups::Failed || group.iter().all(|r| r.prior.is_some()) {
            return;
        }
        let wanted: Vec<(&str, &str)> = group
            .iter()
            .filter_map(|r| Some((r.id.as_str(), r.content_key.as_deref()?)))
            .collect();
        if progress.lookups == Lookups::FirstLoad {
            self.metrics
                .prior_lookups
                .with_label_values(&[&source.name, "first_load"])
                .inc_by(wanted.len() as u64);
            return;
        }
        let looked_up = tokio::time::timeout(
            PRIOR_LOOKUP_TIMEOUT,
            checkpoints.priors(&source.name, &wanted),
        )
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        let count = |result: &str, n: usize| {
            self.metrics
                .prior_lookups
                .with_label_values(&[&source.name, result])
                .inc_by(n as u64)
        };
        match looked_up {
            Ok(mut found) => {
                let n = wanted.len();
                let hits = found.len();
                for record in group.iter_mut() {
                    if let Some(prior) = found.remove(&record.id) {
                        record.prior = Some(Box::new(prior));
                    }
                }
                count("found", hits);
                count("none", n - hits);
            }
            Err(error) => {
                progress.lookups = Lookups::Failed;
                count("failed", wanted.len());
                warn!(source = %source.name, %error, "stored enrichments could not be looked up; this run's records go to the LLM at full price");
            }
        }
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
            content_key: None,
            prior: None,
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
