//! Publishing durably: a deterministic `Nats-Msg-Id`, waiting for JetStream's ack, retrying
//! what is transient.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::backoff::Backoff;

/// A shared handle to JetStream for a worker.
pub type JetStream = Arc<jetstream::Context>;

/// Why a publish failed for good.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to {subject} failed after {attempts} attempts: {error}")]
    Failed {
        subject: String,
        attempts: u32,
        error: String,
    },
    #[error("publishing to {subject} interrupted by shutdown")]
    Cancelled { subject: String },
    /// Permanent: the message is larger than the server accepts; retrying cannot help.
    #[error(
        "a message of {bytes} bytes for {subject} is larger than the NATS max payload of {max} bytes"
    )]
    TooLarge {
        subject: String,
        bytes: usize,
        max: usize,
    },
}

/// Publishes `payload` to `subject` with a `Nats-Msg-Id` and the current trace context, and
/// waits for JetStream's acknowledgement — the message is durable when this returns `Ok`.
///
/// Transient failures (no ack in time, no stream reachable, stream full) are retried with
/// backoff for up to `patience`; retrying is safe because the `Nats-Msg-Id` makes a second
/// copy a duplicate that JetStream drops. A message larger than the server's max payload is
/// [`PublishError::TooLarge`] at once: no retry can help.
pub async fn publish_durably(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: bytes::Bytes,
    patience: Duration,
    shutdown: &CancellationToken,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + patience;
    let mut attempt = 0u32;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        crate::telemetry::inject_current(&mut headers);
        let result = async {
            let too_large = |text: &str| {
                text.contains("max payload") || text.contains("message size exceeds maximum")
            };
            let sent = js
                .publish_with_headers(subject.to_string(), headers, payload.clone())
                .await
                .map_err(|e| {
                    let text = e.to_string();
                    (
                        e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                            || too_large(&text),
                        text,
                    )
                })?;
            sent.await.map_err(|e| {
                let text = e.to_string();
                (
                    e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                        || too_large(&text),
                    text,
                )
            })
        };
        let result = tokio::select! {
            r = result => r,
            () = shutdown.cancelled() => return Err(PublishError::Cancelled { subject: subject.to_string() }),
        };
        attempt += 1;
        match result {
            Ok(ack) => return Ok(ack),
            Err((true, _)) => {
                return Err(PublishError::TooLarge {
                    subject: subject.to_string(),
                    bytes: payload.len(),
                    max: js.client().server_info().max_payload,
                });
            }
            Err((false, error)) => {
                let delay = backoff.delay(attempt);
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(PublishError::Failed {
                        subject: subject.to_string(),
                        attempts: attempt,
                        error,
                    });
                }
                warn!(subject, %error, attempt, "publish failed, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Err(PublishError::Cancelled { subject: subject.to_string() }),
                }
            }
        }
    }
}
