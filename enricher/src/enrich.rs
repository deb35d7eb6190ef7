//! Enriching one batch of records: the request, validation per record, and what happens to
//! the records that fail.
//!
//! * 429, 5xx, timeouts, connection errors: the same batch is retried with backoff (at least
//!   the server's `Retry-After` / `x-ratelimit-reset-*`, at most `LLM_RETRY_MAX_WAIT`) — an
//!   outage delays data, it never dead-letters it. After three failures in a row the circuit
//!   opens: the puller stops taking new work until a request succeeds. A batch still failing
//!   after `LLM_OUTAGE_HAND_BACK` is handed back to the stream (its chunks are nak'd with a
//!   delay), so no loop holds work forever.
//! * 401/403, a 404-like answer, or three 2xx answers in a row that are not chat completions:
//!   the processor halts (no ack, no dead letter; `/ready` false; chunks handed back).
//! * A whole-batch problem (invalid JSON, `finish_reason: "length"`, a 400/413/422): the batch is
//!   split in halves and each half retried, down to single records, so one poison record cannot
//!   drag its neighbours down. Only a record alone counts these against its attempts.
//! * A record whose own result is missing, invalid or duplicated counts one attempt and is
//!   retried with the other failures; after `LLM_MAX_ATTEMPTS` it is dead-lettered with the
//!   reason. Ids the model invents are ignored.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::value::RawValue;
use tardis_common::backoff::Backoff;
use tardis_common::messages::Usage;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::budget::Cost;
use crate::config::LlmSettings;
pub use crate::health::LlmHealth;
use crate::llm::{CallError, Complete};
use crate::metrics::EnrichMetrics;
use crate::protocol::{self, Answer, ResponseFormat};
use crate::schema::EnrichmentSchema;

/// Answers in a row that are 2xx but not a chat completion before the endpoint is taken as
/// misconfigured and the enricher halts.
pub const NOT_A_COMPLETION_LIMIT: u32 = 3;

/// Where a record sits: its chunk and its position in the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ItemKey {
    pub chunk: u64,
    pub index: usize,
}

/// A record waiting for enrichment.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: ItemKey,
    pub source: String,
    pub id: String,
    pub payload: Box<RawValue>,
    pub tokens: u32,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Every distinct problem seen so far, for the dead letter's reason.
    pub errors: Vec<String>,
}

impl Item {
    fn failed(&mut self, reason: String) {
        self.attempts += 1;
        if !self.errors.contains(&reason) {
            self.errors.push(reason.clone());
        }
        self.last_error = Some(reason);
    }
}

/// What became of a record.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `enrichment`: the validated fields, as the text the enriched chunk carries.
    Enriched {
        enrichment: Box<RawValue>,
        usage: Usage,
    },
    Dead {
        reason: String,
        attempts: u32,
        last_error: Option<String>,
    },
    /// A stored enrichment of the same content (same prompt version and model), not sent to
    /// the LLM: made at `enriched_at`, for `saved_usd`.
    Reused {
        enrichment: Box<RawValue>,
        enriched_at: chrono::DateTime<chrono::Utc>,
        saved_usd: f64,
    },
}

/// Enriches batches.
#[derive(Debug)]
pub struct BatchProcessor {
    pub client: Arc<dyn Complete>,
    pub schema: EnrichmentSchema,
    pub system_prompt: String,
    pub settings: LlmSettings,
    pub metrics: EnrichMetrics,
    pub health: Arc<LlmHealth>,
    /// Fires when in-flight work must be abandoned (shutdown grace over).
    pub stop: CancellationToken,
    /// The fleet's spend today, to which every answered request adds its cost.
    pub spend: Option<Arc<crate::spend::DailySpend>>,
}

/// The result of a batch: outcomes, and items abandoned (halt or stop) that get none.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outcomes: Vec<(ItemKey, String, Outcome)>,
    pub abandoned: Vec<Item>,
    /// The abandoned items' chunks must go back to the stream now (an outage), not at halt
    /// or shutdown.
    pub hand_back: bool,
}

enum Call {
    Answer(Answer),
    Rejected(String),
    /// Halted or shutting down: the batch gets no outcome.
    Stopped,
    /// An outage outlasted `LLM_OUTAGE_HAND_BACK`: the batch goes back to the stream.
    HandBack,
}

impl BatchProcessor {
    /// The user message and request body for `items`.
    pub fn body(&self, items: &[Item]) -> (protocol::RequestBody, Cost) {
        let records: Vec<(&str, &RawValue)> = items
            .iter()
            .map(|i| (i.id.as_str(), i.payload.as_ref()))
            .collect();
        let user = protocol::user_message(&records);
        let max_tokens = self
            .settings
            .max_tokens_per_record
            .saturating_mul(items.len() as u32)
            .saturating_add(50)
            .min(self.settings.max_output_tokens);
        let body = protocol::request_body(
            &self.settings.model,
            &self.system_prompt,
            &user,
            self.settings.temperature,
            max_tokens,
            self.settings.response_format,
            &self.schema,
        );
        // What the fleet's budget charges for it (calibrated there from the provider's usage).
        let cost = Cost {
            prompt_estimate: protocol::estimate_tokens(&self.system_prompt)
                .saturating_add(protocol::estimate_tokens(&user)),
            records: items.len() as u32,
            max_tokens,
        };
        (body, cost)
    }

    async fn call(&self, items: &[Item]) -> Call {
        let (body, cost) = self.body(items);
        let backoff = Backoff::new(
            self.settings.retry_delay,
            std::time::Duration::from_secs(60),
        )
        .with_max_wait(self.settings.retry_max_wait);
        let model = self.settings.model.as_str();
        let mut attempt = 0u32;
        let mut not_completions = 0u32;
        let started = tokio::time::Instant::now();
        loop {
            if self.health.is_halted() || self.stop.is_cancelled() {
                return Call::Stopped;
            }
            let result = tokio::select! {
                r = self.client.complete(&body, cost) => r,
                () = self.stop.cancelled() => return Call::Stopped,
                () = self.health.halt.cancelled() => return Call::Stopped,
            };
            match result {
                Ok(answer) => {
                    self.health.success();
                    return Call::Answer(answer);
                }
                Err(CallError::Transient {
                    rate_limited,
                    reason,
                    retry_after,
                }) => {
                    self.health.failure();
                    if started.elapsed() >= self.settings.outage_hand_back {
                        // An outage: hand the batch back rather than hold it here forever.
                        warn!(%reason, attempt, records = items.len(), "the endpoint kept failing for LLM_OUTAGE_HAND_BACK; handing the batch back");
                        return Call::HandBack;
                    }
                    let delay = backoff.delay_honouring(attempt, retry_after);
                    attempt = attempt.saturating_add(1);
                    let kind = if rate_limited { "429" } else { "transient" };
                    self.metrics
                        .llm_retries
                        .with_label_values(&[model, kind])
                        .inc();
                    warn!(%reason, attempt, retry_in_ms = delay.as_millis() as u64, records = items.len(), "LLM request failed, retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.stop.cancelled() => return Call::Stopped,
                        () = self.health.halt.cancelled() => return Call::Stopped,
                    }
                }
                Err(e @ (CallError::Unauthorized { .. } | CallError::Misconfigured { .. })) => {
                    self.health.halt_with(e.to_string());
                    return Call::Stopped;
                }
                Err(e @ CallError::NotACompletion { .. }) => {
                    self.health.failure();
                    not_completions += 1;
                    self.metrics
                        .llm_retries
                        .with_label_values(&[model, "not_a_completion"])
                        .inc();
                    if not_completions >= NOT_A_COMPLETION_LIMIT {
                        // The endpoint's fault: halt (nothing acked, nothing dead-lettered).
                        self.health.halt_with(e.to_string());
                        return Call::Stopped;
                    }
                    let delay = backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    warn!(error = %e, attempt, "the answer is not a chat completion, retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.stop.cancelled() => return Call::Stopped,
                        () = self.health.halt.cancelled() => return Call::Stopped,
                    }
                }
                Err(e @ CallError::Rejected { .. }) => return Call::Rejected(e.to_string()),
            }
        }
    }

    /// Enriches `items`, retrying and splitting as described in the module docs. Their ids
    /// must be distinct, as a batch's are ([`crate::batching`] starts a new batch at a
    /// repeated id): an answer's results are matched to the records by id.
    pub async fn process(&self, items: Vec<Item>) -> BatchResult {
        debug_assert!(
            {
                let mut ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
                ids.sort_unstable();
                ids.windows(2).all(|w| w[0] != w[1])
            },
            "a batch's ids are distinct"
        );
        let mut result = BatchResult::default();
        let mut queue: VecDeque<Vec<Item>> = VecDeque::from([items]);
        let model = self.settings.model.clone();
        while let Some(mut batch) = queue.pop_front() {
            if batch.is_empty() {
                continue;
            }
            self.metrics
                .batch_size
                .with_label_values(&[&model])
                .observe(batch.len() as f64);
            let answer = match self.call(&batch).await {
                Call::Stopped => {
                    result.abandoned.extend(batch);
                    result.abandoned.extend(queue.into_iter().flatten());
                    return result;
                }
                Call::HandBack => {
                    result.abandoned.extend(batch);
                    result.abandoned.extend(queue.into_iter().flatten());
                    result.hand_back = true;
                    return result;
                }
                Call::Rejected(reason) => {
                    self.whole_batch_failed(batch, reason, &mut queue, &mut result);
                    continue;
                }
                Call::Answer(a) => a,
            };
            if let Some(spend) = &self.spend {
                // Every answer is paid for, whatever becomes of it.
                let usd = (answer.prompt_tokens as f64 * self.settings.price_input
                    + answer.completion_tokens as f64 * self.settings.price_output)
                    / 1e6;
                spend.record(usd, chrono::Utc::now()).await;
            }
            if answer.finish_reason.as_deref() == Some("length") {
                self.metrics
                    .llm_retries
                    .with_label_values(&[&model, "truncated"])
                    .inc();
                self.whole_batch_failed(
                    batch,
                    "the answer was truncated (finish_reason length)".into(),
                    &mut queue,
                    &mut result,
                );
                continue;
            }
            let content: std::borrow::Cow<'_, str> = match (&answer.content, &answer.refusal) {
                (Some(content), _) => content.as_str().into(),
                (None, Some(refusal)) => format!("refused: {refusal}").into(),
                (None, None) => "".into(),
            };
            let results = match protocol::results(&content, &self.schema) {
                Ok(r) => r,
                Err(reason) => {
                    self.metrics
                        .llm_retries
                        .with_label_values(&[&model, "invalid_json"])
                        .inc();
                    self.whole_batch_failed(batch, reason, &mut queue, &mut result);
                    continue;
                }
            };
            let ids: Vec<&str> = batch.iter().map(|i| i.id.as_str()).collect();
            let (matched, unknown) = protocol::match_results(&ids, results, &self.schema);
            if !unknown.is_empty() {
                warn!(unknown = ?unknown, "the answer has results for ids that were not asked; ignored");
            }
            let shares = self.usage_shares(&batch, &answer);
            let mut failed = Vec::new();
            let size = batch.len();
            for ((item, usage), matched) in batch.drain(..).zip(shares).zip(matched) {
                match matched {
                    Ok(enrichment) => result.outcomes.push((
                        item.key,
                        item.source,
                        Outcome::Enriched { enrichment, usage },
                    )),
                    Err(reason) => {
                        let mut item = item;
                        item.failed(reason);
                        failed.push(item);
                    }
                }
            }
            self.retry_or_bury(failed, size, &mut queue, &mut result);
        }
        result
    }

    /// Failures of records' own results: count an attempt each, retry together, or bury.
    fn retry_or_bury(
        &self,
        failed: Vec<Item>,
        batch_size: usize,
        queue: &mut VecDeque<Vec<Item>>,
        result: &mut BatchResult,
    ) {
        if failed.is_empty() {
            return;
        }
        let all_failed = failed.len() == batch_size;
        for item in &failed {
            tracing::debug!(record_id = %item.id, attempts = item.attempts, error = item.last_error.as_deref().unwrap_or(""), "record result rejected; retrying it");
        }
        let (dead, retry): (Vec<Item>, Vec<Item>) = failed
            .into_iter()
            .partition(|i| i.attempts >= self.settings.max_attempts);
        for item in dead {
            self.bury(item, result);
        }
        if retry.len() > 1 && all_failed {
            let mut first = retry;
            let second = first.split_off(first.len() / 2);
            queue.push_back(first);
            queue.push_back(second);
        } else if !retry.is_empty() {
            queue.push_back(retry);
        }
    }

    /// A problem with the batch as a whole: split it; a record alone counts an attempt.
    fn whole_batch_failed(
        &self,
        mut batch: Vec<Item>,
        reason: String,
        queue: &mut VecDeque<Vec<Item>>,
        result: &mut BatchResult,
    ) {
        if batch.len() > 1 {
            let second = batch.split_off(batch.len() / 2);
            queue.push_back(batch);
            queue.push_back(second);
            return;
        }
        let Some(mut item) = batch.pop() else { return };
        item.failed(reason);
        if item.attempts >= self.settings.max_attempts {
            self.bury(item, result);
        } else {
            queue.push_back(vec![item]);
        }
    }

    fn bury(&self, item: Item, result: &mut BatchResult) {
        let last = item.last_error.clone().unwrap_or_default();
        warn!(source = %item.source, record_id = %item.id, attempts = item.attempts, error = %last, "record could not be enriched; dead-lettering it");
        result.outcomes.push((
            item.key,
            item.source.clone(),
            Outcome::Dead {
                reason: format!(
                    "no valid enrichment after {} attempts: {}",
                    item.attempts,
                    item.errors.join("; ")
                ),
                attempts: item.attempts,
                last_error: item.last_error,
            },
        ));
    }

    /// Each record's share of the batch's tokens (prompt by size, completion evenly) and cost.
    fn usage_shares(&self, batch: &[Item], answer: &Answer) -> Vec<Usage> {
        let total_weight: u64 = batch
            .iter()
            .map(|i| u64::from(i.tokens.max(1)))
            .sum::<u64>()
            .max(1);
        let n = batch.len() as u64;
        let mut prompt_left = answer.prompt_tokens;
        let mut completion_left = answer.completion_tokens;
        batch
            .iter()
            .enumerate()
            .map(|(k, item)| {
                let last = k as u64 + 1 == n;
                let prompt = if last {
                    prompt_left
                } else {
                    answer.prompt_tokens * u64::from(item.tokens.max(1)) / total_weight
                };
                let completion = if last {
                    completion_left
                } else {
                    answer.completion_tokens / n
                };
                prompt_left -= prompt.min(prompt_left);
                completion_left -= completion.min(completion_left);
                let cost_usd = (prompt as f64 * self.settings.price_input
                    + completion as f64 * self.settings.price_output)
                    / 1e6;
                Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    cost_usd,
                }
            })
            .collect()
    }
}

impl ResponseFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema => "json_schema",
            ResponseFormat::None => "none",
        }
    }
}

#[cfg(test)]
#[path = "enrich_tests.rs"]
mod tests;
