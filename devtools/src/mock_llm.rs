//! mock-llm: an OpenAI-compatible `POST /v1/chat/completions` that follows Tardis's wire
//! protocol (see `enricher::protocol`): the user message is `{"<id>": <record>, ...}`, the
//! answer's content is `{"results": [{"id", "sentiment", "category", "summary"}, ...]}`.
//!
//! Enrichment is deterministic, from the record's text: sentiment from keywords, category from
//! the record's shape, summary from its first words. `usage` counts about four characters per
//! token. Switches (flags, or `PUT /admin/config` at run time):
//!
//! * `latency_ms`; `rpm` / `tpm` limits over a sliding minute, answered with 429,
//!   `Retry-After` and `x-ratelimit-*` headers;
//! * fractions of requests answered with a 500, invalid JSON, a truncated answer
//!   (`finish_reason: "length"`), one id dropped, one id invented;
//! * `poison`: records whose JSON contains this text always get an invalid result (only for
//!   their first `poison_calls` calls, when that is set);
//! * `api_key`: when set, `Authorization: Bearer <key>` is required (401 otherwise).
//!
//! `GET /admin/stats` reports requests, 429s, 500s; `records_received` (every record of every
//! request), `distinct_records` (by content, so records of two sources that share an id count
//! apart) and `records_sent_again` (the difference: redeliveries and retries); and
//! `calls_per_id`, calls by record id across all sources.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// mock-llm's switches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    pub latency_ms: u64,
    /// Requests per minute allowed; more get 429.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute allowed; more get 429.
    pub tpm: Option<u64>,
    /// The sliding window `rpm` and `tpm` count over, in seconds (default 60). Tests shorten
    /// it to see a minute's behaviour in seconds: `rpm: 20` over 10 s is 120 a minute.
    pub window_secs: Option<u64>,
    /// Fractions of requests, in [0, 1].
    pub fail_rate: f64,
    pub invalid_json_rate: f64,
    pub truncate_rate: f64,
    pub drop_id_rate: f64,
    pub invent_id_rate: f64,
    /// Records containing this text always get an invalid result.
    pub poison: Option<String>,
    /// When set, `poison` holds only for a record's first this many calls (then it is cured).
    pub poison_calls: Option<u64>,
    /// When set, `Authorization: Bearer <api_key>` is required.
    pub api_key: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    unauthorized: u64,
    throttled: u64,
    failed: u64,
    served: u64,
    tokens: u64,
    /// Of served requests: prompt and completion tokens; characters of the prompt (every
    /// message's content), of the records' own JSON in it, and of each record's own result.
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_chars: u64,
    record_chars: u64,
    result_chars: u64,
    records_served: u64,
    calls_per_id: HashMap<String, u64>,
    /// Calls per record, keyed by a hash of the record's JSON: distinct records of different
    /// sources that share an id are counted apart.
    calls_per_record: HashMap<u64, u64>,
    window: VecDeque<(tokio::time::Instant, u64)>,
    /// The most requests accepted within one window.
    peak_window_requests: u64,
    /// Completion tokens served in the last minute (prompt tokens are in `window`).
    completions: VecDeque<(tokio::time::Instant, u64)>,
    last_request: Option<Arc<Value>>,
}

/// Server state.
#[derive(Debug)]
pub struct Mock {
    config: Mutex<MockConfig>,
    counters: Mutex<Counters>,
}

impl Mock {
    pub fn new(config: MockConfig) -> Self {
        Self {
            config: Mutex::new(config),
            counters: Mutex::new(Counters::default()),
        }
    }

    pub fn config(&self) -> MockConfig {
        self.config.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set_config(&self, config: MockConfig) {
        if let Ok(mut c) = self.config.lock() {
            *c = config;
        }
    }

    /// Requests received, 429s sent, and calls per record id.
    pub fn stats(&self) -> Value {
        let c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        json!({
            "requests": c.requests,
            "unauthorized": c.unauthorized,
            "throttled": c.throttled,
            "failed": c.failed,
            "served": c.served,
            "tokens": c.tokens,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "prompt_chars": c.prompt_chars,
            "record_chars": c.record_chars,
            "result_chars": c.result_chars,
            "records_served": c.records_served,
            "peak_window_requests": c.peak_window_requests,
            "calls_per_id": c.calls_per_id,
            "records_received": c.calls_per_record.values().sum::<u64>(),
            "distinct_records": c.calls_per_record.len(),
            "records_sent_again": c.calls_per_record.values().map(|n| n - 1).sum::<u64>(),
            "last_request": c.last_request.as_deref(),
        })
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Whether request number `n` falls in `rate` (deterministic).
fn roll(n: u64, salt: u64, rate: f64) -> bool {
    rate > 0.0 && (splitmix(n ^ salt) % 10_000) < (rate * 10_000.0) as u64
}

fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| text_of(x, out)),
        Value::Object(o) => o.values().for_each(|x| text_of(x, out)),
        _ => {}
    }
}

const POSITIVE: [&str; 12] = [
    "love",
    "great",
    "beats",
    "raises",
    "rise",
    "solved",
    "buyback",
    "launches",
    "saves",
    "good",
    "excellent",
    "happy",
];
const NEGATIVE: [&str; 12] = [
    "fail",
    "falls",
    "warning",
    "investigation",
    "confusing",
    "logging me out",
    "error",
    "bad",
    "broken",
    "slow",
    "angry",
    "crash",
];

/// The deterministic enrichment of one record.
pub fn enrich(record: &Value) -> Value {
    let mut text = String::new();
    text_of(record, &mut text);
    let lower = text.to_lowercase();
    let score = POSITIVE.iter().filter(|w| lower.contains(*w)).count() as i64
        - NEGATIVE.iter().filter(|w| lower.contains(*w)).count() as i64;
    let sentiment = match score {
        s if s > 0 => "positive",
        s if s < 0 => "negative",
        _ => "neutral",
    };
    let category = if record.get("symbol").is_some() {
        "market".to_string()
    } else if let Some(e) = record.get("event").and_then(Value::as_str) {
        e.to_string()
    } else {
        "general".to_string()
    };
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| !w.contains("T") || w.len() < 20)
        .take(12)
        .collect();
    json!({"sentiment": sentiment, "category": category, "summary": words.join(" ")})
}

/// A correct answer to a wire-protocol request (no faults), as the full completion JSON.
pub fn good_answer(request: &Value) -> Value {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let input: Value = user
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or(Value::Null);
    let results: Vec<Value> = input_records(&input)
        .into_iter()
        .map(|(id, record)| {
            let mut e = enrich(&record);
            e["id"] = id;
            e
        })
        .collect();
    let content = json!({"results": results}).to_string();
    json!({
        "id": "chatcmpl-good", "object": "chat.completion", "created": 0, "model": request.get("model").cloned().unwrap_or(json!("mock")),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    })
}

/// The `(id, record)` pairs of a user message: `{"<id>": <record>, ...}` (the protocol), or
/// the older `{"records": [{"id", "record"}, ...]}`.
pub fn input_records(input: &Value) -> Vec<(Value, Value)> {
    record_refs(input)
        .into_iter()
        .map(|(id, record)| (id, record.clone()))
        .collect()
}

/// [`input_records`] without copying the records.
fn record_refs(input: &Value) -> Vec<(Value, &Value)> {
    static NULL: Value = Value::Null;
    if let Some(list) = input.get("records").and_then(Value::as_array) {
        return list
            .iter()
            .map(|r| {
                (
                    r.get("id").cloned().unwrap_or(Value::Null),
                    r.get("record").unwrap_or(&NULL),
                )
            })
            .collect();
    }
    input
        .as_object()
        .map(|records| {
            records
                .iter()
                .map(|(id, record)| (Value::String(id.clone()), record))
                .collect()
        })
        .unwrap_or_default()
}

/// Tokens of a text of `chars` bytes: a quarter, rounded up.
fn tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

fn api_error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

async fn completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let body = Arc::new(body);
    let config = mock.config();
    if let Some(key) = &config.api_key {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}"));
        if !ok {
            mock.counters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unauthorized += 1;
            return api_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided",
                "invalid_request_error",
            );
        }
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let messages: &[Value] = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    // The prompt is every message's content joined by newlines: its length, without the copy.
    let (contents, content_chars) = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .fold((0usize, 0usize), |(n, len), c| (n + 1, len + c.len()));
    let prompt_chars = content_chars + contents.saturating_sub(1);
    let Some(user) = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "no user message",
            "invalid_request_error",
        );
    };
    let Some(input) = user
        .get("content")
        .and_then(Value::as_str)
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
    else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "the user message is not the records JSON document",
            "invalid_request_error",
        );
    };
    let records = record_refs(&input);
    // Each record's JSON, once: counted, hashed, searched for the poison.
    let record_texts: Vec<String> = records.iter().map(|(_, r)| r.to_string()).collect();
    let prompt_tokens = tokens(prompt_chars);

    // Count, rate-limit, and pick this request's faults.
    let now = tokio::time::Instant::now();
    let window = Duration::from_secs(config.window_secs.unwrap_or(60).max(1));
    let (n, limited) = {
        let mut c = mock
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.requests += 1;
        c.last_request = Some(body.clone());
        let n = c.requests;
        while c
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            c.window.pop_front();
        }
        while c
            .completions
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            c.completions.pop_front();
        }
        let used_requests = c.window.len() as u64;
        let used_tokens: u64 = c
            .window
            .iter()
            .chain(c.completions.iter())
            .map(|(_, t)| t)
            .sum();
        let over_rpm = config.rpm.is_some_and(|r| used_requests + 1 > r);
        let over_tpm = config.tpm.is_some_and(|t| used_tokens + prompt_tokens > t);
        let limited = if over_rpm || over_tpm {
            c.throttled += 1;
            let reset = c.window.front().map_or(Duration::from_secs(1), |(t, _)| {
                window.saturating_sub(now.duration_since(*t))
            });
            Some((reset, used_requests, used_tokens))
        } else {
            c.window.push_back((now, prompt_tokens));
            c.peak_window_requests = c.peak_window_requests.max(c.window.len() as u64);
            for ((id, _), content) in records.iter().zip(&record_texts) {
                let id = id
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| id.to_string());
                *c.calls_per_id.entry(id).or_default() += 1;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(content, &mut h);
                *c.calls_per_record
                    .entry(std::hash::Hasher::finish(&h))
                    .or_default() += 1;
            }
            None
        };
        (n, limited)
    };
    // Latency after counting: a request is "received" as soon as it arrives.
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }
    if let Some((reset, used_requests, used_tokens)) = limited {
        let mut resp = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Rate limit reached",
            "rate_limit_exceeded",
        );
        let h = resp.headers_mut();
        let secs = reset.as_secs_f64().ceil().max(1.0) as u64;
        h.insert("retry-after", secs.into());
        if let Some(r) = config.rpm {
            h.insert("x-ratelimit-limit-requests", r.into());
            h.insert(
                "x-ratelimit-remaining-requests",
                r.saturating_sub(used_requests).into(),
            );
            h.insert(
                "x-ratelimit-reset-requests",
                format!("{secs}s").parse().expect("header value"),
            );
        }
        if let Some(t) = config.tpm {
            h.insert("x-ratelimit-limit-tokens", t.into());
            h.insert(
                "x-ratelimit-remaining-tokens",
                t.saturating_sub(used_tokens).into(),
            );
            h.insert(
                "x-ratelimit-reset-tokens",
                format!("{secs}s").parse().expect("header value"),
            );
        }
        return resp;
    }
    if roll(n, 1, config.fail_rate) {
        mock.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed += 1;
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request",
            "server_error",
        );
    }
    let mut results: Vec<Value> = records
        .iter()
        .zip(&record_texts)
        .map(|((id, record), text)| {
            let poisoned = config.poison.as_deref().is_some_and(|p| text.contains(p))
                && config.poison_calls.is_none_or(|n| {
                    let key = id
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| id.to_string());
                    let calls = mock
                        .counters
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .calls_per_id
                        .get(&key)
                        .copied()
                        .unwrap_or(0);
                    calls <= n
                });
            let mut e = if poisoned {
                json!({"sentiment": "ecstatic", "category": 7})
            } else {
                enrich(record)
            };
            e["id"] = id.clone();
            e
        })
        .collect();
    if roll(n, 2, config.drop_id_rate) && !results.is_empty() {
        results.remove(splitmix(n) as usize % results.len());
    }
    if roll(n, 3, config.invent_id_rate) {
        let mut e = enrich(&json!({}));
        e["id"] = json!(format!("invented-{n}"));
        results.push(e);
    }
    let record_chars: usize = record_texts.iter().map(String::len).sum();
    let answered = results.len();
    let mut content = json!({"results": results}).to_string();
    // Each result's own JSON is in `{"results":[r1,r2,…]}`: its length, without serializing
    // each again.
    let result_chars = content.len() - r#"{"results":[]}"#.len() - answered.saturating_sub(1);
    let mut finish = "stop";
    if roll(n, 4, config.invalid_json_rate) {
        content = format!(
            "Sure! Here are the results: {}",
            &content[..content.len() / 2]
        );
    } else if roll(n, 5, config.truncate_rate) {
        content.truncate(content.len() / 2);
        finish = "length";
    } else if n % 2 == 0 {
        content = format!("```json\n{content}\n```");
    }
    let completion_tokens = tokens(content.len());
    {
        let mut c = mock
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.served += 1;
        c.tokens += prompt_tokens + completion_tokens;
        c.prompt_tokens += prompt_tokens;
        c.completion_tokens += completion_tokens;
        c.prompt_chars += prompt_chars as u64;
        c.record_chars += record_chars as u64;
        c.result_chars += result_chars as u64;
        c.records_served += records.len() as u64;
        c.completions
            .push_back((tokio::time::Instant::now(), completion_tokens));
    }
    Json(json!({
        "id": format!("chatcmpl-mock-{n}"),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response()
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<Value> {
    Json(mock.stats())
}

async fn set_config(State(mock): State<Arc<Mock>>, Json(config): Json<MockConfig>) -> StatusCode {
    mock.set_config(config);
    StatusCode::NO_CONTENT
}

pub fn router(mock: Arc<Mock>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/chat/completions", post(completions))
        .route("/admin/stats", get(stats))
        .route("/admin/config", put(set_config))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(mock)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    mock: Arc<Mock>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(mock))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A mock-llm on a free local port, in the background.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub mock: Arc<Mock>,
    shutdown: CancellationToken,
}

impl Running {
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mock = Arc::new(Mock::new(config));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, mock.clone(), shutdown.clone()));
        Ok(Self {
            addr,
            mock,
            shutdown,
        })
    }

    /// The full chat-completions URL (what `PROCESSOR_ENDPOINT` takes).
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrichment_follows_the_text() {
        let e = enrich(&json!({"symbol": "ACME", "headline": "ACME beats earnings expectations"}));
        assert_eq!(e["sentiment"], "positive");
        assert_eq!(e["category"], "market");
        let e = enrich(&json!({"event": "support_ticket", "message": "Checkout failed twice"}));
        assert_eq!(e["sentiment"], "negative");
        assert_eq!(e["category"], "support_ticket");
        assert!(e["summary"].as_str().unwrap().split_whitespace().count() <= 12);
    }

    #[tokio::test]
    async fn counted_characters_and_tokens_are_those_of_the_texts() {
        let mock = Arc::new(Mock::new(MockConfig::default()));
        let records = json!({"a": {"headline": "ACME beats"}, "b": {"message": "Checkout \"failed\""}, "c": {}});
        let system = "Enrich each record.";
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": records.to_string()},
        ]});
        let resp = completions(State(mock.clone()), HeaderMap::new(), Json(body)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        let results: Value = serde_json::from_str(content).unwrap();
        let results = results["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        // The prompt: the messages' contents joined by a newline.
        let prompt = format!("{system}\n{records}");
        let stats = mock.stats();
        assert_eq!(stats["prompt_chars"], prompt.len());
        assert_eq!(stats["prompt_tokens"], prompt.len().div_ceil(4));
        assert_eq!(stats["completion_tokens"], content.len().div_ceil(4));
        assert_eq!(
            stats["result_chars"],
            results.iter().map(|r| r.to_string().len()).sum::<usize>()
        );
        assert_eq!(
            stats["record_chars"],
            records
                .as_object()
                .unwrap()
                .values()
                .map(|r| r.to_string().len())
                .sum::<usize>()
        );
    }

    #[test]
    fn rolls_are_deterministic_and_near_their_rate() {
        let hits = (0..10_000).filter(|n| roll(*n, 1, 0.1)).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|n| roll(n, 1, 0.0)));
        assert_eq!(roll(42, 1, 0.5), roll(42, 1, 0.5));
    }
}
