//! demo-source: the legacy source API, for the two sources of the legacy ConfigMap.
//!
//! `GET /v2/market/quotes` (`market_data`, `Authorization: Bearer <key>`) and `GET /v2/events`
//! (`user_events`, `X-API-Key: <key>`) answer
//! `?since=<RFC3339>&page=<n>&limit=<size>[&after_id=<id>]` with
//! `{"data": [...], "pagination": {"page", "limit", "total", "total_pages"}}`, records ordered
//! by `(updated_at, id)`, `since` inclusive, `after_id` breaking ties at `since`.
//!
//! Records are a pure function of their id, so any volume costs no memory: record `i`
//! (1-based) belongs to group `(i-1) / tie_group` and every record of a group shares one
//! `updated_at`; groups appear `tie_group / rate` seconds apart. `backlog` records exist at
//! start; more keep appearing at `rate` per second unless `frozen`.
//!
//! Faults (flags at start, or `PUT /admin/faults` with the same JSON at run time): every Nth
//! request answered 429 with `Retry-After`, every Nth 500, every Nth a malformed body, and a
//! latency on every response. `GET /admin/stats` counts requests and records served, and the
//! highest id served per source (every record up to it has been served, since pages come in
//! id order); `POST /admin/extend?n=N` makes N more records exist at once; `POST /admin/freeze`
//! stops new records from appearing (what was served can then be compared with what arrived).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The sources demo-source serves, as in the legacy ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MarketData,
    UserEvents,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::MarketData, Kind::UserEvents];

    /// The source name in the legacy ConfigMap.
    pub fn source_name(self) -> &'static str {
        match self {
            Kind::MarketData => "market_data",
            Kind::UserEvents => "user_events",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn from_path(path: &str) -> Option<Kind> {
        match path {
            "market/quotes" => Some(Kind::MarketData),
            "events" => Some(Kind::UserEvents),
            _ => None,
        }
    }

    fn salt(self) -> u64 {
        match self {
            Kind::MarketData => 0x6d61_726b,
            Kind::UserEvents => 0x7573_6572,
        }
    }
}

/// Fault switches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Every Nth request gets 429 with `Retry-After: retry_after_secs`.
    pub throttle_every: Option<u64>,
    pub retry_after_secs: u64,
    /// Every Nth request gets 500.
    pub fail_every: Option<u64>,
    /// Every Nth request gets a 200 whose body is not JSON.
    pub malformed_every: Option<u64>,
    /// Added to every response.
    pub latency_ms: u64,
}

/// What demo-source serves.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The credential both sources expect.
    pub api_key: String,
    /// Records per source that exist at start.
    pub backlog: u64,
    /// Records per second per source (spacing of `updated_at`, and growth unless frozen).
    pub rate: f64,
    /// Records sharing one `updated_at`.
    pub tie_group: u64,
    /// No new records after start.
    pub frozen: bool,
    pub faults: Faults,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            api_key: "your-data-source-api-key".into(),
            backlog: 200,
            rate: 2.0,
            tie_group: 5,
            frozen: false,
            faults: Faults::default(),
        }
    }
}

/// Server state.
#[derive(Debug)]
pub struct Demo {
    config: DemoConfig,
    faults: RwLock<Faults>,
    epoch: DateTime<Utc>,
    started: DateTime<Utc>,
    /// When new records stopped appearing (`frozen` at start, or `POST /admin/freeze`).
    frozen_at: RwLock<Option<DateTime<Utc>>>,
    requests: AtomicU64,
    served: AtomicU64,
    highest_served: [AtomicU64; 2],
    extra: AtomicU64,
}

impl Demo {
    pub fn new(config: DemoConfig, now: DateTime<Utc>) -> Self {
        let span =
            chrono::Duration::milliseconds((config.backlog as f64 / config.rate * 1000.0) as i64);
        Self {
            frozen_at: RwLock::new(config.frozen.then_some(now)),
            faults: RwLock::new(config.faults.clone()),
            config,
            epoch: now - span,
            started: now,
            requests: AtomicU64::new(0),
            served: AtomicU64::new(0),
            highest_served: [AtomicU64::new(0), AtomicU64::new(0)],
            extra: AtomicU64::new(0),
        }
    }

    fn step_ms(&self) -> f64 {
        self.config.tie_group as f64 / self.config.rate * 1000.0
    }

    /// The `updated_at` of record `id` (1-based).
    pub fn updated_at(&self, id: u64) -> DateTime<Utc> {
        let group = (id.max(1) - 1) / self.config.tie_group;
        self.epoch + chrono::Duration::milliseconds((group as f64 * self.step_ms()).round() as i64)
    }

    /// How many records exist at `now`.
    pub fn available(&self, now: DateTime<Utc>) -> u64 {
        let at = self.frozen_at().unwrap_or(now).max(self.started);
        let elapsed_ms = (at - self.epoch).num_milliseconds() as f64;
        let groups = (elapsed_ms / self.step_ms()).floor() as u64;
        (groups * self.config.tie_group).max(self.config.backlog)
            + self.extra.load(Ordering::SeqCst)
    }

    fn frozen_at(&self) -> Option<DateTime<Utc>> {
        self.frozen_at.read().map(|f| *f).unwrap_or(None)
    }

    /// Stops new records from appearing from `now` on (`extend` still adds records).
    pub fn freeze(&self, now: DateTime<Utc>) {
        if let Ok(mut f) = self.frozen_at.write() {
            f.get_or_insert(now);
        }
    }

    /// The highest record id of `kind` served so far (0: none).
    pub fn highest_served(&self, kind: Kind) -> u64 {
        self.highest_served[kind.index()].load(Ordering::SeqCst)
    }

    /// Makes `n` more records exist now (tests and demos of incremental runs).
    pub fn extend(&self, n: u64) {
        self.extra.fetch_add(n, Ordering::SeqCst);
    }

    /// The first id after `(since, after_id)`.
    pub fn first_id(&self, since: DateTime<Utc>, after_id: Option<u64>) -> u64 {
        let ms = (since - self.epoch).num_milliseconds() as f64;
        let group = if ms <= 0.0 {
            0
        } else {
            (ms / self.step_ms()).ceil() as u64
        };
        let mut first = group * self.config.tie_group + 1;
        // Rounding to whole milliseconds: step back while the previous group is still >= since.
        while first > self.config.tie_group
            && self.updated_at(first - self.config.tie_group) >= since
        {
            first -= self.config.tie_group;
        }
        while self.updated_at(first) < since {
            first += self.config.tie_group;
        }
        if let Some(after) = after_id
            && after >= first
            && self.updated_at(after) == since
        {
            first = after + 1;
        }
        first
    }

    /// Record `id` of `kind`, deterministic.
    pub fn record(&self, kind: Kind, id: u64) -> Value {
        serde_json::to_value(self.typed_record(kind, id)).unwrap_or(Value::Null)
    }

    /// [`Demo::record`] as a struct: what a page serializes, without building a [`Value`].
    fn typed_record(&self, kind: Kind, id: u64) -> Record {
        let h = splitmix(id ^ kind.salt());
        let updated_at = self
            .updated_at(id)
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        match kind {
            Kind::MarketData => {
                const SYMBOLS: [&str; 8] = [
                    "ACME", "GLOBX", "INITECH", "UMBRL", "STARK", "WAYNE", "CYBDN", "TYRL",
                ];
                const NEWS: [&str; 6] = [
                    "beats earnings expectations and raises guidance",
                    "falls after a profit warning",
                    "trades flat ahead of the central bank decision",
                    "announces a share buyback",
                    "faces a regulatory investigation",
                    "launches a new product line",
                ];
                let symbol = SYMBOLS[(h % 8) as usize];
                let price = 20.0 + (h >> 8) as f64 % 48000.0 / 100.0;
                let change = ((h >> 24) % 1000) as f64 / 100.0 - 5.0;
                Record::Market {
                    id,
                    symbol,
                    price: (price * 100.0).round() / 100.0,
                    change_pct: (change * 100.0).round() / 100.0,
                    volume: (h >> 32) % 5_000_000,
                    headline: format!("{symbol} {}", NEWS[((h >> 40) % 6) as usize]),
                    updated_at,
                }
            }
            Kind::UserEvents => {
                const EVENTS: [&str; 5] =
                    ["signup", "login", "purchase", "support_ticket", "review"];
                const MESSAGES: [&str; 6] = [
                    "Love the new dashboard, it saves me hours every week",
                    "Checkout failed twice before the payment went through",
                    "How do I export my reports to CSV?",
                    "The mobile app keeps logging me out",
                    "Great support, my issue was solved in minutes",
                    "Pricing page is confusing",
                ];
                Record::Event {
                    id,
                    user_id: format!("u-{:05}", h % 50_000),
                    event: EVENTS[((h >> 16) % 5) as usize],
                    channel: if h & 1 == 0 { "web" } else { "mobile" },
                    message: MESSAGES[((h >> 24) % 6) as usize],
                    updated_at,
                }
            }
        }
    }

    pub fn faults(&self) -> Faults {
        self.faults.read().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.faults.write() {
            *f = faults;
        }
    }
}

/// A demo record, its fields in the order they are served.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Record {
    Market {
        id: u64,
        symbol: &'static str,
        price: f64,
        change_pct: f64,
        volume: u64,
        headline: String,
        updated_at: String,
    },
    Event {
        id: u64,
        user_id: String,
        event: &'static str,
        channel: &'static str,
        message: &'static str,
        updated_at: String,
    },
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    since: Option<String>,
    after_id: Option<String>,
    page: Option<u64>,
    limit: Option<u64>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

async fn page(
    State(demo): State<Arc<Demo>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    let n = demo.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let faults = demo.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let Some(kind) = Kind::from_path(&path) else {
        return error(StatusCode::NOT_FOUND, "no such source");
    };
    let key = &demo.config.api_key;
    let authorized = match kind {
        Kind::MarketData => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}")),
        Kind::UserEvents => headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == key),
    };
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "missing or invalid credential");
    }
    let hit = |every: Option<u64>| every.is_some_and(|e| e > 0 && n % e == 0);
    if hit(faults.throttle_every) {
        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        resp.headers_mut()
            .insert("retry-after", faults.retry_after_secs.into());
        return resp;
    }
    if hit(faults.fail_every) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    }
    if hit(faults.malformed_every) {
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"data\": [ {\"id\": 1,",
        )
            .into_response();
    }
    let now = Utc::now();
    let since = match q.since.as_deref().map(DateTime::parse_from_rfc3339) {
        None => demo.epoch,
        Some(Ok(t)) => t.to_utc(),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "since must be RFC 3339"),
    };
    let after_id = match q.after_id.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "after_id must be a record id"),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let page = q.page.unwrap_or(1).max(1);
    let available = demo.available(now);
    let first = demo.first_id(since, after_id);
    let total = (available + 1).saturating_sub(first);
    let start = first + (page - 1) * limit;
    let end = (start + limit - 1).min(available);
    let data: Vec<Record> = if start > available {
        Vec::new()
    } else {
        (start..=end)
            .map(|id| demo.typed_record(kind, id))
            .collect()
    };
    demo.served.fetch_add(data.len() as u64, Ordering::Relaxed);
    if !data.is_empty() {
        demo.highest_served[kind.index()].fetch_max(end, Ordering::SeqCst);
    }
    #[derive(Serialize)]
    struct Page {
        data: Vec<Record>,
        pagination: Pagination,
    }
    #[derive(Serialize)]
    struct Pagination {
        page: u64,
        limit: u64,
        total: u64,
        total_pages: u64,
    }
    Json(Page {
        data,
        pagination: Pagination {
            page,
            limit,
            total,
            total_pages: total.div_ceil(limit),
        },
    })
    .into_response()
}

async fn stats(State(demo): State<Arc<Demo>>) -> Json<Value> {
    let now = Utc::now();
    Json(json!({
        "requests": demo.requests.load(Ordering::SeqCst),
        // Every record of every response: a fetcher's inclusive `since` gets the boundary
        // records again, so this is more than the records that exist.
        "records_sent_in_responses": demo.served.load(Ordering::Relaxed),
        "available": demo.available(now),
        "frozen": demo.frozen_at().is_some(),
        "sources": Kind::ALL.iter().map(|&k| {
            // Pages come in id order: every id up to this one has been served, so it is also
            // the number of distinct records served (what Postgres must hold once written).
            (k.source_name().to_string(), json!({"highest_id_served": demo.highest_served(k)}))
        }).collect::<serde_json::Map<_, _>>(),
        "faults": demo.faults(),
    }))
}

async fn freeze(State(demo): State<Arc<Demo>>) -> StatusCode {
    demo.freeze(Utc::now());
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct ExtendQuery {
    n: u64,
}

async fn extend(State(demo): State<Arc<Demo>>, Query(q): Query<ExtendQuery>) -> StatusCode {
    demo.extend(q.n);
    StatusCode::NO_CONTENT
}

async fn set_faults(State(demo): State<Arc<Demo>>, Json(faults): Json<Faults>) -> StatusCode {
    demo.set_faults(faults);
    StatusCode::NO_CONTENT
}

/// The demo-source HTTP application.
pub fn router(demo: Arc<Demo>) -> Router {
    Router::new()
        .route("/v2/{*path}", get(page))
        .route("/admin/stats", get(stats))
        .route("/admin/faults", put(set_faults))
        .route("/admin/extend", axum::routing::post(extend))
        .route("/admin/freeze", axum::routing::post(freeze))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(demo)
}

/// Serves on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    demo: Arc<Demo>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(demo))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A demo-source on a free local port, in the background (tests and benchmarks).
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub demo: Arc<Demo>,
    shutdown: CancellationToken,
}

impl Running {
    pub async fn start(config: DemoConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let demo = Arc::new(Demo::new(config, Utc::now()));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, demo.clone(), shutdown.clone()));
        Ok(Self {
            addr,
            demo,
            shutdown,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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

    fn demo(backlog: u64, tie: u64) -> Demo {
        Demo::new(
            DemoConfig {
                backlog,
                rate: 10.0,
                tie_group: tie,
                frozen: true,
                ..DemoConfig::default()
            },
            DateTime::parse_from_rfc3339("2026-11-22T00:00:00Z")
                .unwrap()
                .to_utc(),
        )
    }

    #[test]
    fn groups_share_one_updated_at_and_ids_are_ordered() {
        let d = demo(100, 5);
        assert_eq!(d.updated_at(1), d.updated_at(5));
        assert!(d.updated_at(6) > d.updated_at(5));
        assert_eq!(d.available(Utc::now()), 100, "frozen");
    }

    #[test]
    fn since_is_inclusive_and_after_id_breaks_ties() {
        let d = demo(100, 5);
        let t = d.updated_at(6);
        assert_eq!(d.first_id(t, None), 6, "since is inclusive");
        assert_eq!(
            d.first_id(t, Some(7)),
            8,
            "after_id skips the tie already seen"
        );
        assert_eq!(d.first_id(t, Some(10)), 11);
        assert_eq!(d.first_id(t + chrono::Duration::milliseconds(1), None), 11);
        assert_eq!(d.first_id(d.epoch - chrono::Duration::days(1), None), 1);
    }

    #[test]
    fn records_are_deterministic() {
        let d = demo(10, 5);
        assert_eq!(d.record(Kind::MarketData, 3), d.record(Kind::MarketData, 3));
        assert_ne!(d.record(Kind::MarketData, 3), d.record(Kind::UserEvents, 3));
        assert_eq!(d.record(Kind::UserEvents, 4)["id"], 4);
        // The fields, in the order a page serves them.
        let keys = |k| {
            let r = d.record(k, 3);
            r.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        };
        let market = [
            "id",
            "symbol",
            "price",
            "change_pct",
            "volume",
            "headline",
            "updated_at",
        ];
        let events = ["id", "user_id", "event", "channel", "message", "updated_at"];
        assert_eq!(keys(Kind::MarketData), market);
        assert_eq!(keys(Kind::UserEvents), events);
        // Prices are floats (a whole one too), volumes integers.
        let r = d.record(Kind::MarketData, 3);
        assert!(r["price"].is_f64() && r["change_pct"].is_f64(), "{r}");
        assert!(r["volume"].is_u64() && r["id"].is_u64(), "{r}");
    }

    #[test]
    fn freezing_stops_growth_but_not_extend() {
        let start = Utc::now();
        let d = Demo::new(
            DemoConfig {
                backlog: 10,
                rate: 10.0,
                tie_group: 1,
                ..DemoConfig::default()
            },
            start,
        );
        let later = start + chrono::Duration::seconds(2);
        assert_eq!(d.available(later), 30, "10 records/s for 2 s on top of 10");
        d.freeze(later);
        assert_eq!(d.available(later + chrono::Duration::seconds(60)), 30);
        d.freeze(later + chrono::Duration::seconds(60));
        assert_eq!(
            d.available(later + chrono::Duration::seconds(60)),
            30,
            "a second freeze keeps the first instant"
        );
        d.extend(5);
        assert_eq!(d.available(later + chrono::Duration::seconds(90)), 35);
    }
}
