//! The enricher's metrics. Labels: `source`, `model`, and small fixed sets.

use prometheus::{
    CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, exponential_buckets,
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
    pub saved_usd: CounterVec,
    pub saved_calls: CounterVec,
    pub batch_size: HistogramVec,
    pub unreadable: IntCounterVec,
    pub budget_fleet: GaugeVec,
    pub budget_share: GaugeVec,
    pub budget_used: IntCounterVec,
    pub budget_wait: Histogram,
    pub budget_booked: Gauge,
    pub halted: IntGauge,
    pub spend_today: Gauge,
    pub paused: IntGauge,
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
                        "Records enriched (by the LLM), reused (a stored enrichment of the same content) or dead-lettered",
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
            saved_usd: reg(
                registry,
                CounterVec::new(
                    Opts::new(
                        "tardis_enrich_saved_usd_total",
                        "US dollars not spent: what the reused enrichments (records whose content was enriched before with the same prompt version and model) cost when they were made",
                    ),
                    &["source", "model"],
                )?,
            )?,
            saved_calls: reg(
                registry,
                CounterVec::new(
                    Opts::new(
                        "tardis_enrich_saved_calls_total",
                        "LLM requests not made thanks to reused enrichments (reused records / LLM_BATCH_SIZE)",
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
            budget_fleet: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tardis_llm_budget_fleet_per_minute",
                        "The LLM budget of the whole enricher fleet in force now, per minute (LLM_RPM/LLM_TPM less headroom, lowered after 429s); absent when unlimited",
                    ),
                    &["kind"],
                )?,
            )?,
            budget_share: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tardis_llm_budget_share",
                        "This replica's share of the fleet's budget: its grants in the last minute over the fleet's budget per minute",
                    ),
                    &["kind"],
                )?,
            )?,
            budget_used: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tardis_llm_budget_granted_total",
                        "Requests and tokens this replica was granted from the fleet's budget",
                    ),
                    &["kind"],
                )?,
            )?,
            budget_wait: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tardis_llm_budget_wait_seconds",
                        "How long a request waited for its slot in the fleet's budget",
                    )
                    .buckets(vec![0.0, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0]),
                )?,
            )?,
            budget_booked: reg(
                registry,
                Gauge::with_opts(Opts::new(
                    "tardis_llm_budget_booked_seconds",
                    "How far ahead the fleet's budget is booked, as of this replica's last write to it: above zero, the provider's limits (not the replica count) bound throughput",
                ))?,
            )?,
            halted: reg(
                registry,
                IntGauge::with_opts(Opts::new(
                    "tardis_enrich_halted",
                    "1 while this enricher is halted because the LLM endpoint refuses it (401/403/404, or answers that are not completions): it takes no work until restarted with a fixed configuration",
                ))?,
            )?,
            spend_today: reg(
                registry,
                Gauge::with_opts(Opts::new(
                    "tardis_llm_spend_today_usd",
                    "The fleet's LLM spend since 00:00 UTC in US dollars, as this replica last saw it",
                ))?,
            )?,
            paused: reg(
                registry,
                IntGauge::with_opts(Opts::new(
                    "tardis_enrich_paused",
                    "1 while this enricher takes no work because the fleet's spend today reached LLM_DAILY_BUDGET_USD (it resumes at 00:00 UTC, or when restarted with a larger budget)",
                ))?,
            )?,
        })
    }

    /// Exports `LLM_DAILY_BUDGET_USD` as `tardis_llm_daily_budget_usd` (only when it is set:
    /// a series at 0 would read as a budget of nothing).
    pub fn register_daily_budget(registry: &Registry, usd: f64) -> prometheus::Result<()> {
        let gauge = tardis_common::metrics::register(
            registry,
            Gauge::with_opts(Opts::new(
                "tardis_llm_daily_budget_usd",
                "LLM_DAILY_BUDGET_USD: the fleet's LLM budget per day in US dollars (absent when unset)",
            ))?,
        )?;
        gauge.set(usd);
        Ok(())
    }

    /// Creates, at zero, the series of the counters whose labels are known at start-up, so
    /// that their first event is an increase that alerts see.
    pub fn precreate(&self, model: &str) {
        for kind in ["newer_version", "broken"] {
            self.unreadable.with_label_values(&[kind]);
        }
        for status in ["200", "429"] {
            self.llm_requests.with_label_values(&[model, status]);
        }
        self.halted.set(0);
        self.paused.set(0);
    }
}
