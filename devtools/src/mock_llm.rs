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
//! * `poison`: records whose JSON, as sent, contains this text always get an invalid result (only for
//!   their first `poison_calls` calls, when that is set);
//! * `api_key`: when set, `Authorization: Bearer <key>` is required (401 otherwise).
//!
//! `GET /admin/stats` reports requests, 429s, 500s; `records_received` (every record of every
//! request), `distinct_records` (by content, so records of two sources that share an id count
//! apart) and `records_sent_again` (the difference: redeliveries and retries); and
//! `calls_per_id`, calls by record id across all sources.

use std::collections::HashMap;
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

mod judge;
mod limits;
mod wire;

pub use judge::{Judgement, enrich};
use limits::{Limits, Refused, Window};
pub use wire::input_records;
use wire::{Answer, Category, Incoming, incoming};

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
    window: Window,
    last_request: Option<Arc<Value>>,
}

impl Counters {
    /// Counts a call of each record: by id, and by its content.
    fn count_calls(&mut self, records: &[Incoming]) {
        for Incoming { id, text, .. } in records {
            let id = id
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| id.to_string());
            *self.calls_per_id.entry(id).or_default() += 1;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&**text, &mut h);
            *self
                .calls_per_record
                .entry(std::hash::Hasher::finish(&h))
                .or_default() += 1;
        }
    }
}

/// The 429 of a refused request: `Retry-After` and, for each limit set, its
/// `x-ratelimit-*` headers.
fn throttled(refused: Refused, limits: Limits) -> Response {
    let mut resp = api_error(
        StatusCode::TOO_MANY_REQUESTS,
        "Rate limit reached",
        "rate_limit_exceeded",
    );
    let h = resp.headers_mut();
    let secs = refused.reset.as_secs_f64().ceil().max(1.0) as u64;
    h.insert("retry-after", secs.into());
    for (what, limit, used) in [
        ("requests", limits.rpm, refused.used_requests),
        ("tokens", limits.tpm, refused.used_tokens),
    ] {
        if let Some(limit) = limit {
            let name = |part: &str| format!("x-ratelimit-{part}-{what}");
            let header =
                |name: String| axum::http::HeaderName::try_from(name).expect("a header name");
            h.insert(header(name("limit")), limit.into());
            h.insert(header(name("remaining")), limit.saturating_sub(used).into());
            h.insert(
                header(name("reset")),
                format!("{secs}s").parse().expect("header value"),
            );
        }
    }
    resp
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
            "peak_window_requests": c.window.peak_requests,
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

/// Half of `text`'s length, moved back to a character's start (where it can be cut).
fn half(text: &str) -> usize {
    (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
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
    let Some(records) = user
        .get("content")
        .and_then(Value::as_str)
        .and_then(incoming)
    else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "the user message is not the records JSON document",
            "invalid_request_error",
        );
    };
    let prompt_tokens = tokens(prompt_chars);

    // Count, rate-limit, and pick this request's faults.
    let limits = Limits {
        window: Duration::from_secs(config.window_secs.unwrap_or(60).max(1)),
        rpm: config.rpm,
        tpm: config.tpm,
    };
    let (n, limited) = {
        let mut c = mock
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.requests += 1;
        c.last_request = Some(body.clone());
        let n = c.requests;
        let admitted = c
            .window
            .admit(tokio::time::Instant::now(), limits, prompt_tokens);
        match admitted {
            Ok(()) => c.count_calls(&records),
            Err(_) => c.throttled += 1,
        }
        (n, admitted.err())
    };
    // Latency after counting: a request is "received" as soon as it arrives.
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }
    if let Some(refused) = limited {
        return throttled(refused, limits);
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
    let record_chars: usize = records.iter().map(|r| r.text.len()).sum();
    let received = records.len();
    let mut results: Vec<Answer> = records
        .into_iter()
        .map(
            |Incoming {
                 id,
                 text,
                 judgement,
             }| {
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
                if poisoned {
                    Answer {
                        sentiment: "ecstatic",
                        category: Category::Number(7),
                        summary: None,
                        id,
                    }
                } else {
                    Answer::judged(judgement, id)
                }
            },
        )
        .collect();
    if roll(n, 2, config.drop_id_rate) && !results.is_empty() {
        results.remove(splitmix(n) as usize % results.len());
    }
    if roll(n, 3, config.invent_id_rate) {
        results.push(Answer::judged(
            Judgement::of_value(&json!({})),
            json!(format!("invented-{n}")),
        ));
    }
    let answered = results.len();
    #[derive(Serialize)]
    struct Results<'a> {
        results: &'a [Answer],
    }
    let mut content = serde_json::to_string(&Results { results: &results })
        .expect("strings and numbers serialize");
    // Each result's own JSON is in `{"results":[r1,r2,…]}`: its length, without serializing
    // each again.
    let result_chars = content.len() - r#"{"results":[]}"#.len() - answered.saturating_sub(1);
    let mut finish = "stop";
    if roll(n, 4, config.invalid_json_rate) {
        content = format!("Sure! Here are the results: {}", &content[..half(&content)]);
    } else if roll(n, 5, config.truncate_rate) {
        content.truncate(half(&content));
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
        c.records_served += received as u64;
        c.window
            .served(tokio::time::Instant::now(), completion_tokens);
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

    #[tokio::test]
    async fn counted_characters_and_tokens_are_those_of_the_texts() {
        let mock = Arc::new(Mock::new(MockConfig::default()));
        let records = json!({"a": {"headline": "ACME beats"}, "b": {"message": "Checkout \"failed\""}, "c": {}});
        let system = "Enrich each record.";
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": records.to_string()},
        ]});
        let content = content_of(&mock, body).await;
        let content = content.as_str();
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

    /// Answers `body` (with a 200) and returns its answer's content.
    async fn content_of(mock: &Arc<Mock>, body: Value) -> String {
        let resp = completions(State(mock.clone()), HeaderMap::new(), Json(body)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Answers a user message of `records` and returns the results of its content.
    async fn results_of(mock: &Arc<Mock>, records: &Value) -> Vec<Value> {
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": records.to_string()},
        ]});
        let content = content_of(mock, body).await;
        let content = content
            .trim_start_matches("```json\n")
            .trim_end_matches("\n```");
        let results: Value = serde_json::from_str(content).unwrap();
        results["results"].as_array().unwrap().clone()
    }

    #[tokio::test]
    async fn answers_are_each_records_enrichment_with_its_id() {
        let mock = Arc::new(Mock::new(MockConfig::default()));
        let a = json!({"symbol": "ACME", "headline": "ACME beats earnings"});
        let b = json!({"event": "support_ticket", "message": "Checkout failed"});
        // The protocol, with a key twice: its first place, its last value.
        let content = format!(r#"{{"x": {a}, "y": {b}, "x": {b}}}"#);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": content}]});
        let results: Value = serde_json::from_str(&content_of(&mock, body).await).unwrap();
        let with_id = |record: &Value, id: &str| {
            let mut e = enrich(record);
            e["id"] = json!(id);
            e
        };
        assert_eq!(
            results["results"],
            json!([with_id(&b, "x"), with_id(&b, "y")])
        );
        assert_eq!(
            results["results"][0]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["sentiment", "category", "summary", "id"]
        );
        // The older list of `{id, record}`, ids of any JSON type.
        let old = json!({"records": [{"id": 1, "record": a}, {"id": "two", "record": b}]});
        let mut one = enrich(&a);
        one["id"] = json!(1);
        assert_eq!(results_of(&mock, &old).await, vec![one, with_id(&b, "two")]);
        // Poisoned records get an invalid result.
        mock.set_config(MockConfig {
            poison: Some("ACME".into()),
            ..MockConfig::default()
        });
        assert_eq!(
            results_of(&mock, &json!({"p": a})).await,
            vec![json!({"sentiment": "ecstatic", "category": 7, "id": "p"})]
        );
    }

    #[tokio::test]
    async fn a_message_or_record_that_is_not_json_is_refused() {
        let mock = Arc::new(Mock::new(MockConfig::default()));
        let status = |content: String| {
            let mock = mock.clone();
            async move {
                let body =
                    json!({"model": "m", "messages": [{"role": "user", "content": content}]});
                completions(State(mock), HeaderMap::new(), Json(body))
                    .await
                    .status()
            }
        };
        for bad in [
            r#"{"a": {"t": "\ud800"}}"#.to_string(),
            r#"{"a": {"n": 1e400}}"#.to_string(),
            format!(r#"{{"a": {}{}}}"#, "[".repeat(200), "]".repeat(200)),
            "not json".to_string(),
        ] {
            assert_eq!(status(bad.clone()).await, StatusCode::BAD_REQUEST, "{bad}");
        }
        // JSON that holds no records: no results.
        assert_eq!(results_of(&mock, &json!([])).await, Vec::<Value>::new());
        assert_eq!(
            results_of(&mock, &json!({"records": "not a list"}))
                .await
                .len(),
            1
        );
    }

    #[test]
    fn a_text_is_halved_at_a_character() {
        assert_eq!(half("abcd"), 2);
        assert_eq!(half("aé"), 1); // é is bytes 1..3: its start.
        assert_eq!(half("é"), 0);
        assert_eq!(half(""), 0);
        let s = "ééé";
        assert!(s.is_char_boundary(half(s)));
    }

    #[test]
    fn rolls_are_deterministic_and_near_their_rate() {
        let hits = (0..10_000).filter(|n| roll(*n, 1, 0.1)).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|n| roll(n, 1, 0.0)));
        assert_eq!(roll(42, 1, 0.5), roll(42, 1, 0.5));
    }
}
