//! The writer's consuming loops: gather up to `WRITER_BATCH_MESSAGES` messages or
//! `WRITER_BATCH_WAIT`, write them in one transaction, commit, then ack them all.
//!
//! **Delivery contract.**
//! * Unit of atomicity: the batch's transaction. A record chunk's outcome is written whole in
//!   it: its enriched records into `records`, its dead records into `dead_letters`, and the
//!   source's checkpoint, so a record lands in exactly one of the two tables together with
//!   the checkpoint that covers it.
//! * Acked when: after `COMMIT`. A crash or a lost ack between the two replays the batch.
//! * Idempotent: upserts keyed on `(source, record_id)` (newest version by `(updated_at,
//!   fetched_at)`, a replay changes nothing); dead letters on `(stage, source, record_id)`;
//!   fetch runs on `(source, run_id)`; the checkpoint only moves forward.
//!
//! Failures:
//! * Postgres unreachable (connection errors): nothing is acked, the batch is nak'd with a
//!   delay, `/ready` says `postgres`, and no more is pulled until Postgres answers again.
//! * A batch the database rejects for its data (SQLSTATE classes 22 and 23): each message is
//!   retried alone, so one bad message cannot block the others; a message still rejected after
//!   `WRITER_MAX_DELIVER` deliveries goes to `tardis.dlq.write.<source>` with the reason (a dead
//!   letter or run report Postgres refuses is kept as its bytes in `dead_letters`).
//! * Nothing is dropped: a message of a newer `schema_version` is handed back every 30 s and
//!   counted until a writer that reads it runs; a message no build can read is kept whole in
//!   `dead_letters` (JSON as `payload`, anything else as `raw` bytes), then terminated.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tardis_common::faults::Faults;
use tardis_common::messages::{
    self, DeadLetter, EnrichedChunk, FetchRun, SCHEMA_VERSION, SourceRecord, Stage,
};
use tardis_common::nats::{Names, publish_durably};
use tardis_common::ops::ReadyFlag;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::metrics::WriterMetrics;

/// How long a message of a newer `schema_version` waits before it is offered again.
const NEWER_VERSION_DELAY: Duration = Duration::from_secs(30);
use crate::store;

/// What a loop consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Records,
    DeadLetters,
    Runs,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Records => "writer",
            Kind::DeadLetters => "writer-dlq",
            Kind::Runs => "writer-runs",
        }
    }
}

enum Decoded {
    Chunk(EnrichedChunk),
    Letter(DeadLetter),
    Run(FetchRun),
}

/// Why a transaction failed, by what happens next.
#[derive(Debug, PartialEq, Eq)]
enum WriteError {
    /// Postgres unreachable: nak, pause pulling until it answers.
    Connection(String),
    /// The data was refused (SQLSTATE classes 22, 23, 54, and 21000): isolate, then
    /// dead-letter.
    Data(String),
    /// `statement_timeout`, `idle_in_transaction_session_timeout`, a lock or serialization
    /// conflict (57014, 25P03, 55P03, 40001, 40P01): nak with a delay and try again.
    Busy(String),
}

/// The class of a failure from its SQLSTATE (pure).
fn classify_code(code: Option<&str>, text: String) -> WriteError {
    match code {
        // Data exceptions, integrity violations, a value past a limit (an index row too
        // large), a cardinality violation: this data can never be written.
        Some(c)
            if c.starts_with("22")
                || c.starts_with("23")
                || c.starts_with("54")
                || c == "21000" =>
        {
            WriteError::Data(text)
        }
        Some("57014" | "25P03" | "55P03" | "40001" | "40P01") => WriteError::Busy(text),
        _ => WriteError::Connection(text),
    }
}

fn classify(e: tokio_postgres::Error) -> WriteError {
    let text = tardis_common::error::chain(&e);
    classify_code(e.code().map(|c| c.code()), text)
}

/// One consuming loop.
#[derive(Debug)]
pub struct Loop {
    pub kind: Kind,
    pub consumer: PullConsumer,
    pub pool: Pool,
    pub js: jetstream::Context,
    pub names: Names,
    pub metrics: WriterMetrics,
    pub batch_messages: usize,
    /// At most this many bytes of messages per batch (never below the server's largest
    /// message: a pull for fewer bytes than the next message would never get it).
    pub batch_bytes: usize,
    pub batch_wait: Duration,
    pub max_deliver: i64,
    /// The consumer's ack wait: a batch being written gets `+WPI` every third of it.
    pub ack_wait: Duration,
    pub pg_ready: ReadyFlag,
    pub crash_after_commit: bool,
    /// Faults injected by tests ([`Faults::none`] in production).
    pub faults: std::sync::Arc<Faults>,
}

impl Loop {
    pub async fn run(self, shutdown: CancellationToken) {
        let max_payload = self.js.client().server_info().max_payload;
        let batch_bytes = self.batch_bytes.max(max_payload + 65_536);
        info!(consumer = self.kind.label(), batch_bytes, "consuming");
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if !self.pg_ready.get() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            let batch = self
                .consumer
                .fetch()
                .max_messages(self.batch_messages)
                .max_bytes(batch_bytes)
                .expires(self.batch_wait.max(Duration::from_millis(50)))
                .messages()
                .await;
            let mut stream = match batch {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, consumer = self.kind.label(), "pull failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            let mut msgs = Vec::new();
            let mut ended_by_error = false;
            while let Some(m) = stream.next().await {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(error) => {
                        debug!(%error, "pull batch ended");
                        ended_by_error = true;
                        break;
                    }
                }
            }
            if !msgs.is_empty() {
                self.handle(msgs).await;
            } else if ended_by_error {
                // A pull the server keeps refusing (e.g. a message over the batch's bytes)
                // must not spin.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    fn decode(&self, msg: &jetstream::Message) -> Result<Decoded, messages::DecodeError> {
        match self.kind {
            Kind::Records => messages::decode::<EnrichedChunk>(&msg.payload).map(Decoded::Chunk),
            Kind::DeadLetters => messages::decode::<DeadLetter>(&msg.payload).map(Decoded::Letter),
            Kind::Runs => messages::decode::<FetchRun>(&msg.payload).map(Decoded::Run),
        }
    }

    async fn handle(&self, msgs: Vec<jetstream::Message>) {
        let mut good = Vec::new();
        for msg in msgs {
            match self.decode(&msg) {
                Ok(d) => good.push((msg, d)),
                Err(messages::DecodeError::UnsupportedVersion {
                    found, supported, ..
                }) if found > u64::from(supported) => self.newer(&msg, found, supported).await,
                Err(e) => self.unreadable(&msg, &e.to_string()).await,
            }
        }
        if good.is_empty() {
            return;
        }
        // One span per batch, linked to the trace of every message in it (a batch has many
        // parents), so a record's trace goes on from its chunk to the transaction.
        // Its own root: the process-long `writer` span must not make every batch one trace.
        let span = tracing::info_span!(
            parent: None,
            "write batch",
            consumer = self.kind.label(),
            messages = good.len(),
            rows_written = tracing::field::Empty,
            commit_seconds = tracing::field::Empty,
        );
        for (msg, _) in &good {
            tardis_common::telemetry::link_from(&span, msg.headers.as_ref());
        }
        for (msg, _) in &good {
            if let Some(info) = msg.info().ok().filter(|i| i.delivered > 1) {
                info!(
                    consumer = self.kind.label(),
                    stream_seq = info.stream_sequence,
                    delivery = info.delivered,
                    "redelivered message"
                );
            }
        }
        // A batch held up (a slow commit, a lock, the one-by-one retry below) keeps its
        // messages: `+WPI` every third of the ack wait until each is acked or handed back.
        let heartbeat = Heartbeat::start(self.js.client(), &good, self.ack_wait);
        let written = self.write(&good).instrument(span.clone()).await;
        match written {
            Ok(()) => {
                drop(heartbeat);
                self.ack_all(&good).await;
            }
            Err(WriteError::Busy(e)) => {
                drop(heartbeat);
                warn!(error = %e, consumer = self.kind.label(), messages = good.len(), "the transaction timed out or conflicted; the batch goes back to the stream");
                self.metrics
                    .failures
                    .with_label_values(&[self.kind.label(), "timeout"])
                    .inc();
                self.nak_all(&good).await;
            }
            Err(WriteError::Connection(e)) => {
                drop(heartbeat);
                warn!(error = %e, consumer = self.kind.label(), messages = good.len(), "postgres unavailable; the batch goes back to the stream");
                self.metrics
                    .failures
                    .with_label_values(&[self.kind.label(), "connection"])
                    .inc();
                self.pg_ready.set(false);
                self.nak_all(&good).await;
            }
            Err(WriteError::Data(e)) if good.len() > 1 => {
                warn!(error = %e, consumer = self.kind.label(), "the batch was rejected; writing its messages one by one");
                for one in good {
                    let reply = one.0.reply.clone();
                    heartbeat.done(reply.as_ref());
                    self.handle_single(one).await;
                }
            }
            Err(WriteError::Data(e)) => {
                drop(heartbeat);
                if let Some(one) = good.pop() {
                    self.rejected_alone(one, e).await;
                }
            }
        }
    }

    async fn handle_single(&self, one: (jetstream::Message, Decoded)) {
        let batch = [one];
        match self.write(&batch).await {
            Ok(()) => self.ack_all(&batch).await,
            Err(WriteError::Busy(e)) => {
                warn!(error = %e, "the transaction timed out or conflicted");
                self.metrics
                    .failures
                    .with_label_values(&[self.kind.label(), "timeout"])
                    .inc();
                self.nak_all(&batch).await;
            }
            Err(WriteError::Connection(e)) => {
                warn!(error = %e, "postgres unavailable");
                self.pg_ready.set(false);
                self.nak_all(&batch).await;
            }
            Err(WriteError::Data(e)) => {
                let [one] = batch;
                self.rejected_alone(one, e).await;
            }
        }
    }

    async fn rejected_alone(&self, (msg, decoded): (jetstream::Message, Decoded), error: String) {
        self.metrics
            .failures
            .with_label_values(&[self.kind.label(), "data"])
            .inc();
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        if delivered >= self.max_deliver {
            self.reject(
                &msg,
                Some(decoded),
                &format!("Postgres rejected it {delivered} times: {error}"),
            )
            .await;
        } else {
            warn!(%error, delivered, "message rejected by Postgres; it will be retried");
            if let Err(e) = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                .await
            {
                warn!(error = %e, "nak failed");
            }
        }
    }

    async fn write(&self, batch: &[(jetstream::Message, Decoded)]) -> Result<(), WriteError> {
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
                let changed = store::write_records(&tx, &rows, &cursors, &sources)
                    .await
                    .map_err(classify)?;
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
                debug!(records = total, messages = batch.len(), "batch committed");
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

    async fn ack_all(&self, batch: &[(jetstream::Message, Decoded)]) {
        for (msg, _) in batch {
            if self.faults.fail("writer.ack") {
                continue;
            }
            // A lost ack only means a redelivery, which the upserts absorb.
            if let Err(e) = msg.ack().await {
                warn!(error = %e, "ack failed; the message will be redelivered and written again harmlessly");
            }
        }
    }

    async fn nak_all(&self, batch: &[(jetstream::Message, Decoded)]) {
        for (msg, _) in batch {
            if let Err(e) = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                .await
            {
                debug!(error = %e, "nak failed; redelivered after the ack wait");
            }
        }
    }

    /// A message from a newer build: handed back with a delay, again and again, and counted,
    /// so an upgrade done in the wrong order stalls visibly and loses nothing.
    async fn newer(&self, msg: &jetstream::Message, found: u64, supported: u32) {
        self.metrics
            .unreadable
            .with_label_values(&[self.kind.label(), "newer_version"])
            .inc();
        warn!(
            consumer = self.kind.label(),
            subject = %msg.subject,
            found,
            supported,
            "a message of a newer schema_version than this writer reads: upgrade the writer; it is handed back"
        );
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(NEWER_VERSION_DELAY))).await {
            debug!(error = %e, "nak failed; redelivered after the ack wait");
        }
    }

    /// A message no build can read: kept whole in `dead_letters` (stage `write`), then
    /// terminated. If Postgres cannot take it, it comes back.
    async fn unreadable(&self, msg: &jetstream::Message, reason: &str) {
        self.metrics
            .unreadable
            .with_label_values(&[self.kind.label(), "broken"])
            .inc();
        let (stream, seq) = msg
            .info()
            .map(|i| (i.stream.to_string(), i.stream_sequence))
            .unwrap_or_default();
        let u = store::Unreadable {
            stage: Stage::Write.as_str(),
            source: msg
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .unwrap_or("unknown")
                .to_string(),
            record_id: format!("message-{stream}-{seq}"),
            bytes: msg.payload.to_vec(),
            reason: format!("the message could not be read: {reason}"),
            at: Utc::now(),
        };
        match self.store_unreadable(&u).await {
            Ok(()) => {
                warn!(consumer = self.kind.label(), subject = %msg.subject, seq, reason, "unreadable message kept in dead_letters");
                if let Err(e) = msg.ack_with(AckKind::Term).await {
                    warn!(error = %e, "terminating the message failed");
                }
            }
            Err(error) => {
                warn!(%error, "storing an unreadable message failed; it comes back");
                if let Err(e) = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await
                {
                    debug!(error = %e, "nak failed");
                }
            }
        }
    }

    async fn store_unreadable(&self, u: &store::Unreadable) -> Result<(), String> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        store::write_unreadable(&tx, u)
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        tx.commit()
            .await
            .map_err(|e| tardis_common::error::chain(&e))
    }

    /// Dead-letters what cannot be written (stage `write`), then terminates the message.
    async fn reject(&self, msg: &jetstream::Message, decoded: Option<Decoded>, reason: &str) {
        self.metrics
            .failures
            .with_label_values(&[self.kind.label(), "dead_lettered"])
            .inc();
        let letters: Vec<DeadLetter> = match (&decoded, self.kind) {
            (_, Kind::DeadLetters) | (_, Kind::Runs) => {
                // A dead letter or run report Postgres refuses is kept as its bytes.
                self.unreadable(msg, reason).await;
                return;
            }
            (Some(Decoded::Chunk(c)), _) => c
                .dead_letters()
                .into_iter()
                .chain(c.records.iter().map(|r| DeadLetter {
                    schema_version: SCHEMA_VERSION,
                    source: c.source.clone(),
                    stage: Stage::Write,
                    chunk_id: c.chunk_id.clone(),
                    run_id: c.run_id.clone(),
                    record: SourceRecord {
                        id: r.id.clone(),
                        updated_at: r.updated_at,
                        payload: r.payload.clone(),
                        content_key: None,
                        prior: None,
                    },
                    reason: reason.to_string(),
                    attempts: msg.info().map(|i| i.delivered as u32).unwrap_or(1),
                    last_error: Some(reason.to_string()),
                    failed_at: Utc::now(),
                }))
                .collect(),
            _ => {
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                vec![DeadLetter::undecodable(
                    Stage::Write,
                    msg.subject.as_str(),
                    &msg.payload,
                    seq,
                    reason,
                )]
            }
        };
        for letter in &letters {
            let Ok(bytes) = messages::encode(letter) else {
                continue;
            };
            let subject = self.names.dlq_subject(Stage::Write, &letter.source);
            if let Err(e) = publish_durably(
                &self.js,
                &subject,
                &letter.msg_id(),
                bytes.into(),
                Duration::from_secs(60),
                &CancellationToken::new(),
            )
            .await
            {
                warn!(error = %e, "publishing a dead letter failed; the message will come back");
                if let Err(e) = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await
                {
                    debug!(error = %e, "nak failed");
                }
                return;
            }
        }
        warn!(reason, "message dead-lettered by the writer");
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            warn!(error = %e, "terminating the message failed");
        }
    }
}

/// `+WPI` for a batch's messages every third of the ack wait, until each is [`done`] or the
/// heartbeat is dropped (which stops it at once, on every path, a panic included).
///
/// [`done`]: Heartbeat::done
struct Heartbeat {
    replies: std::sync::Arc<std::sync::Mutex<Vec<async_nats::Subject>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    fn start(
        client: async_nats::Client,
        batch: &[(jetstream::Message, Decoded)],
        ack_wait: Duration,
    ) -> Self {
        let replies = std::sync::Arc::new(std::sync::Mutex::new(
            batch
                .iter()
                .filter_map(|(m, _)| m.reply.clone())
                .collect::<Vec<_>>(),
        ));
        let every = (ack_wait / 3).max(Duration::from_millis(500));
        let task = tokio::spawn({
            let replies = replies.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    let now: Vec<async_nats::Subject> = replies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    for reply in now {
                        if let Err(e) = client.publish(reply, "+WPI".into()).await {
                            debug!(error = %e, "in-progress heartbeat failed");
                        }
                    }
                }
            }
        });
        Self { replies, task }
    }

    /// No more heartbeats for this message (it is about to be acked or handed back).
    fn done(&self, reply: Option<&async_nats::Subject>) {
        if let Some(reply) = reply {
            self.replies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|r| r != reply);
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_decide_what_happens_next() {
        let c = |code: Option<&str>| classify_code(code, String::new());
        assert_eq!(c(Some("23505")), WriteError::Data(String::new()));
        assert_eq!(c(Some("22P02")), WriteError::Data(String::new()));
        assert_eq!(
            c(Some("54000")),
            WriteError::Data(String::new()),
            "an id too long for the index"
        );
        assert_eq!(c(Some("21000")), WriteError::Data(String::new()));
        for busy in ["57014", "25P03", "55P03", "40001", "40P01"] {
            assert_eq!(c(Some(busy)), WriteError::Busy(String::new()), "{busy}");
        }
        assert_eq!(c(Some("08006")), WriteError::Connection(String::new()));
        assert_eq!(c(None), WriteError::Connection(String::new()));
    }
}
