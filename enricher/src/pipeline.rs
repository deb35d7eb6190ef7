//! The consuming side: pull record chunks, batch their records across chunks, enrich, publish
//! each chunk's outcome, then — only then — ack.
//!
//! ```text
//! puller ──items──► batcher ──batches──► BatchProcessor (limits, retries)
//!   ▲                                          │ outcomes
//!   └── permits (ENRICH_MAX_IN_FLIGHT chunks) ◄─ tracker ──► finalize: publish, then ack
//! ```
//!
//! **Delivery contract.**
//! * Unit of atomicity: the record chunk. Its outcome — every record enriched or dead — is one
//!   `EnrichedChunk` message with `Nats-Msg-Id` `enr:<source>:<chunk_id>` (parts `k/n` only
//!   when it exceeds the NATS max payload, see [`crate::outcome::outcome_messages`]). The first round to
//!   publish it decides every record; any later round's publish is a duplicate JetStream
//!   drops, so a record can never be decided twice or not at all.
//! * Acked when: after JetStream acknowledged the outcome. A failed publish naks the chunk; a
//!   lost ack redelivers it after the ack wait, and its republished outcome is dropped.
//! * Idempotent: the outcome's id; the writer's upserts.
//! * While a chunk is in flight its message gets `+WPI` every third of the ack wait, so a slow
//!   LLM never causes a redelivery; a crashed replica stops sending them, and JetStream hands
//!   the chunk to another one after the ack wait.
//! * Backpressure: the puller takes a chunk only with a free permit and while fewer than
//!   `2 × LLM_CONCURRENCY × LLM_BATCH_SIZE` records are unfinished here (enough to keep every
//!   request slot busy; more would sit idle in this replica while the replicas an autoscaler
//!   adds find nothing), and takes none while the circuit is open (the endpoint keeps failing) or halted (bad key or endpoint). On halt every
//!   chunk in flight is nak'd: nothing acked, nothing dead-lettered.
//! * Shutdown: stop pulling, let in-flight chunks finish for `ENRICH_SHUTDOWN_GRACE`, nak the
//!   rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use tardis_common::messages::{self, DeadLetter, RecordChunk, Stage};
use tardis_common::nats::{Names, publish_durably};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::enrich::{BatchProcessor, Item, ItemKey, Outcome};
use crate::metrics::EnrichMetrics;
use crate::protocol::estimate_tokens;
use tardis_common::faults::Faults;

/// How long a publish may keep failing before the chunk is nak'd.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// A chunk in flight: its message, its records' outcomes so far, its permit.
pub(crate) struct Tracked {
    pub(crate) msg: jetstream::Message,
    pub(crate) chunk: RecordChunk,
    pub(crate) outcomes: Vec<Option<Outcome>>,
    pub(crate) remaining: usize,
    pub(crate) _permit: OwnedSemaphorePermit,
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
    /// Pull another chunk only while fewer records than this are unfinished here: enough to
    /// keep every request slot busy, and no more, so that a burst spreads over the replicas
    /// an autoscaler adds instead of waiting in the first one's hands.
    pub max_held_records: usize,
    pub ack_wait: Duration,
    pub consumer_name: String,
    /// Faults injected by tests ([`Faults::none`] in production).
    pub faults: Arc<Faults>,
    /// How long in-flight chunks may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `ENRICH_MAX_DELIVER`: deliveries after which a chunk's records are dead-lettered.
    pub max_deliver: Option<u32>,
    /// Set after work was handed back through an outage: no pulling before then.
    pub paused_until: Mutex<Option<tokio::time::Instant>>,
    /// The fleet's spend today against `LLM_DAILY_BUDGET_USD`: no pulling once it is reached.
    pub spend: Arc<crate::spend::DailySpend>,
}

/// How often a replica paused by the daily budget looks again (a larger budget after a
/// restart of another replica, or the day's end).
const BUDGET_RECHECK: Duration = Duration::from_secs(30);

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
        let drained = tokio::time::timeout(this.shutdown_grace, async {
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
        for h in [heartbeat] {
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
        let mut budget_paused = false;
        loop {
            if shutdown.is_cancelled() || halted.is_cancelled() {
                return;
            }
            let paused = *self
                .paused_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(until) = paused
                && tokio::time::Instant::now() < until
            {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => continue,
                    () = shutdown.cancelled() => return,
                    () = halted.cancelled() => return,
                }
            }
            // The fleet spent today's budget: pull nothing until tomorrow (UTC); ready, paused.
            if let Some(wait) = self.budget_pause(&mut budget_paused).await {
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = shutdown.cancelled() => return,
                    () = halted.cancelled() => return,
                }
            }
            // Circuit open with work in flight: wait for it to recover instead of pulling more.
            if health.is_open() && !lock(chunks).is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    () = shutdown.cancelled() => return,
                    () = halted.cancelled() => return,
                }
            }
            // Enough records here already: let other replicas take the next chunks.
            let held: usize = lock(chunks).values().map(|t| t.remaining).sum();
            if held >= self.max_held_records {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => continue,
                    () = shutdown.cancelled() => return,
                    () = halted.cancelled() => return,
                }
            }
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = shutdown.cancelled() => return,
                () = halted.cancelled() => return,
            };
            // One chunk a pull: the next pull looks at the records held again.
            let mut held = vec![first];
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
            Err(messages::DecodeError::UnsupportedVersion {
                found, supported, ..
            }) if found > u64::from(supported) => {
                // A newer fetcher: hand it back until an enricher that reads it runs.
                self.metrics
                    .unreadable
                    .with_label_values(&["newer_version"])
                    .inc();
                warn!(found, supported, subject = %msg.subject, "a record chunk of a newer schema_version than this enricher reads: upgrade the enricher; it is handed back");
                if let Err(e) = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(30))))
                    .await
                {
                    debug!(error = %e, "nak failed");
                }
                return;
            }
            Err(e) => {
                self.metrics.unreadable.with_label_values(&["broken"]).inc();
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
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        if delivered > 1 {
            info!(source = %chunk.source, chunk_id = %chunk.chunk_id, delivery = delivered, "redelivered chunk");
        }
        if let Some(limit) = self.max_deliver
            && delivered > i64::from(limit)
        {
            let reason = format!(
                "the chunk was delivered {delivered} times without being finished (ENRICH_MAX_DELIVER={limit}): the enricher crashed or was stopped each time"
            );
            warn!(source = %chunk.source, chunk_id = %chunk.chunk_id, %reason, "giving up on a chunk; its records are dead-lettered");
            let n = chunk.records.len();
            let outcomes = vec![
                Some(Outcome::Dead {
                    reason: reason.clone(),
                    attempts: 0,
                    last_error: Some(reason),
                });
                n
            ];
            return self.finalize_decided(msg, chunk, outcomes, permit).await;
        }
        // A stored enrichment of the same content, made with this prompt version and model and
        // valid for this schema, is the record's outcome: no LLM call.
        let model = &self.processor.settings.model;
        let outcomes: Vec<Option<Outcome>> = chunk
            .records
            .iter()
            .map(|r| {
                let prior = r.prior.as_deref()?;
                if prior.prompt_version != self.prompt_version || &prior.model != model {
                    return None;
                }
                let enrichment = self.processor.schema.validate(&prior.enrichment).ok()?;
                Some(Outcome::Reused {
                    enrichment,
                    enriched_at: prior.enriched_at,
                    saved_usd: prior.cost_usd,
                })
            })
            .collect();
        let remaining = outcomes.iter().filter(|o| o.is_none()).count();
        if remaining == 0 {
            return self.finalize_decided(msg, chunk, outcomes, permit).await;
        }
        let queued: Vec<Item> = chunk
            .records
            .iter()
            .enumerate()
            .filter(|(index, _)| outcomes[*index].is_none())
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
        lock(chunks).insert(
            key,
            Tracked {
                msg,
                chunk,
                outcomes,
                remaining,
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
        let result = self.ack_or_nak(msg, ok).await;
        if let Err(e) = result {
            warn!(error = %e, "ack of an undecodable message failed");
        }
    }

    /// After what a chunk's message led to was published (`published`): acked (a double ack,
    /// confirmed by the server); otherwise nak'd, back in 5 s.
    pub(crate) async fn ack_or_nak(
        &self,
        msg: &jetstream::Message,
        published: bool,
    ) -> Result<(), async_nats::Error> {
        if published && self.faults.fail("enricher.ack") {
            // The ack is lost: the chunk comes back after the ack wait.
            Ok(())
        } else if published {
            msg.double_ack().await
        } else {
            msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await
        }
    }

    /// Publishes and waits for JetStream's ack; false (logged) if it keeps failing.
    pub(crate) async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        bytes: Vec<u8>,
        what: &str,
    ) -> bool {
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
        let rule = crate::batching::Rule {
            max_records: self.batch_size,
            max_tokens: self.max_input_tokens,
            linger: self.linger,
        };
        let mut carry: Option<Item> = None;
        while let Some(batch) = crate::batching::next_batch(&mut rx, &mut carry, &rule).await {
            let this = self.clone();
            let chunks = chunks.clone();
            let tasks2 = tasks.clone();
            tasks.spawn(async move {
                let mut keys: Vec<u64> = batch.iter().map(|i| i.key.chunk).collect();
                keys.sort_unstable();
                keys.dedup();
                // The batch runs in a task of its own: if it panics (a bug), its chunks are
                // handed back instead of being held, heartbeat after heartbeat, forever.
                let work = tokio::spawn({
                    let this = this.clone();
                    async move {
                        if this.faults.fail("enricher.batch.panic") {
                            panic!("injected fault: a batch task panics");
                        }
                        this.processor.process(batch).await
                    }
                });
                let result = match work.await {
                    Ok(result) => result,
                    Err(e) => {
                        tracing::error!(error = %e, chunks = keys.len(), "a batch task failed; its chunks go back to the stream");
                        this.hand_back(&chunks, &keys, None).await;
                        return;
                    }
                };
                if result.hand_back {
                    let mut back: Vec<u64> = result.abandoned.iter().map(|i| i.key.chunk).collect();
                    back.sort_unstable();
                    back.dedup();
                    // Delivered again after a pause (at most 30 s), to any replica.
                    let pause = this
                        .processor
                        .settings
                        .outage_hand_back
                        .min(Duration::from_secs(30));
                    this.hand_back(&chunks, &back, Some(pause)).await;
                    // Let replicas whose endpoint works take it first: pull nothing for two
                    // pauses.
                    this.pause_pulling(pause * 2);
                }
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

    /// How long to wait before pulling again when the daily budget is spent (`None`: pull).
    /// Says so once when it starts and once when it ends.
    async fn budget_pause(&self, paused: &mut bool) -> Option<Duration> {
        self.spend.budget()?;
        let now = Utc::now();
        match self.spend.gate(now).await {
            crate::spend::Gate::Open => {
                if std::mem::take(paused) {
                    self.metrics.paused.set(0);
                    info!("the daily LLM budget allows more work again; pulling resumes");
                }
                None
            }
            crate::spend::Gate::Paused {
                spent,
                budget,
                until,
            } => {
                if !std::mem::replace(paused, true) {
                    self.metrics.paused.set(1);
                    warn!(
                        spent_usd = format!("{spent:.4}"),
                        budget_usd = budget,
                        resumes_at = %until.to_rfc3339(),
                        "the fleet's LLM spend today reached LLM_DAILY_BUDGET_USD: no more work is taken until 00:00 UTC (or a restart with a larger budget); nothing is dead-lettered"
                    );
                }
                let to_midnight = (until - now).to_std().unwrap_or_default();
                Some(to_midnight.clamp(Duration::from_millis(100), BUDGET_RECHECK))
            }
        }
    }

    /// Pulls nothing more for `pause` (after handing work back through an outage).
    fn pause_pulling(&self, pause: Duration) {
        let until = tokio::time::Instant::now() + pause;
        let mut p = self
            .paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *p = Some(p.map_or(until, |u| u.max(until)));
    }

    /// Hands the chunks `keys` back to JetStream (their other records' outcomes, if any come,
    /// are then ignored).
    async fn hand_back(&self, chunks: &Chunks, keys: &[u64], delay: Option<Duration>) {
        let taken: Vec<Tracked> = {
            let mut map = lock(chunks);
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for t in taken {
            self.metrics
                .chunks
                .with_label_values(&[&t.chunk.source, "nacked"])
                .inc();
            if let Err(e) = t.msg.ack_with(AckKind::Nak(delay)).await {
                warn!(error = %e, "nak failed; the chunk comes back after the ack wait");
            }
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
}
