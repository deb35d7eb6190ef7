//! The consuming side: pull record chunks, batch their records across chunks, enrich, publish
//! the enriched chunk and dead letters, then — only then — ack.
//!
//! ```text
//! puller ──items──► batcher ──batches──► BatchProcessor (limits, retries)
//!   ▲                                          │ outcomes
//!   └── permits (ENRICH_MAX_IN_FLIGHT chunks) ◄─ tracker ──► finalize: publish, then ack
//! ```
//!
//! * A chunk is acked only after JetStream acknowledged its enriched chunk and every dead
//!   letter; if a publish fails, the chunk is nak'd and comes back.
//! * While a chunk is in flight its message gets `+WPI` every third of the ack wait, so a slow
//!   LLM never causes a redelivery; a crashed replica stops sending them, and JetStream hands
//!   the chunk to another one after the ack wait.
//! * Backpressure: the puller takes a chunk only with a free permit, and takes none while the
//!   circuit is open (the endpoint keeps failing) or halted (bad key or endpoint). On halt every
//!   chunk in flight is nak'd: nothing acked, nothing dead-lettered.
//! * Shutdown: stop pulling, let in-flight chunks finish for `SHUTDOWN_GRACE`, nak the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use tardis_common::messages::{
    self, DeadLetter, EnrichedChunk, EnrichedRecord, RecordChunk, SCHEMA_VERSION, Stage,
};
use tardis_common::nats::{Names, publish_durably};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::enrich::{BatchProcessor, Item, ItemKey, Outcome};
use crate::metrics::EnrichMetrics;
use crate::protocol::estimate_tokens;
use tardis_common::faults::Faults;

/// How long in-flight chunks may finish after SIGTERM before they are handed back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How long a publish may keep failing before the chunk is nak'd.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

struct Tracked {
    msg: jetstream::Message,
    chunk: RecordChunk,
    outcomes: Vec<Option<Outcome>>,
    remaining: usize,
    _permit: OwnedSemaphorePermit,
}

type Chunks = Arc<Mutex<HashMap<u64, Tracked>>>;

/// Everything the pipeline needs.
#[derive(Debug)]
pub struct Pipeline {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub consumer: PullConsumer,
    pub names: Names,
    pub processor: Arc<BatchProcessor>,
    pub metrics: EnrichMetrics,
    pub prompt_version: String,
    pub batch_size: usize,
    pub max_input_tokens: u32,
    pub linger: Duration,
    pub max_in_flight: usize,
    pub ack_wait: Duration,
    pub consumer_name: String,
    /// Faults injected by tests ([`Faults::none`] in production).
    pub faults: Arc<Faults>,
}

fn lock(chunks: &Chunks) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
    chunks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pipeline {
    /// Runs until `shutdown`; returns once every chunk is acked or handed back.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let chunks: Chunks = Arc::new(Mutex::new(HashMap::new()));
        let permits = Arc::new(Semaphore::new(this.max_in_flight));
        let tasks = TaskTracker::new();
        let (item_tx, item_rx) = mpsc::unbounded_channel::<Item>();
        let background = CancellationToken::new();

        let batcher = tokio::spawn(this.clone().batcher(item_rx, chunks.clone(), tasks.clone()));
        let heartbeat = tokio::spawn(this.clone().heartbeat(chunks.clone(), background.clone()));
        let lag = tokio::spawn(this.clone().lag(background.clone()));

        this.clone()
            .pull(&chunks, &permits, &item_tx, &shutdown)
            .await;
        drop(item_tx);

        // Halted (bad key or endpoint): hand everything back and wait, not ready, for SIGTERM.
        if this.processor.health.is_halted() {
            this.nak_all(&chunks, "the LLM endpoint is unusable").await;
            shutdown.cancelled().await;
        }
        // Drain: let in-flight chunks finish, then hand back what is left.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while !lock(&chunks).is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if drained.is_err() {
            this.processor.stop.cancel();
        }
        if let Err(e) = batcher.await {
            warn!(error = %e, "batcher task failed");
        }
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            warn!("batches still running after the grace period");
        }
        this.nak_all(&chunks, "shutting down").await;
        background.cancel();
        for h in [heartbeat, lag] {
            if let Err(e) = h.await {
                warn!(error = %e, "background task failed");
            }
        }
        Ok(())
    }

    async fn pull(
        self: Arc<Self>,
        chunks: &Chunks,
        permits: &Arc<Semaphore>,
        items: &mpsc::UnboundedSender<Item>,
        shutdown: &CancellationToken,
    ) {
        let health = self.processor.health.clone();
        let halted = health.halted();
        let mut next_key = 0u64;
        loop {
            if shutdown.is_cancelled() || halted.is_cancelled() {
                return;
            }
            // Circuit open with work in flight: wait for it to recover instead of pulling more.
            if health.is_open() && !lock(chunks).is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    () = shutdown.cancelled() => return,
                    () = halted.cancelled() => return,
                }
            }
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = shutdown.cancelled() => return,
                () = halted.cancelled() => return,
            };
            let mut held = vec![first];
            while let Ok(p) = permits.clone().try_acquire_owned() {
                held.push(p);
            }
            let want = held.len();
            let batch = self
                .consumer
                .fetch()
                .max_messages(want)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut stream = match batch {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, "pulling from the records stream failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            while let Some(msg) = stream.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(error) => {
                        debug!(%error, "pull batch ended");
                        break;
                    }
                };
                let Some(permit) = held.pop() else { break };
                next_key += 1;
                self.accept(next_key, msg, permit, chunks, items).await;
            }
        }
    }

    /// Registers a chunk and queues its records; undecodable messages are dead-lettered.
    async fn accept(
        &self,
        key: u64,
        msg: jetstream::Message,
        permit: OwnedSemaphorePermit,
        chunks: &Chunks,
        items: &mpsc::UnboundedSender<Item>,
    ) {
        let chunk: RecordChunk = match messages::decode(&msg.payload) {
            Ok(c) => c,
            Err(e) => {
                self.dead_letter_undecodable(&msg, &e.to_string()).await;
                return;
            }
        };
        if chunk.records.is_empty() {
            if let Err(e) = msg.double_ack().await {
                warn!(error = %e, "ack of an empty chunk failed");
            }
            return;
        }
        let queued: Vec<Item> = chunk
            .records
            .iter()
            .enumerate()
            .map(|(index, r)| Item {
                key: ItemKey { chunk: key, index },
                source: chunk.source.clone(),
                id: r.id.clone(),
                payload: r.payload.clone(),
                tokens: estimate_tokens(r.payload.get()) + estimate_tokens(&r.id) + 8,
                attempts: 0,
                last_error: None,
                errors: Vec::new(),
            })
            .collect();
        let n = queued.len();
        lock(chunks).insert(
            key,
            Tracked {
                msg,
                chunk,
                outcomes: vec![None; n],
                remaining: n,
                _permit: permit,
            },
        );
        for item in queued {
            if items.send(item).is_err() {
                return;
            }
        }
    }

    async fn dead_letter_undecodable(&self, msg: &jetstream::Message, reason: &str) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let letter = DeadLetter::undecodable(
            Stage::Enrich,
            msg.subject.as_str(),
            &msg.payload,
            seq,
            reason,
        );
        let source = &letter.source;
        warn!(%source, seq, %reason, "undecodable message dead-lettered");
        let ok = self.publish_letter(&letter).await;
        let result = if ok && self.faults.fail("enricher.ack") {
            // The ack is lost: the chunk comes back after the ack wait.
            Ok(())
        } else if ok {
            msg.double_ack().await
        } else {
            msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await
        };
        if let Err(e) = result {
            warn!(error = %e, "ack of an undecodable message failed");
        }
    }

    /// Publishes and waits for JetStream's ack; false (logged) if it keeps failing.
    async fn publish(&self, subject: &str, msg_id: &str, bytes: Vec<u8>, what: &str) -> bool {
        if self.faults.fail("enricher.publish.before") {
            return false;
        }
        match publish_durably(
            &self.js,
            subject,
            msg_id,
            bytes.into(),
            PUBLISH_PATIENCE,
            &CancellationToken::new(),
        )
        .await
        {
            Ok(_) => !self.faults.fail("enricher.publish.reply"),
            Err(error) => {
                warn!(%error, "publishing {what} failed");
                false
            }
        }
    }

    async fn publish_letter(&self, letter: &DeadLetter) -> bool {
        let Ok(bytes) = messages::encode(letter) else {
            return false;
        };
        let subject = self.names.dlq_subject(Stage::Enrich, &letter.source);
        self.publish(&subject, &letter.msg_id(), bytes, "a dead letter")
            .await
    }

    /// Groups queued records into batches (count, token budget, linger) and runs them.
    async fn batcher(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Item>,
        chunks: Chunks,
        tasks: TaskTracker,
    ) {
        let mut carry: Option<Item> = None;
        loop {
            let first = match carry.take() {
                Some(i) => i,
                None => match rx.recv().await {
                    Some(i) => i,
                    None => return,
                },
            };
            let deadline = tokio::time::Instant::now() + self.linger;
            let mut tokens = first.tokens;
            // Ids must be unique within a request (the model answers by id); records of
            // different sources may share one, so such a record waits for the next batch.
            let mut ids = std::collections::HashSet::from([first.id.clone()]);
            let mut batch = vec![first];
            while batch.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => {
                        if tokens + item.tokens > self.max_input_tokens || ids.contains(&item.id) {
                            carry = Some(item);
                            break;
                        }
                        ids.insert(item.id.clone());
                        tokens += item.tokens;
                        batch.push(item);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let this = self.clone();
            let chunks = chunks.clone();
            let tasks2 = tasks.clone();
            tasks.spawn(async move {
                let result = this.processor.process(batch).await;
                let done = this.record(&chunks, result.outcomes);
                for tracked in done {
                    let this = this.clone();
                    tasks2.spawn(async move { this.finalize(tracked).await });
                }
            });
        }
    }

    /// Stores outcomes; returns the chunks that are complete.
    fn record(&self, chunks: &Chunks, outcomes: Vec<(ItemKey, String, Outcome)>) -> Vec<Tracked> {
        let mut map = lock(chunks);
        let mut complete = Vec::new();
        for (key, _, outcome) in outcomes {
            if let Some(t) = map.get_mut(&key.chunk)
                && t.outcomes[key.index].is_none()
            {
                t.outcomes[key.index] = Some(outcome);
                t.remaining -= 1;
                if t.remaining == 0 {
                    complete.push(key.chunk);
                }
            }
        }
        complete
            .into_iter()
            .filter_map(|k| map.remove(&k))
            .collect()
    }

    /// Publishes a complete chunk's results, then acks it (or naks it if a publish failed).
    async fn finalize(&self, tracked: Tracked) {
        let span = tracing::info_span!("enrich_chunk", source = %tracked.chunk.source, chunk_id = %tracked.chunk.chunk_id);
        tardis_common::telemetry::set_parent_from(&span, tracked.msg.headers.as_ref());
        self.finalize_inner(tracked).instrument(span).await;
    }

    async fn finalize_inner(&self, tracked: Tracked) {
        let Tracked {
            msg,
            chunk,
            outcomes,
            ..
        } = tracked;
        let model = self.processor.settings.model.clone();
        let now = Utc::now();
        let mut enriched = Vec::new();
        let mut letters = Vec::new();
        for (record, outcome) in chunk.records.iter().zip(outcomes) {
            match outcome {
                Some(Outcome::Enriched { enrichment, usage }) => enriched.push(EnrichedRecord {
                    id: record.id.clone(),
                    updated_at: record.updated_at,
                    payload: record.payload.clone(),
                    enrichment,
                    model: model.clone(),
                    prompt_version: self.prompt_version.clone(),
                    usage,
                    enriched_at: now,
                }),
                Some(Outcome::Dead {
                    reason,
                    attempts,
                    last_error,
                }) => letters.push(DeadLetter {
                    schema_version: SCHEMA_VERSION,
                    source: chunk.source.clone(),
                    stage: Stage::Enrich,
                    chunk_id: chunk.chunk_id.clone(),
                    run_id: chunk.run_id.clone(),
                    record: record.clone(),
                    reason,
                    attempts,
                    last_error,
                    failed_at: now,
                }),
                None => {}
            }
        }
        let source = chunk.source.clone();
        let mut ok = true;
        if !enriched.is_empty() {
            let out = EnrichedChunk {
                schema_version: SCHEMA_VERSION,
                source: source.clone(),
                chunk_id: chunk.chunk_id.clone(),
                run_id: chunk.run_id.clone(),
                chunk_seq: chunk.chunk_seq,
                records: enriched,
                cursor_after: chunk.cursor_after.clone(),
                fetched_at: chunk.fetched_at,
            };
            ok = match messages::encode(&out) {
                Ok(bytes) => {
                    let subject = self.names.enriched_subject(&source);
                    self.publish(&subject, &out.msg_id(), bytes, "the enriched chunk")
                        .await
                }
                Err(error) => {
                    warn!(%error, "encoding the enriched chunk failed");
                    false
                }
            };
            if ok {
                let n = out.records.len() as u64;
                self.metrics
                    .records
                    .with_label_values(&[&source, &model, "enriched"])
                    .inc_by(n);
                let (p, c, cost) = out.records.iter().fold((0, 0, 0.0), |(p, c, cost), r| {
                    (
                        p + r.usage.prompt_tokens,
                        c + r.usage.completion_tokens,
                        cost + r.usage.cost_usd,
                    )
                });
                self.metrics
                    .tokens
                    .with_label_values(&[&source, &model, "prompt"])
                    .inc_by(p);
                self.metrics
                    .tokens
                    .with_label_values(&[&source, &model, "completion"])
                    .inc_by(c);
                self.metrics
                    .cost
                    .with_label_values(&[&source, &model])
                    .inc_by(cost);
            }
        }
        if ok {
            for letter in &letters {
                if !self.publish_letter(letter).await {
                    ok = false;
                    break;
                }
                self.metrics
                    .records
                    .with_label_values(&[&source, &model, "dead_lettered"])
                    .inc();
            }
        }
        let result = if ok && self.faults.fail("enricher.ack") {
            // The ack is lost: the chunk comes back after the ack wait.
            Ok(())
        } else if ok {
            msg.double_ack().await
        } else {
            msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await
        };
        let outcome = if ok { "acked" } else { "nacked" };
        self.metrics
            .chunks
            .with_label_values(&[&source, outcome])
            .inc();
        match result {
            Ok(()) => debug!(outcome, dead_letters = letters.len(), "chunk finished"),
            // The chunk comes back after the ack wait; its outputs are duplicates JetStream drops.
            Err(error) => warn!(%error, "acknowledging the chunk failed; it will be redelivered"),
        }
    }

    /// Hands every chunk in flight back to JetStream.
    async fn nak_all(&self, chunks: &Chunks, why: &str) {
        let all: Vec<Tracked> = lock(chunks).drain().map(|(_, t)| t).collect();
        if !all.is_empty() {
            info!(
                chunks = all.len(),
                reason = why,
                "handing in-flight chunks back"
            );
        }
        for t in all {
            self.metrics
                .chunks
                .with_label_values(&[&t.chunk.source, "nacked"])
                .inc();
            if let Err(e) = t.msg.ack_with(AckKind::Nak(None)).await {
                warn!(error = %e, "nak failed; the chunk comes back after the ack wait");
            }
        }
    }

    /// `+WPI` for every chunk in flight, every third of the ack wait.
    async fn heartbeat(self: Arc<Self>, chunks: Chunks, stop: CancellationToken) {
        let every = (self.ack_wait / 3).max(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            let replies: Vec<async_nats::Subject> = lock(&chunks)
                .values()
                .filter_map(|t| t.msg.reply.clone())
                .collect();
            for reply in replies {
                if let Err(e) = self.client.publish(reply, "+WPI".into()).await {
                    debug!(error = %e, "in-progress heartbeat failed");
                }
            }
        }
    }

    /// `tardis_consumer_pending{consumer}`: pending + ack-pending, every 5 s.
    async fn lag(self: Arc<Self>, stop: CancellationToken) {
        let mut consumer = self.consumer.clone();
        loop {
            match consumer.info().await {
                Ok(info) => {
                    let v = info.num_pending as i64 + info.num_ack_pending as i64;
                    self.metrics
                        .pending
                        .with_label_values(&[&self.consumer_name])
                        .set(v);
                }
                Err(error) => debug!(%error, "consumer info failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}
