//! One batch's transaction, by what the loop consumes: a record chunk's enriched records,
//! dead records and checkpoint together; dead letters; run reports. Commits, then updates
//! the metrics; the caller acks after it returns `Ok`.

use async_nats::jetstream;
use chrono::Utc;
use tardis_common::messages::{self, DeadLetter, EnrichedChunk, FetchRun};
use tracing::{debug, error, warn};

use crate::consume::{Decoded, Kind, Loop};
use crate::failure::{WriteError, classify};
use crate::store::{self, Path};
use std::sync::atomic::Ordering;

impl Loop {
    pub(crate) async fn write(
        &self,
        batch: &[(jetstream::Message, Decoded)],
    ) -> Result<(), WriteError> {
        let started = tokio::time::Instant::now();
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| WriteError::Connection(tardis_common::error::chain(&e)))?;
        let tx = client.transaction().await.map_err(classify)?;
        match self.kind {
            Kind::Records => {
                let chunks: Vec<&EnrichedChunk> = batch
                    .iter()
                    .filter_map(|(_, d)| {
                        if let Decoded::Chunk(c) = d {
                            Some(c)
                        } else {
                            None
                        }
                    })
                    .collect();
                let rows = store::rows(&chunks);
                let cursors = store::checkpoints(&chunks);
                let mut sources: Vec<String> = chunks.iter().map(|c| c.source.clone()).collect();
                sources.sort();
                sources.dedup();
                let path = if self.copy_allowed && self.copy_next.load(Ordering::Relaxed) {
                    Path::Copy
                } else {
                    Path::Merge
                };
                let written = store::write_records(&tx, &rows, &cursors, &sources, path)
                    .await
                    .map_err(classify)?;
                let changed = &written.changed;
                // The chunk's dead records, in the same transaction: each record of a chunk
                // lands in exactly one of the two tables, together.
                let letters: Vec<DeadLetter> =
                    chunks.iter().flat_map(|c| c.dead_letters()).collect();
                let dead = if letters.is_empty() {
                    0
                } else {
                    store::write_dead_letters(&tx, &letters)
                        .await
                        .map_err(classify)?
                };
                // Replayed dead letters whose record is now written are resolved with it.
                store::resolve_replayed(&tx, &chunks)
                    .await
                    .map_err(classify)?;
                tx.commit().await.map_err(classify)?;
                // A batch without records (all of them dead) says nothing about the keys.
                if !rows.is_empty() {
                    self.metrics
                        .record_batches
                        .with_label_values(&[written.path.label()])
                        .inc();
                    self.copy_next.store(
                        Path::after(written.all_new) == Path::Copy,
                        Ordering::Relaxed,
                    );
                }
                for l in &letters {
                    warn!(source = %l.source, stage = l.stage.as_str(), record_id = %l.record.id, reason = %l.reason, "dead letter recorded");
                }
                if dead > 0 {
                    self.metrics
                        .rows
                        .with_label_values(&["dead_letters", "all", "written"])
                        .inc_by(dead);
                }
                let total: u64 = chunks.iter().map(|c| c.records.len() as u64).sum();
                tracing::Span::current()
                    .record("rows_written", changed.values().copied().sum::<u64>());
                for source in &sources {
                    let written = changed.get(source).copied().unwrap_or(0);
                    let offered: u64 = chunks
                        .iter()
                        .filter(|c| &c.source == source)
                        .map(|c| c.records.len() as u64)
                        .sum();
                    self.metrics
                        .rows
                        .with_label_values(&["records", source, "written"])
                        .inc_by(written);
                    self.metrics
                        .rows
                        .with_label_values(&["records", source, "unchanged"])
                        .inc_by(offered.saturating_sub(written));
                }
                let now = Utc::now().timestamp_millis() as f64 / 1000.0;
                for source in &sources {
                    self.metrics
                        .checkpoint_written
                        .with_label_values(&[source])
                        .set(now);
                }
                for (source, (cursor, _)) in &cursors {
                    if let messages::Cursor::Position { updated_at, .. } = cursor {
                        // Monotonic like the checkpoint: a late older chunk does not lower it.
                        let gauge = self
                            .metrics
                            .checkpoint_timestamp
                            .with_label_values(&[source]);
                        let at = updated_at.timestamp_millis() as f64 / 1000.0;
                        if at > gauge.get() {
                            gauge.set(at);
                        }
                    }
                }
                debug!(records = total, messages = batch.len(), path = ?written.path, all_new = written.all_new, "batch committed");
            }
            Kind::DeadLetters => {
                let letters: Vec<DeadLetter> = batch
                    .iter()
                    .filter_map(|(_, d)| {
                        if let Decoded::Letter(l) = d {
                            Some(l.clone())
                        } else {
                            None
                        }
                    })
                    .collect();
                let n = store::write_dead_letters(&tx, &letters)
                    .await
                    .map_err(classify)?;
                tracing::Span::current().record("rows_written", n);
                tx.commit().await.map_err(classify)?;
                for l in &letters {
                    warn!(source = %l.source, stage = l.stage.as_str(), record_id = %l.record.id, reason = %l.reason, "dead letter recorded");
                }
                self.metrics
                    .rows
                    .with_label_values(&["dead_letters", "all", "written"])
                    .inc_by(n);
            }
            Kind::Runs => {
                let runs: Vec<FetchRun> = batch
                    .iter()
                    .filter_map(|(_, d)| {
                        if let Decoded::Run(r) = d {
                            Some(r.clone())
                        } else {
                            None
                        }
                    })
                    .collect();
                let n = store::write_runs(&tx, &runs).await.map_err(classify)?;
                tracing::Span::current().record("rows_written", n);
                tx.commit().await.map_err(classify)?;
                self.metrics
                    .rows
                    .with_label_values(&["fetch_runs", "all", "written"])
                    .inc_by(n);
            }
        }
        let took = started.elapsed().as_secs_f64();
        self.metrics
            .commit_seconds
            .with_label_values(&[self.kind.label()])
            .observe(took);
        tracing::Span::current().record("commit_seconds", took);
        self.metrics
            .batch_messages
            .with_label_values(&[self.kind.label()])
            .observe(batch.len() as f64);
        if self.crash_after_commit && self.kind == Kind::Records {
            error!(
                "WRITER_TEST_CRASH_AFTER_COMMIT is set: aborting after the commit, before the ack"
            );
            std::process::abort();
        }
        Ok(())
    }
}
