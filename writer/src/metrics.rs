//! The writer's metrics.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    exponential_buckets,
};

#[derive(Debug, Clone)]
pub struct WriterMetrics {
    pub rows: IntCounterVec,
    pub batch_messages: HistogramVec,
    pub commit_seconds: HistogramVec,
    pub record_batches: IntCounterVec,
    pub checkpoint_timestamp: GaugeVec,
    pub checkpoint_written: GaugeVec,
    pub failures: IntCounterVec,
    pub unreadable: IntCounterVec,
    pub info: IntGaugeVec,
}

impl WriterMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        use tardis_common::metrics::register as reg;
        Ok(Self {
            rows: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_writer_rows_total",
                        "Rows written by table and outcome (written: inserted or updated; unchanged: a replay or an older version)",
                    ),
                    &["table", "source", "outcome"],
                )?,
            )?,
            batch_messages: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("tardis_writer_batch_messages", "Messages per transaction")
                        .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
                    &["consumer"],
                )?,
            )?,
            commit_seconds: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tardis_writer_commit_seconds",
                        "Duration of a batch transaction, from BEGIN to COMMIT",
                    )
                    .buckets(exponential_buckets(0.001, 2.0, 14)?),
                    &["consumer"],
                )?,
            )?,
            record_batches: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_writer_record_batches_total",
                        "Batches of records committed, by path: copy (a binary COPY straight into records, every key new) or merge (staged, then merged: newest version wins)",
                    ),
                    &["path"],
                )?,
            )?,
            checkpoint_timestamp: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tardis_writer_checkpoint_timestamp_seconds",
                        "The source's written checkpoint: the updated_at (Unix time) of the newest record written through; read from Postgres at start and every 30 s, so it stays exported (and ages) while nothing is written",
                    ),
                    &["source"],
                )?,
            )?,
            checkpoint_written: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tardis_writer_checkpoint_written_timestamp_seconds",
                        "When a batch of the source was last committed (Unix time; source_checkpoints.updated_at): read from Postgres at start and every 30 s, so it ages while nothing of the source is written",
                    ),
                    &["source"],
                )?,
            )?,
            failures: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_writer_failures_total",
                        "Failed transactions by kind (connection, data) and messages dead-lettered",
                    ),
                    &["consumer", "kind"],
                )?,
            )?,
            unreadable: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_writer_unreadable_total",
                        "Messages the writer cannot read: newer_version (handed back until a writer that reads it runs) or broken (kept whole in dead_letters)",
                    ),
                    &["consumer", "kind"],
                )?,
            )?,
            info: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tardis_writer_info",
                        "The writer's StatefulSet ordinal (always 1)",
                    ),
                    &["ordinal"],
                )?,
            )?,
        })
    }

    /// Creates the series of the counters that alerts watch, at zero, so that the first
    /// event after a start is an increase (`increase()` does not see a series' first sample).
    pub fn precreate(&self, consumers: &[&str]) {
        for consumer in consumers {
            for kind in ["connection", "data", "dead_lettered"] {
                self.failures.with_label_values(&[consumer, kind]);
            }
            for kind in ["newer_version", "broken"] {
                self.unreadable.with_label_values(&[consumer, kind]);
            }
        }
    }
}
