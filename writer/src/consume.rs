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
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tardis_common::faults::Faults;
use tardis_common::messages::{self, DeadLetter, EnrichedChunk, FetchRun};
use tardis_common::nats::Names;
use tardis_common::ops::ReadyFlag;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::metrics::WriterMetrics;

use crate::failure::WriteError;
use crate::heartbeat::Heartbeat;

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

pub(crate) enum Decoded {
    Chunk(EnrichedChunk),
    Letter(DeadLetter),
    Run(FetchRun),
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
    /// Whether `records` takes the `COPY` path's types ([`crate::records::copy_fits`]).
    pub copy_allowed: bool,
    /// Whether the loop's next batch of records tries a `COPY` straight into `records`
    /// ([`crate::records::Path::after`]); starts with the merge.
    pub copy_next: std::sync::atomic::AtomicBool,
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
        let replies = good.iter().filter_map(|(m, _)| m.reply.clone()).collect();
        let heartbeat = Heartbeat::start(self.js.client(), replies, self.ack_wait);
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
}
