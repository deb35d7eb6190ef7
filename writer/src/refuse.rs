//! What cannot be written is never dropped: a message of a newer `schema_version` is handed
//! back and counted; one no build can read is kept whole in `dead_letters`; one Postgres keeps
//! refusing is dead-lettered (stage `write`) with the reason, then terminated.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use tardis_common::messages::{self, DeadLetter, SCHEMA_VERSION, SourceRecord, Stage};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::consume::{Decoded, Kind, Loop};
use crate::store;

/// How long a message of a newer `schema_version` waits before it is offered again.
const NEWER_VERSION_DELAY: Duration = Duration::from_secs(30);

impl Loop {
    /// A message from a newer build: handed back with a delay, again and again, and counted,
    /// so an upgrade done in the wrong order stalls visibly and loses nothing.
    pub(crate) async fn newer(&self, msg: &jetstream::Message, found: u64, supported: u32) {
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
    pub(crate) async fn unreadable(&self, msg: &jetstream::Message, reason: &str) {
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

    pub(crate) async fn store_unreadable(&self, u: &store::Unreadable) -> Result<(), String> {
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
    pub(crate) async fn reject(
        &self,
        msg: &jetstream::Message,
        decoded: Option<Decoded>,
        reason: &str,
    ) {
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
