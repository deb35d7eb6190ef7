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
    pub checkpoint_age: GaugeVec,
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
            checkpoint_age: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tardis_writer_checkpoint_age_seconds",
                        "Age of the source's written checkpoint (now minus the cursor's updated_at)",
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
}
