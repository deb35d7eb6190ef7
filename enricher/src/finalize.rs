//! The end of a chunk's way through the enricher (see [`crate::pipeline`]'s delivery
//! contract): its records' outcomes decided, encoded once and published as one message (or
//! parts), counted, and only then the chunk acked — or nak'd when a publish failed.

use async_nats::jetstream;
use chrono::Utc;
use tardis_common::messages::{EnrichedChunk, RecordChunk};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, debug, warn};

use crate::enrich::Outcome;
use crate::outcome::{decide, outcome_messages};
use crate::pipeline::{Pipeline, Tracked};

impl Pipeline {
    /// Finalizes a chunk whose every record is decided without the LLM.
    pub(crate) async fn finalize_decided(
        &self,
        msg: jetstream::Message,
        chunk: RecordChunk,
        outcomes: Vec<Option<Outcome>>,
        permit: OwnedSemaphorePermit,
    ) {
        let tracked = Tracked {
            msg,
            chunk,
            outcomes,
            remaining: 0,
            _permit: permit,
        };
        self.finalize(tracked).await;
    }

    /// Publishes a complete chunk's results, then acks it (or naks it if a publish failed).
    pub(crate) async fn finalize(&self, tracked: Tracked) {
        let span = tracing::info_span!("enrich_chunk", source = %tracked.chunk.source, chunk_id = %tracked.chunk.chunk_id);
        tardis_common::telemetry::set_parent_from(&span, tracked.msg.headers.as_ref());
        self.finalize_inner(tracked).instrument(span).await;
    }

    async fn finalize_inner(&self, tracked: Tracked) {
        let Tracked {
            msg,
            mut chunk,
            outcomes,
            ..
        } = tracked;
        let model = self.processor.settings.model.clone();
        let records = std::mem::take(&mut chunk.records);
        let decisions = decide(records, outcomes, &model, &self.prompt_version, Utc::now());
        let source = chunk.source.clone();
        let max_payload = self.client.server_info().max_payload;
        let ok = match outcome_messages(&chunk, decisions, max_payload) {
            Ok(mut parts) => {
                let mut ok = true;
                let subject = self.names.enriched_subject(&source);
                for part in &mut parts {
                    let bytes = std::mem::take(&mut part.bytes);
                    let id = part.message.msg_id();
                    ok = self
                        .publish(&subject, &id, bytes, "the chunk's outcome")
                        .await;
                    if !ok {
                        break;
                    }
                }
                if ok {
                    self.count_outcome(parts.iter().map(|p| &p.message), &model);
                }
                ok
            }
            Err(error) => {
                warn!(%error, "the chunk's outcome cannot be published");
                false
            }
        };
        let result = self.ack_or_nak(&msg, ok).await;
        let outcome = if ok { "acked" } else { "nacked" };
        self.metrics
            .chunks
            .with_label_values(&[&source, outcome])
            .inc();
        match result {
            Ok(()) => debug!(outcome, "chunk finished"),
            // The chunk comes back after the ack wait; its outcome is a duplicate JetStream drops.
            Err(error) => warn!(%error, "acknowledging the chunk failed; it will be redelivered"),
        }
    }

    /// Records, tokens and cost of published outcomes.
    fn count_outcome<'a>(&self, parts: impl Iterator<Item = &'a EnrichedChunk>, model: &str) {
        for part in parts {
            let source = part.source.as_str();
            let reused = part.records.iter().filter(|r| r.reused).count();
            self.metrics
                .records
                .with_label_values(&[source, model, "enriched"])
                .inc_by((part.records.len() - reused) as u64);
            if reused > 0 {
                self.metrics
                    .records
                    .with_label_values(&[source, model, "reused"])
                    .inc_by(reused as u64);
                let saved: f64 = part.records.iter().map(|r| r.saved_usd).sum();
                self.metrics
                    .saved_usd
                    .with_label_values(&[source, model])
                    .inc_by(saved);
                self.metrics
                    .saved_calls
                    .with_label_values(&[source, model])
                    .inc_by(reused as f64 / self.batch_size.max(1) as f64);
            }
            self.metrics
                .records
                .with_label_values(&[source, model, "dead_lettered"])
                .inc_by(part.dead.len() as u64);
            let (p, c, cost) = part.records.iter().fold((0, 0, 0.0), |(p, c, cost), r| {
                (
                    p + r.usage.prompt_tokens,
                    c + r.usage.completion_tokens,
                    cost + r.usage.cost_usd,
                )
            });
            self.metrics
                .tokens
                .with_label_values(&[source, model, "prompt"])
                .inc_by(p);
            self.metrics
                .tokens
                .with_label_values(&[source, model, "completion"])
                .inc_by(c);
            self.metrics
                .cost
                .with_label_values(&[source, model])
                .inc_by(cost);
        }
    }
}
