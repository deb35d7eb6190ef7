//! The work left in each stage, the one definition used by autoscaling, dashboards and alerts.
//!
//! Every stream is a work queue: a message stays in it until its consumer acks it. So the work
//! left for a stage is **the number of messages in its stream** — waiting, being worked on,
//! or (if something went wrong) no longer delivered by its consumer. It is exported as
//! `tardis_work_left_messages{stage}` by the writer, which always runs (a StatefulSet): the
//! series exists whether zero or ten enrichers run, and it does not multiply with replicas.
//!
//! KEDA's `nats-jetstream` trigger computes the consumer's `num_pending + num_ack_pending`,
//! which is the same number as long as nothing is undeliverable — and nothing is, because no
//! consumer gives up on a message (`max_deliver = -1`). The difference, if it ever appears, is
//! `tardis_stream_undeliverable_messages{stream}` (alert `TardisMessagesStranded`).

use std::time::Duration;

use async_nats::jetstream;
use prometheus::{IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{ConsumerKind, Names};

/// The stage a consumer is, as the `stage` label says it.
pub fn stage(kind: ConsumerKind) -> &'static str {
    match kind {
        ConsumerKind::Enricher => "enrich",
        ConsumerKind::Writer => "write",
        ConsumerKind::WriterDlq => "dead_letters",
        ConsumerKind::WriterRuns => "runs",
    }
}

/// The gauges.
#[derive(Debug, Clone)]
pub struct LagMetrics {
    pub work_left: IntGaugeVec,
    pub undeliverable: IntGaugeVec,
}

impl LagMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        use crate::metrics::register as reg;
        Ok(Self {
            work_left: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tardis_work_left_messages",
                        "Messages in a stage's work-queue stream: waiting, being worked on, or no longer delivered (the autoscaling signal; exported by the writer)",
                    ),
                    &["stage"],
                )?,
            )?,
            undeliverable: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tardis_stream_undeliverable_messages",
                        "Messages in a work-queue stream that its consumer will not deliver any more (neither pending nor awaiting an ack): stranded work",
                    ),
                    &["stream"],
                )?,
            )?,
        })
    }
}

/// Work left and stranded messages in `stream` for a consumer that reports `pending` waiting
/// and `ack_pending` delivered (or no consumer yet).
pub fn undeliverable(in_stream: u64, consumer: Option<(u64, u64)>) -> u64 {
    match consumer {
        Some((pending, ack_pending)) => in_stream.saturating_sub(pending + ack_pending),
        // Nobody has created the consumer yet: its work waits, it is not stranded.
        None => 0,
    }
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Every `every`, sets the gauges for every stage, until `stop`.
pub async fn export(
    js: jetstream::Context,
    names: Names,
    metrics: LagMetrics,
    every: Duration,
    stop: CancellationToken,
) {
    let kinds = [
        ConsumerKind::Enricher,
        ConsumerKind::Writer,
        ConsumerKind::WriterDlq,
        ConsumerKind::WriterRuns,
    ];
    // A series is set only from a reading: when NATS cannot be read it is removed, so that a
    // scaler or an alert sees "unknown" (absent), never a stale or made-up 0.
    let forget = |kind: ConsumerKind, stream_name: &str| {
        if metrics
            .work_left
            .remove_label_values(&[stage(kind)])
            .is_ok()
        {
            debug!(stream = %stream_name, "work left unknown");
        }
        if metrics
            .undeliverable
            .remove_label_values(&[stream_name])
            .is_ok()
        {
            debug!(stream = %stream_name, "undeliverable unknown");
        }
    };
    loop {
        for kind in kinds {
            let stream_name = names.stream(kind.stream());
            let mut stream = match js.get_stream(&stream_name).await {
                Ok(s) => s,
                Err(error) if is_stream_not_found(&error) => {
                    // Nothing has created the stream yet: no work, for certain.
                    metrics.work_left.with_label_values(&[stage(kind)]).set(0);
                    metrics
                        .undeliverable
                        .with_label_values(&[&stream_name])
                        .set(0);
                    continue;
                }
                Err(error) => {
                    debug!(%error, stream = %stream_name, "stream info failed");
                    forget(kind, &stream_name);
                    continue;
                }
            };
            let in_stream = match stream.info().await {
                Ok(info) => info.state.messages,
                Err(error) => {
                    debug!(%error, stream = %stream_name, "stream info failed");
                    forget(kind, &stream_name);
                    continue;
                }
            };
            metrics
                .work_left
                .with_label_values(&[stage(kind)])
                .set(in_stream as i64);
            let consumer = match stream
                .get_consumer::<jetstream::consumer::pull::Config>(&names.consumer(kind))
                .await
            {
                Ok(mut c) => match c.info().await {
                    Ok(i) => Some((i.num_pending, i.num_ack_pending as u64)),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            metrics
                .undeliverable
                .with_label_values(&[&stream_name])
                .set(undeliverable(in_stream, consumer) as i64);
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stranded_is_what_the_consumer_no_longer_counts() {
        assert_eq!(undeliverable(10, Some((6, 4))), 0);
        assert_eq!(undeliverable(10, Some((3, 4))), 3);
        assert_eq!(undeliverable(10, None), 0, "no consumer yet: waiting work");
        assert_eq!(undeliverable(0, Some((1, 0))), 0, "never negative");
    }
}
