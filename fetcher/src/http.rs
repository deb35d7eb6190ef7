//! HTTP for one source: authentication, per-request timeout, rate limit, retries with
//! backoff and `Retry-After`, bounded response size, and URLs with credentials removed.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::page::{self, Pointers, RawRecord};
use crate::sources::{AuthType, Pagination, SourceConfig};
use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LINK, RETRY_AFTER};
use serde_json::Value;
use tardis_common::backoff::{Backoff, parse_retry_after};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use url::Url;

use crate::metrics::FetchMetrics;

/// The largest error body read (its first 200 characters are shown, after redaction).
pub const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// Characters of an error body shown in messages.
pub const ERROR_BODY_CHARS: usize = 200;

/// Waits between retries. The default sleeps; tests record the waits instead.
pub trait Sleeper: Send + Sync + std::fmt::Debug {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Sleeps on the Tokio clock.
#[derive(Debug, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A page as received.
#[derive(Debug)]
pub struct Page {
    /// The body without its records ([`crate::page`]): what pagination reads.
    pub envelope: Value,
    /// Its records, each as the source wrote it; `None` when the records pointer leads to
    /// no array.
    pub records: Option<Vec<RawRecord>>,
    pub link: Option<String>,
    pub bytes: usize,
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "source {source_name}: HTTP {status} from {url}: the credential was refused; check {credential_env} (auth_type {auth_type})"
    )]
    Unauthorized {
        source_name: String,
        auth_type: AuthType,
        credential_env: String,
        status: u16,
        url: String,
    },
    #[error("source {source_name}: HTTP {status} from {url}: {body}")]
    Status {
        source_name: String,
        status: u16,
        url: String,
        body: String,
    },
    #[error("source {source_name}: request to {url} failed: {error}")]
    Transport {
        source_name: String,
        url: String,
        error: String,
    },
    #[error("source {source_name}: the response from {url} is not JSON: {error}")]
    NotJson {
        source_name: String,
        url: String,
        error: String,
    },
    #[error("source {source_name}: unusable page from {url}: {problem}")]
    BadPage {
        source_name: String,
        url: String,
        problem: String,
    },
    #[error("source {source_name}: the response from {url} is larger than {limit} bytes")]
    TooLarge {
        source_name: String,
        url: String,
        limit: usize,
    },
    #[error("{last} (gave up after {attempts} attempts)")]
    Exhausted {
        attempts: u32,
        last: Box<FetchError>,
    },
    #[error("source {source_name}: interrupted by shutdown")]
    Cancelled { source_name: String },
    #[error(
        "source {source_name}: there is no fetch state, and the written checkpoint in Postgres cannot be read ({error}); not starting from initial_lookback, which could skip records. Fix the fetcher's Postgres access (PGHOST, DB_PASSWORD), or unset PGHOST and DATABASE_URL for it to start from initial_lookback"
    )]
    Checkpoint { source_name: String, error: String },
    #[error("source {source_name}: {error}")]
    State {
        source_name: String,
        error: crate::state::StateError,
    },
}

enum Attempt {
    Done(Page),
    Retry {
        error: FetchError,
        retry_after: Option<Duration>,
    },
    Fail(FetchError),
}

/// The HTTP side of one source.
#[derive(Debug)]
pub struct SourceClient {
    source: Arc<SourceConfig>,
    http: reqwest::Client,
    limiter: Option<DefaultDirectRateLimiter>,
    backoff: Backoff,
    sleeper: Arc<dyn Sleeper>,
    metrics: FetchMetrics,
    /// Where a page's records, their ids and times are ([`crate::page`]).
    pointers: Pointers,
    /// A pagination pointer leads into the records: pages keep them in their envelope.
    whole_envelope: bool,
}

impl SourceClient {
    pub fn new(
        source: Arc<SourceConfig>,
        metrics: FetchMetrics,
        sleeper: Arc<dyn Sleeper>,
    ) -> Result<Self, reqwest::Error> {
        tardis_common::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(source.timeout)
            .connect_timeout(source.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("tardis-fetcher/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let limiter = source.rate_limit.map(|rps| {
            let quota = if rps >= 1.0 {
                Quota::per_second(NonZeroU32::new(rps.floor() as u32).unwrap_or(NonZeroU32::MIN))
            } else {
                Duration::try_from_secs_f64(1.0 / rps)
                    .ok()
                    .and_then(Quota::with_period)
                    .unwrap_or(Quota::per_hour(NonZeroU32::MIN))
            };
            RateLimiter::direct(quota.allow_burst(NonZeroU32::MIN))
        });
        let backoff = Backoff::new(
            source.retry_delay,
            source
                .retry_delay
                .saturating_mul(32)
                .min(Duration::from_secs(600)),
        )
        .with_max_wait(source.retry_max_wait);
        let pointers = Pointers::new(
            &source.records_pointer,
            &source.id_pointer,
            source.updated_at_pointer.as_deref(),
        );
        let whole_envelope = match &source.pagination {
            Pagination::Page {
                total_pages_pointer: Some(p),
                ..
            } => pointers.is_under_records(p),
            Pagination::Cursor { cursor_pointer, .. } => pointers.is_under_records(cursor_pointer),
            _ => false,
        };
        Ok(Self {
            source,
            http,
            limiter,
            backoff,
            sleeper,
            metrics,
            pointers,
            whole_envelope,
        })
    }

    /// The URL with the credential attached, for sending.
    fn authenticated(&self, url: &Url) -> Url {
        let mut url = url.clone();
        if self.source.auth_type == AuthType::ApiKeyQuery
            && let Some(c) = &self.source.credential
        {
            url.query_pairs_mut()
                .append_pair(&self.source.api_key_param, c.expose());
        }
        url
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        let Some(c) = &self.source.credential else {
            return h;
        };
        let value = match self.source.auth_type {
            AuthType::Bearer => Some((
                AUTHORIZATION.as_str().to_string(),
                format!("Bearer {}", c.expose()),
            )),
            AuthType::Basic => Some((
                AUTHORIZATION.as_str().to_string(),
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(c.expose())
                ),
            )),
            AuthType::ApiKey => Some((self.source.api_key_header.clone(), c.expose().clone())),
            AuthType::ApiKeyQuery | AuthType::None => None,
        };
        if let Some((name, value)) = value
            && let (Ok(name), Ok(mut value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            )
        {
            value.set_sensitive(true);
            h.insert(name, value);
        }
        h
    }

    /// `url` as sent (with the query credential, if any), for messages: no user info, every
    /// credential-like parameter as `***`, the source's credential nowhere.
    pub fn redact(&self, url: &Url) -> String {
        crate::redact::url(
            &self.authenticated(url),
            &[self.source.api_key_param.as_str()],
            self.secret(),
        )
    }

    fn secret(&self) -> Option<&str> {
        self.source.credential.as_ref().map(|c| c.expose().as_str())
    }

    /// `text` with the source's credential as `***`, cut to [`ERROR_BODY_CHARS`].
    pub fn redact_text(&self, text: &str) -> String {
        crate::redact::text(text, self.secret(), ERROR_BODY_CHARS)
    }

    /// GETs `url`, retrying what can be retried, until it succeeds, fails for good, or
    /// `shutdown` fires.
    pub async fn get(&self, url: &Url, shutdown: &CancellationToken) -> Result<Page, FetchError> {
        let name = &self.source.name;
        let mut attempt = 0u32;
        loop {
            if let Some(l) = &self.limiter {
                tokio::select! {
                    () = l.until_ready() => {}
                    () = shutdown.cancelled() => return Err(FetchError::Cancelled { source_name: name.clone() }),
                }
            }
            let outcome = tokio::select! {
                o = self.attempt(url) => o,
                () = shutdown.cancelled() => return Err(FetchError::Cancelled { source_name: name.clone() }),
            };
            match outcome {
                Attempt::Done(page) => return Ok(page),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { error, retry_after } => {
                    if attempt >= self.source.max_retries {
                        return Err(FetchError::Exhausted {
                            attempts: attempt + 1,
                            last: Box::new(error),
                        });
                    }
                    let delay = self.backoff.delay_honouring(attempt, retry_after);
                    attempt += 1;
                    self.metrics.retries.with_label_values(&[name]).inc();
                    warn!(source = %name, %error, attempt, retry_in_ms = delay.as_millis() as u64, "request failed, retrying");
                    tokio::select! {
                        () = self.sleeper.sleep(delay) => {}
                        () = shutdown.cancelled() => return Err(FetchError::Cancelled { source_name: name.clone() }),
                    }
                }
            }
        }
    }

    /// A connection error or timeout: counted, and retried.
    fn transport_failure(&self, name: String, shown: String, e: reqwest::Error) -> Attempt {
        let class = if e.is_timeout() { "timeout" } else { "connect" };
        self.metrics
            .http_errors
            .with_label_values(&[&name, class])
            .inc();
        Attempt::Retry {
            error: FetchError::Transport {
                source_name: name,
                url: shown,
                error: describe_reqwest(e),
            },
            retry_after: None,
        }
    }

    async fn attempt(&self, url: &Url) -> Attempt {
        let name = self.source.name.clone();
        let shown = self.redact(url);
        let response = match self
            .http
            .get(self.authenticated(url))
            .headers(self.headers())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return self.transport_failure(name, shown, e),
        };
        let status = response.status();
        if !status.is_success() {
            let class = if status.is_client_error() {
                "4xx"
            } else if status.is_server_error() {
                "5xx"
            } else {
                "other"
            };
            self.metrics
                .http_errors
                .with_label_values(&[&name, class])
                .inc();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                return Attempt::Fail(FetchError::Unauthorized {
                    source_name: name,
                    auth_type: self.source.auth_type,
                    credential_env: self.source.credential_env.clone(),
                    status: status.as_u16(),
                    url: shown,
                });
            }
            let mut response = response;
            let raw = read_limited(&mut response, MAX_ERROR_BODY_BYTES)
                .await
                .map_or_else(|_| Vec::new(), |(bytes, _)| bytes);
            let body = self.redact_text(&String::from_utf8_lossy(&raw));
            let error = FetchError::Status {
                source_name: name,
                status: status.as_u16(),
                url: shown,
                body,
            };
            return if status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
            {
                Attempt::Retry { error, retry_after }
            } else {
                Attempt::Fail(error)
            };
        }
        // Every `Link` field, joined (RFC 9110 §5.3); a field that is not text fails the
        // source rather than reading as "no next page".
        let mut fields = Vec::new();
        for v in response.headers().get_all(LINK) {
            match std::str::from_utf8(v.as_bytes()) {
                Ok(text) => fields.push(text.to_string()),
                Err(_) => {
                    return Attempt::Fail(FetchError::BadPage {
                        source_name: name,
                        url: shown,
                        problem: "a Link header is not valid UTF-8".into(),
                    });
                }
            }
        }
        let link = (!fields.is_empty()).then(|| fields.join(", "));
        let limit = self.source.max_page_bytes;
        let too_large = || {
            Attempt::Fail(FetchError::TooLarge {
                source_name: name.clone(),
                url: shown.clone(),
                limit,
            })
        };
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return too_large();
        }
        let mut response = response;
        let body = match read_limited(&mut response, limit).await {
            Ok((body, false)) => body,
            Ok((_, true)) => return too_large(),
            Err(e) => return self.transport_failure(name, shown, e),
        };
        match page::read(&body, &self.pointers, self.whole_envelope) {
            Ok(read) => Attempt::Done(Page {
                envelope: read.envelope,
                records: read.records,
                link,
                bytes: body.len(),
            }),
            Err(e) => Attempt::Fail(FetchError::NotJson {
                source_name: name,
                url: shown,
                error: e.to_string(),
            }),
        }
    }
}

/// Reads a body up to `limit` bytes: the bytes, and whether there was more.
async fn read_limited(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(bytes) = response.chunk().await? {
        if body.len() + bytes.len() > limit {
            let room = limit - body.len();
            body.extend_from_slice(&bytes[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&bytes);
    }
    Ok((body, false))
}

/// A reqwest error with its causes, without the URL (it may hold a query credential; we
/// print a redacted URL ourselves).
fn describe_reqwest(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let text = tardis_common::error::chain(&e.without_url());
    if timeout {
        format!("timed out ({text})")
    } else {
        text
    }
}
