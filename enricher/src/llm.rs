//! The HTTP client of the chat-completions endpoint: authentication, timeout, limits
//! (concurrency per replica; requests and tokens a minute for the whole fleet, through
//! [`crate::fleet::Budget`]), and the classification of failures that decides retry, split or
//! stop.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use tardis_common::Secret;
use tardis_common::backoff::{parse_retry_after, seconds_hint};
use tokio::sync::Semaphore;
use url::Url;

use crate::budget::{Cost, RateHeaders};
use crate::fleet::{Answered, Budget};
use crate::metrics::EnrichMetrics;
use crate::protocol::{Answer, RequestBody, parse_answer};

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// 429, 5xx, timeouts, connection errors: retry with backoff (at least `retry_after`).
    #[error("{reason}")]
    Transient {
        /// 429: the provider's rate limit (counted apart from errors).
        rate_limited: bool,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// 401/403: the key is wrong. Stop pulling; retrying cannot help.
    #[error(
        "the endpoint {endpoint} refused the API key (HTTP {status}); check LLM_API_KEY or HOLYSHEEP_API_KEY"
    )]
    Unauthorized { endpoint: String, status: u16 },
    /// Other 4xx on the request as a whole (too large, malformed): split or dead-letter.
    #[error("the endpoint rejected the request (HTTP {status}): {body}")]
    Rejected { status: u16, body: String },
    /// 404/405 and the like: the endpoint is misconfigured. Stop pulling.
    #[error("the endpoint {endpoint} answered HTTP {status}; check PROCESSOR_ENDPOINT")]
    Misconfigured { endpoint: String, status: u16 },
    /// A 2xx answer that is not a chat completion (an HTML page, another API): retried a few
    /// times (a proxy may be flapping), then the endpoint is taken as misconfigured.
    #[error(
        "the endpoint {endpoint} answered HTTP {status} but not with a chat completion ({reason}); check PROCESSOR_ENDPOINT"
    )]
    NotACompletion {
        endpoint: String,
        status: u16,
        reason: String,
    },
}

/// What the batch policy needs from an LLM: one completion. [`LlmClient`] is the real one;
/// the policy's unit tests script their own.
pub trait Complete: Send + Sync + std::fmt::Debug {
    fn complete<'a>(
        &'a self,
        body: &'a RequestBody,
        cost: Cost,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Answer, CallError>> + Send + 'a>>;
}

impl Complete for LlmClient {
    fn complete<'a>(
        &'a self,
        body: &'a RequestBody,
        cost: Cost,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Answer, CallError>> + Send + 'a>>
    {
        Box::pin(LlmClient::complete(self, body, cost))
    }
}

#[derive(Debug)]
pub struct LlmClient {
    http: reqwest::Client,
    endpoint: Url,
    api_key: Option<Secret<String>>,
    model: String,
    budget: Arc<Budget>,
    concurrency: Arc<Semaphore>,
    metrics: EnrichMetrics,
}

impl LlmClient {
    pub fn new(
        endpoint: Url,
        api_key: Option<Secret<String>>,
        model: String,
        timeout: Duration,
        concurrency: u32,
        budget: Arc<Budget>,
        metrics: EnrichMetrics,
    ) -> Result<Self, reqwest::Error> {
        tardis_common::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("tardis-enricher/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            endpoint,
            api_key,
            model,
            budget,
            concurrency: Arc::new(Semaphore::new(concurrency.max(1) as usize)),
            metrics,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The endpoint without credentials or query, for messages.
    pub fn endpoint_for_logs(&self) -> String {
        endpoint_without_credentials(&self.endpoint)
    }

    /// One request, within the limits: a slot of this replica's concurrency, then one in the
    /// fleet's budget for `cost`; the answer is reported back to the budget.
    pub async fn complete(&self, body: &RequestBody, cost: Cost) -> Result<Answer, CallError> {
        let _permit = self
            .concurrency
            .acquire()
            .await
            .map_err(|_| CallError::Transient {
                rate_limited: false,
                reason: "shutting down".into(),
                retry_after: None,
            })?;
        let grant = self.budget.admit(cost).await;
        let mut headers = RateHeaders::default();
        let result = self.send(body, &mut headers).await;
        let how = match &result {
            Ok(answer) => Answered::Ok {
                usage: Some((answer.prompt_tokens, answer.completion_tokens))
                    .filter(|(p, c)| p + c > 0),
                headers,
            },
            Err(CallError::Transient {
                rate_limited: true, ..
            }) => Answered::Throttled(headers),
            Err(_) => Answered::Other,
        };
        self.budget.answered(cost, grant, how).await;
        result
    }

    /// Sends one request; `rate` gets the provider's rate-limit headers.
    async fn send(&self, body: &RequestBody, rate: &mut RateHeaders) -> Result<Answer, CallError> {
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.bytes());
        if let Some(key) = &self.api_key {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| CallError::Rejected {
                        status: 0,
                        body: "the API key is not a valid header value".into(),
                    })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let started = tokio::time::Instant::now();
        let result = request.send().await;
        let model = self.model.as_str();
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() { "timeout" } else { "connect" };
                self.metrics
                    .llm_requests
                    .with_label_values(&[model, kind])
                    .inc();
                let reason = format!("{kind}: {}", tardis_common::error::chain(&e.without_url()));
                return Err(CallError::Transient {
                    rate_limited: false,
                    reason,
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        *rate = rate_headers(response.headers());
        let retry_after = rate.retry_after;
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let kind = if e.is_timeout() { "timeout" } else { "connect" };
                self.metrics
                    .llm_requests
                    .with_label_values(&[model, kind])
                    .inc();
                return Err(CallError::Transient {
                    rate_limited: false,
                    reason: format!(
                        "{kind} while reading the answer: {}",
                        tardis_common::error::chain(&e.without_url())
                    ),
                    retry_after: None,
                });
            }
        };
        self.metrics
            .llm_duration
            .with_label_values(&[model])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .llm_requests
            .with_label_values(&[model, status.as_str()])
            .inc();
        let snippet = || {
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        };
        match status {
            s if s.is_success() => {
                parse_answer(&body).map_err(|reason| CallError::NotACompletion {
                    endpoint: self.endpoint_for_logs(),
                    status: s.as_u16(),
                    reason,
                })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(CallError::Unauthorized {
                endpoint: self.endpoint_for_logs(),
                status: status.as_u16(),
            }),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT => {
                Err(CallError::Transient {
                    rate_limited: status == StatusCode::TOO_MANY_REQUESTS,
                    reason: format!("HTTP {}: {}", status.as_u16(), snippet()),
                    retry_after,
                })
            }
            s if s.is_server_error() => Err(CallError::Transient {
                rate_limited: false,
                reason: format!("HTTP {}: {}", status.as_u16(), snippet()),
                retry_after,
            }),
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => Err(CallError::Rejected {
                status: status.as_u16(),
                body: snippet(),
            }),
            _ => Err(CallError::Misconfigured {
                endpoint: self.endpoint_for_logs(),
                status: status.as_u16(),
            }),
        }
    }
}

/// The longest of `Retry-After` and `x-ratelimit-reset-requests` / `-tokens`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut waits = Vec::new();
    if let Some(v) =
        header(RETRY_AFTER.as_str()).and_then(|v| parse_retry_after(v, SystemTime::now()))
    {
        waits.push(v);
    }
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        if let Some(v) = header(name).and_then(parse_reset) {
            waits.push(v);
        }
    }
    waits.into_iter().max()
}

/// `endpoint` without user info or query: for messages, and to name it in shared state.
pub fn endpoint_without_credentials(endpoint: &Url) -> String {
    let mut u = endpoint.clone();
    u.set_query(None);
    if u.set_username("").is_err() || u.set_password(None).is_err() {
        tracing::trace!("endpoint has no credentials to remove");
    }
    u.to_string()
}

/// The provider's rate-limit headers (OpenAI's names, which most compatible servers use).
pub fn rate_headers(headers: &HeaderMap) -> RateHeaders {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let number = |name: &str| {
        header(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|x| x.is_finite() && *x >= 0.0)
    };
    let remaining_requests = number("x-ratelimit-remaining-requests");
    let remaining_tokens = number("x-ratelimit-remaining-tokens");
    let reset_requests = header("x-ratelimit-reset-requests").and_then(parse_reset);
    let reset_tokens = header("x-ratelimit-reset-tokens").and_then(parse_reset);
    // How long to wait: the server's Retry-After; else the reset of what ran out (a token
    // bucket's reset is when it is full again, minutes, not when one request fits); else
    // the longest reset.
    let exhausted = |remaining: Option<f64>, reset: Option<Duration>| {
        reset.filter(|_| remaining.is_some_and(|r| r < 1.0))
    };
    let wait = header(RETRY_AFTER.as_str())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
        .or_else(|| {
            exhausted(remaining_requests, reset_requests)
                .max(exhausted(remaining_tokens, reset_tokens))
        })
        .or_else(|| retry_after(headers));
    RateHeaders {
        retry_after: wait,
        limit_requests: number("x-ratelimit-limit-requests"),
        limit_tokens: number("x-ratelimit-limit-tokens"),
        remaining_requests,
        remaining_tokens,
        reset_requests,
        reset_tokens,
    }
}

/// OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `1h2m3.5s`, or plain seconds.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return seconds_hint(secs);
    }
    let mut total = 0.0;
    let mut number = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let n: f64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
    }
    if !number.is_empty() {
        return None;
    }
    seconds_hint(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(
            parse_reset("1e300"),
            Some(Duration::MAX),
            "saturates, never panics"
        );
        assert_eq!(
            parse_reset(&format!("{}h", "9".repeat(400))),
            Some(Duration::MAX)
        );
        assert_eq!(parse_reset("1e300h"), None, "not a reset duration");
        assert_eq!(parse_reset("NaN"), None);
    }

    #[test]
    fn absurd_rate_limit_headers_are_capped_never_a_panic() {
        let backoff = tardis_common::backoff::Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(60),
        )
        .with_max_wait(Duration::from_secs(60));
        for (name, value) in [
            ("retry-after", "1e300"),
            ("retry-after", "NaN"),
            ("retry-after", "-5"),
            ("x-ratelimit-reset-requests", "1e300"),
            ("x-ratelimit-reset-tokens", "99999999999999999999h"),
            ("x-ratelimit-reset-tokens", "garbage"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            let wait = backoff.delay_honouring(0, retry_after(&h));
            assert!(
                wait <= Duration::from_secs(60),
                "{name}: {value} -> {wait:?}"
            );
        }
    }

    #[test]
    fn rate_limit_headers_are_read_and_garbage_is_none() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "500".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "120ms".parse().unwrap());
        h.insert("x-ratelimit-limit-tokens", "NaN".parse().unwrap());
        h.insert("x-ratelimit-remaining-tokens", "-3".parse().unwrap());
        let r = rate_headers(&h);
        assert_eq!(r.limit_requests, Some(500.0));
        assert_eq!(r.remaining_requests, Some(0.0));
        assert_eq!(r.reset_requests, Some(Duration::from_millis(120)));
        assert_eq!(r.limit_tokens, None);
        assert_eq!(r.remaining_tokens, None);
        // No Retry-After: the reset of what ran out, not the longest one.
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(
            rate_headers(&h).retry_after,
            Some(Duration::from_millis(120))
        );
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(rate_headers(&h).retry_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_longest_hint_wins() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "7s".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
