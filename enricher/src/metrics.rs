//! The enricher's metrics. Labels: `source`, `model`, and small fixed sets.

use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    exponential_buckets,
};

#[derive(Debug, Clone)]
pub struct EnrichMetrics {
    pub records: IntCounterVec,
    pub chunks: IntCounterVec,
    pub llm_requests: IntCounterVec,
    pub llm_retries: IntCounterVec,
    pub llm_duration: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
    pub batch_size: HistogramVec,
    pub pending: IntGaugeVec,
    pub undeliverable: IntGaugeVec,
    pub unreadable: IntCounterVec,
}

impl EnrichMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        use tardis_common::metrics::register as reg;
        Ok(Self {
            records: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_enrich_records_total",
                        "Records enriched or dead-lettered",
                    ),
                    &["source", "model", "outcome"],
                )?,
            )?,
            chunks: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_enrich_chunks_total",
                        "Record chunks finished: acked after publishing, or handed back (nak)",
                    ),
                    &["source", "outcome"],
                )?,
            )?,
            llm_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_llm_requests_total",
                        "Chat-completions requests by HTTP status, timeout or connect error",
                    ),
                    &["model", "status"],
                )?,
            )?,
            llm_retries: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_llm_retries_total",
                        "LLM requests repeated, by reason",
                    ),
                    &["model", "reason"],
                )?,
            )?,
            llm_duration: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tardis_llm_request_duration_seconds",
                        "Latency of chat-completions requests",
                    )
                    .buckets(exponential_buckets(0.05, 2.0, 12)?),
                    &["model"],
                )?,
            )?,
            tokens: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_llm_tokens_total",
                        "Tokens used, by kind (prompt, completion)",
                    ),
                    &["source", "model", "kind"],
                )?,
            )?,
            cost: reg(
                registry,
                CounterVec::new(
                    Opts::new(
                        "tardis_llm_cost_usd_total",
                        "Cost of LLM usage in US dollars",
                    ),
                    &["source", "model"],
                )?,
            )?,
            batch_size: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("tardis_enrich_batch_records", "Records per LLM request")
                        .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]),
                    &["model"],
                )?,
            )?,
            pending: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tardis_consumer_pending",
                        "Messages waiting for a consumer plus delivered but unacknowledged (the autoscaling signal)",
                    ),
                    &["consumer"],
                )?,
            )?,
            unreadable: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_enrich_unreadable_total",
                        "Record chunks the enricher cannot read: newer_version (handed back until an enricher that reads it runs) or broken (dead-lettered)",
                    ),
                    &["kind"],
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
