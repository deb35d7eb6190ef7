//! The fetcher's metrics. Labels: `source` (configured names only) and small fixed sets.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, exponential_buckets,
};

#[derive(Debug, Clone)]
pub struct FetchMetrics {
    pub records: IntCounterVec,
    pub pages: IntCounterVec,
    pub bytes: IntCounterVec,
    pub chunks: IntCounterVec,
    pub http_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub runs: IntCounterVec,
    pub run_duration: HistogramVec,
    pub last_success: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub oversized: IntCounterVec,
    pub out_of_order: IntCounterVec,
    pub prior_lookups: IntCounterVec,
}

impl FetchMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["source"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let run_duration = HistogramVec::new(
            HistogramOpts::new(
                "tardis_fetch_run_duration_seconds",
                "Duration of a source's fetch run",
            )
            .buckets(exponential_buckets(0.1, 2.0, 14)?),
            &["source", "outcome"],
        )?;
        registry.register(Box::new(run_duration.clone()))?;
        Ok(Self {
            records: counter(
                "tardis_fetch_records_total",
                "Records published to the records stream",
                &["source"],
            )?,
            pages: counter(
                "tardis_fetch_pages_total",
                "Pages read from the source",
                &["source"],
            )?,
            bytes: counter(
                "tardis_fetch_bytes_total",
                "Response bytes read from the source",
                &["source"],
            )?,
            chunks: counter(
                "tardis_fetch_chunks_total",
                "Chunks published (acknowledged by JetStream)",
                &["source"],
            )?,
            http_errors: counter(
                "tardis_fetch_http_errors_total",
                "Failed HTTP requests by class (4xx, 5xx, timeout, connect)",
                &["source", "class"],
            )?,
            retries: counter(
                "tardis_fetch_retries_total",
                "Requests retried",
                &["source"],
            )?,
            runs: counter(
                "tardis_fetch_runs_total",
                "Fetch runs by outcome",
                &["source", "outcome"],
            )?,
            run_duration,
            last_success: gauge(
                "tardis_fetch_last_success_timestamp_seconds",
                "Unix time of the source's last successful run",
            )?,
            in_flight: gauge(
                "tardis_fetch_records_in_flight",
                "Records published but not yet written (fetch cursor ahead of the Postgres checkpoint), when known",
            )?,
            oversized: counter(
                "tardis_fetch_oversized_records_total",
                "Records larger than the NATS max payload, sent to the dead-letter stream",
                &["source"],
            )?,
            out_of_order: counter(
                "tardis_fetch_out_of_order_records_total",
                "Records that came after a record with a later (updated_at, id) in the same run (the cursor then moves only after a complete run)",
                &["source"],
            )?,
            prior_lookups: counter(
                "tardis_fetch_prior_lookups_total",
                "Records looked up for a stored enrichment of the same content, by result (found; none; failed: Postgres could not be read and the records go to the LLM at full price; first_load: not looked up, as the source had no stored record when the run started)",
                &["source", "result"],
            )?,
        })
    }
}
