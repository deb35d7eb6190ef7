//! The enricher's configuration: the common sections, the LLM endpoint and its limits, and the
//! enrichment (schema, prompt, batching, redelivery).

use std::time::Duration;

use tardis_common::Secret;
use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader};
use tardis_common::telemetry::TelemetrySettings;
use url::Url;

use crate::protocol::ResponseFormat;
use crate::schema::EnrichmentSchema;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub llm: LlmSettings,
    pub enrich: EnrichSettings,
}

/// The OpenAI-compatible chat-completions endpoint.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `PROCESSOR_ENDPOINT`: the full URL of `/chat/completions` (as in the legacy ConfigMap).
    pub endpoint: Url,
    /// `LLM_API_KEY`, or the legacy `HOLYSHEEP_API_KEY`; optional for local providers.
    pub api_key: Option<Secret<String>>,
    /// `LLM_MODEL`, default `deepseek-v3.2`.
    pub model: String,
    /// `LLM_BATCH_SIZE`: the most records per request; default: as many as the answer budget
    /// holds (`LLM_MAX_OUTPUT_TOKENS / LLM_MAX_TOKENS_PER_RECORD`, 40), so the instructions
    /// sent with every request are shared by as many records as a request can answer.
    pub batch_size: u32,
    /// `LLM_MAX_OUTPUT_TOKENS`: the largest `max_tokens` of a request (the provider's output
    /// limit), default 8192.
    pub max_output_tokens: u32,
    /// `LLM_MAX_INPUT_TOKENS`: estimated prompt tokens per request, default 8000.
    pub max_input_tokens: u32,
    /// `LLM_MAX_TOKENS_PER_RECORD`: answer budget per record (`max_tokens` scales with the batch), default 200.
    pub max_tokens_per_record: u32,
    /// `LLM_TIMEOUT`: one request, default 60 s.
    pub timeout: Duration,
    /// `LLM_TEMPERATURE`, default 0.2.
    pub temperature: f64,
    /// `LLM_RESPONSE_FORMAT`: `json_object` (default), `json_schema`, `none`.
    pub response_format: ResponseFormat,
    /// `LLM_RPM`, `LLM_TPM`: the provider's limits, for the whole fleet of enrichers sharing
    /// `TARDIS_PREFIX` (unset: the provider's announced limits, or found by backing off 429s).
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    /// `LLM_TPM_COUNTS_MAX_TOKENS`: the provider counts a request's `max_tokens` against
    /// `LLM_TPM` (OpenAI, Azure OpenAI do), default false: the calibrated expected answer.
    pub tpm_counts_max_tokens: bool,
    /// `LLM_CONCURRENCY`: requests in flight per replica, default 4.
    pub concurrency: u32,
    /// `LLM_PRICE_INPUT_PER_MTOK` / `LLM_PRICE_OUTPUT_PER_MTOK`: USD per million tokens, default 0.42.
    pub price_input: f64,
    pub price_output: f64,
    /// `LLM_DAILY_BUDGET_USD`: the fleet's LLM budget per day, exported as
    /// `tardis_llm_daily_budget_usd` for the alert `TardisLlmDailyBudgetExceeded` (the
    /// enrichers do not stop at it); unset: no budget.
    pub daily_budget_usd: Option<f64>,
    /// `LLM_MAX_ATTEMPTS`: tries per record whose result is invalid before it is dead-lettered, default 3.
    pub max_attempts: u32,
    /// `LLM_RETRY_DELAY`: backoff base for 429/5xx/timeouts, default 1 s (capped at 60 s).
    pub retry_delay: Duration,
    /// `LLM_RETRY_MAX_WAIT`: the longest `Retry-After` / `x-ratelimit-reset-*` honoured, default 60 s.
    pub retry_max_wait: Duration,
    /// `LLM_OUTAGE_HAND_BACK`: how long one batch is retried through an outage before its
    /// chunks are handed back to the stream, default 5 min.
    pub outage_hand_back: Duration,
}

/// How records are enriched and delivered.
#[derive(Debug, Clone)]
pub struct EnrichSettings {
    /// `ENRICH_SCHEMA`: the fields of an enrichment (JSON, see `schema`).
    pub schema: EnrichmentSchema,
    /// `ENRICH_PROMPT`: the system prompt template (`{fields}` is replaced by the schema).
    pub prompt: Option<String>,
    /// `ENRICH_MAX_DELIVER`: when set (> 0), a chunk delivered more often than this is given
    /// up on: its records are dead-lettered (every delivery counts, hand-backs on shutdown
    /// too). Unset or 0 (the default): no limit; JetStream redelivers until it is finished.
    pub max_deliver: Option<u32>,
    /// `ENRICH_MAX_IN_FLIGHT`: chunks held at once per replica, default 16.
    pub max_in_flight: u32,
    /// `ENRICH_MAX_REPLICAS`: the most replicas the autoscaler may run (its `maxReplicaCount`),
    /// default 10. The shared consumer lets `ENRICH_MAX_IN_FLIGHT` × this many chunks be
    /// unacknowledged at once, so every replica up to it gets work.
    pub max_replicas: u32,
    /// `ENRICH_BATCH_LINGER`: how long a partial batch waits for more records, default 100 ms.
    pub linger: Duration,
    /// `ENRICH_ACK_WAIT`: how long a chunk may go without an ack or an in-progress heartbeat
    /// before JetStream hands it to another replica, default 15 s. A live replica sends a
    /// heartbeat every third of it, however slow the LLM, so this bounds only how long a
    /// crashed replica's chunks wait.
    pub ack_wait: Duration,
    /// `ENRICH_SHUTDOWN_GRACE`: how long in-flight chunks may finish after SIGTERM before they
    /// are handed back, default 15 s.
    pub shutdown_grace: Duration,
}

impl LlmSettings {
    pub const DEFAULT_MODEL: &'static str = "deepseek-v3.2";

    pub fn read(r: &mut Reader<'_>) -> Self {
        let endpoint = match r.string("PROCESSOR_ENDPOINT") {
            None => {
                r.problem(
                    "PROCESSOR_ENDPOINT",
                    "is not set",
                    "set it to the full chat-completions URL, for example PROCESSOR_ENDPOINT=https://api.holysheep.ai/v1/chat/completions",
                );
                None
            }
            Some(_) => r.http_url(
                "PROCESSOR_ENDPOINT",
                "https://api.holysheep.ai/v1/chat/completions",
            ),
        };
        let float = |r: &mut Reader<'_>, key: &str, default: f64, min: f64, max: f64| -> f64 {
            match r.string(key) {
                None => default,
                Some(v) => match v.parse::<f64>() {
                    Ok(x) if x.is_finite() && x >= min && x <= max => x,
                    _ => {
                        r.problem(
                            key,
                            format!("must be a number from {min} to {max}, got {v:?}"),
                            format!("for example {key}={default}"),
                        );
                        default
                    }
                },
            }
        };
        let optional = |r: &mut Reader<'_>, key: &str| -> Option<u32> {
            r.string(key).is_some().then(|| r.positive_u32(key, 1))
        };
        let response_format = match r.string("LLM_RESPONSE_FORMAT").as_deref() {
            None | Some("json_object") => ResponseFormat::JsonObject,
            Some("json_schema") => ResponseFormat::JsonSchema,
            Some("none") => ResponseFormat::None,
            Some(other) => {
                r.problem(
                    "LLM_RESPONSE_FORMAT",
                    format!("unknown format {other:?}"),
                    "use json_object, json_schema or none",
                );
                ResponseFormat::JsonObject
            }
        };
        let max_tokens_per_record = r.positive_u32("LLM_MAX_TOKENS_PER_RECORD", 200);
        let max_output_tokens = r.positive_u32("LLM_MAX_OUTPUT_TOKENS", 8192);
        Self {
            endpoint: endpoint.unwrap_or_else(|| {
                Url::parse("http://127.0.0.1/chat/completions").expect("placeholder URL parses")
            }),
            api_key: r
                .secret("LLM_API_KEY")
                .or_else(|| r.secret("HOLYSHEEP_API_KEY")),
            model: r
                .string("LLM_MODEL")
                .unwrap_or_else(|| Self::DEFAULT_MODEL.to_string()),
            batch_size: r.positive_u32(
                "LLM_BATCH_SIZE",
                (max_output_tokens / max_tokens_per_record).max(1),
            ),
            max_output_tokens,
            max_input_tokens: r.positive_u32("LLM_MAX_INPUT_TOKENS", 8000),
            max_tokens_per_record,
            timeout: r.duration("LLM_TIMEOUT", Duration::from_secs(60)),
            temperature: float(r, "LLM_TEMPERATURE", 0.2, 0.0, 2.0),
            response_format,
            rpm: optional(r, "LLM_RPM"),
            tpm: optional(r, "LLM_TPM"),
            tpm_counts_max_tokens: r.bool("LLM_TPM_COUNTS_MAX_TOKENS", false),
            concurrency: r.positive_u32("LLM_CONCURRENCY", 4),
            price_input: float(r, "LLM_PRICE_INPUT_PER_MTOK", 0.42, 0.0, 1e6),
            price_output: float(r, "LLM_PRICE_OUTPUT_PER_MTOK", 0.42, 0.0, 1e6),
            daily_budget_usd: r
                .string("LLM_DAILY_BUDGET_USD")
                .is_some()
                .then(|| float(r, "LLM_DAILY_BUDGET_USD", 100.0, 0.0, 1e9)),
            max_attempts: r.positive_u32("LLM_MAX_ATTEMPTS", 3),
            retry_delay: r.duration("LLM_RETRY_DELAY", Duration::from_secs(1)),
            retry_max_wait: r.duration("LLM_RETRY_MAX_WAIT", Duration::from_secs(60)),
            outage_hand_back: r.duration("LLM_OUTAGE_HAND_BACK", Duration::from_secs(300)),
        }
    }
}

impl EnrichSettings {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let schema = match r.raw("ENRICH_SCHEMA") {
            None => EnrichmentSchema::default(),
            Some(text) => match EnrichmentSchema::parse(&text) {
                Ok(s) => s,
                Err(e) => {
                    r.problem(
                        "ENRICH_SCHEMA",
                        e,
                        r#"for example ENRICH_SCHEMA='{"sentiment":{"type":"string","enum":["positive","neutral","negative"]},"summary":{"type":"string","max_words":50}}'"#,
                    );
                    EnrichmentSchema::default()
                }
            },
        };
        Self {
            schema,
            prompt: r.raw("ENRICH_PROMPT"),
            max_deliver: Some(r.non_negative_u32("ENRICH_MAX_DELIVER", 0)).filter(|n| *n > 0),
            max_in_flight: r.positive_u32("ENRICH_MAX_IN_FLIGHT", 16),
            max_replicas: r.positive_u32("ENRICH_MAX_REPLICAS", 10),
            linger: r.duration("ENRICH_BATCH_LINGER", Duration::from_millis(100)),
            ack_wait: r.duration("ENRICH_ACK_WAIT", Duration::from_secs(15)),
            shutdown_grace: r.duration("ENRICH_SHUTDOWN_GRACE", Duration::from_secs(15)),
        }
    }
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let llm = LlmSettings::read(&mut r);
        let enrich = EnrichSettings::read(&mut r);
        r.finish()?;
        Ok(Self {
            common,
            llm,
            enrich,
        })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
