//! The fetcher against real nats-server and local HTTP servers (wiremock and demo-source).

use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use fetcher::http::Sleeper;
use serde_json::{Value, json};
use tardis_common::messages::{Cursor, FetchRun, RecordChunk, RunOutcome};
use tardis_common::nats::StreamKind;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::support::{legacy_env, stream_messages};
use crate::harness::{TestNats, bins, free_port, wait_for};

// ---------------------------------------------------------------- helpers

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// A fake of the legacy API over a mutable record set: `since` inclusive, `after_id`
/// breaking ties, `page`/`limit`, `pagination.total_pages`.
type Rows = Vec<(u64, DateTime<Utc>)>;

#[derive(Clone, Default)]
struct LegacyApi {
    records: Arc<Mutex<Rows>>,
}

impl LegacyApi {
    fn with(records: &[(u64, &str)]) -> Self {
        let api = Self::default();
        api.add(records);
        api
    }

    fn add(&self, records: &[(u64, &str)]) {
        self.records
            .lock()
            .unwrap()
            .extend(records.iter().map(|(id, t)| (*id, at(t))));
    }
}

fn query(req: &Request) -> BTreeMap<String, String> {
    req.url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

impl Respond for LegacyApi {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let q = query(req);
        let since = q.get("since").map(|s| at(s));
        let after: Option<u64> = q.get("after_id").and_then(|a| a.parse().ok());
        let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
        let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let mut rows: Rows = self
            .records
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|(id, t)| match (since, after) {
                (None, _) => true,
                (Some(s), None) => *t >= s,
                (Some(s), Some(a)) => *t > s || (*t == s && *id > a),
            })
            .collect();
        rows.sort_by_key(|(id, t)| (*t, *id));
        let total_pages = rows.len().div_ceil(limit);
        let data: Vec<Value> = rows
            .iter()
            .skip((page - 1) * limit)
            .take(limit)
            .map(|(id, t)| json!({"id": id, "updated_at": t.to_rfc3339_opts(SecondsFormat::Secs, true), "note": format!("record {id}")}))
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(json!({"data": data, "pagination": {"total_pages": total_pages}}))
    }
}

/// The fetcher environment for one test: NATS under the test's prefix, the given sources.
pub(super) fn env(
    t: &TestNats,
    sources: Value,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("NATS_URL", t.url.as_str()),
        ("TARDIS_PREFIX", t.prefix.as_str()),
        ("OPS_ADDR", "127.0.0.1:0"),
        ("DATA_API_KEY", "k-123"),
        ("CHUNK_SIZE", "2"),
        ("RETRY_DELAY", "10ms"),
        ("FETCH_LEASE_TTL", "3s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("DATA_SOURCES".into(), sources.to_string());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// Records the waits between retries instead of sleeping.
#[derive(Debug, Default)]
pub(super) struct RecordingSleeper(pub(super) Mutex<Vec<Duration>>);

impl Sleeper for RecordingSleeper {
    fn sleep(
        &self,
        d: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(d);
        Box::pin(async {})
    }
}

async fn run_in_process(
    env: &BTreeMap<String, String>,
    command: fetcher::Command,
) -> Result<ExitCode> {
    run_recording(env, command, Arc::new(RecordingSleeper::default())).await
}

pub(super) async fn run_recording(
    env: &BTreeMap<String, String>,
    command: fetcher::Command,
    sleeper: Arc<RecordingSleeper>,
) -> Result<ExitCode> {
    let config = fetcher::Config::from_env_with(env, command)?;
    fetcher::run_with(config, CancellationToken::new(), sleeper).await
}

fn run_all() -> fetcher::Command {
    fetcher::Command::Run { sources: vec![] }
}

async fn chunks(t: &TestNats) -> Result<Vec<RecordChunk>> {
    stream_messages(&t.jetstream(), &t.names().stream(StreamKind::Records)).await
}

async fn runs(t: &TestNats) -> Result<Vec<FetchRun>> {
    stream_messages(&t.jetstream(), &t.names().stream(StreamKind::Runs)).await
}

fn ids_of(chunks: &[RecordChunk]) -> Vec<String> {
    chunks
        .iter()
        .flat_map(|c| c.records.iter().map(|r| r.id.clone()))
        .collect()
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The fetch state as a fetcher sees it (both buckets provisioned), with lease TTL `ttl`.
pub(crate) async fn fetch_state(t: &TestNats, ttl: Duration) -> Result<fetcher::state::FetchState> {
    tardis_common::nats::Topology::new(t.names(), Default::default())
        .provision(&t.jetstream(), &[], &[], true)
        .await?;
    let js = t.jetstream();
    let store = js.get_key_value(t.names().fetch_state_bucket()).await?;
    let leases = js
        .create_or_update_key_value(fetcher::state::lease_bucket_config(
            t.names().fetch_lease_bucket(),
            ttl,
            1,
        ))
        .await?;
    Ok(fetcher::state::FetchState::new(store, leases, ttl))
}

// ---------------------------------------------------------------- pagination and auth

#[tokio::test]
async fn page_pagination_with_bearer_auth() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let api = LegacyApi::with(&[
        (1, "2026-11-01T10:00:00Z"),
        (2, "2026-11-01T10:00:01Z"),
        (3, "2026-11-01T10:00:02Z"),
        (4, "2026-11-01T10:00:03Z"),
        (5, "2026-11-01T10:00:04Z"),
    ]);
    Mock::given(method("GET"))
        .and(path("/quotes"))
        .respond_with(api)
        .mount(&server)
        .await;
    let sources = json!([{"name": "quotes", "url": format!("{}/quotes", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
    assert_eq!(
        run_in_process(&env(&t, sources, &[]), run_all()).await?,
        ExitCode::SUCCESS
    );

    let reqs = requests(&server).await;
    let pages: Vec<String> = reqs.iter().map(|r| query(r)["page"].clone()).collect();
    assert_eq!(pages, vec!["1", "2", "3"]);
    for r in &reqs {
        assert_eq!(header(r, "authorization"), Some("Bearer k-123"));
        let q = query(r);
        assert_eq!(q["limit"], "2");
        assert!(DateTime::parse_from_rfc3339(&q["since"]).is_ok(), "{q:?}");
        assert!(
            !q.contains_key("after_id"),
            "first run has no cursor: {q:?}"
        );
    }
    let published = chunks(&t).await?;
    assert_eq!(ids_of(&published), vec!["1", "2", "3", "4", "5"]);
    assert_eq!(
        published
            .iter()
            .map(|c| c.records.len())
            .collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(
        published[0].records[0].payload.get(),
        r#"{"id":1,"updated_at":"2026-11-01T10:00:00Z","note":"record 1"}"#
    );
    assert_eq!(
        published.last().unwrap().cursor_after,
        Some(Cursor::Position {
            updated_at: at("2026-11-01T10:00:04Z"),
            id: "5".into(),
            since: Some("2026-11-01T10:00:04Z".into()),
        }),
        "the cursor keeps updated_at as the source wrote it"
    );
    let reports = runs(&t).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (
            reports[0].outcome,
            reports[0].records,
            reports[0].pages,
            reports[0].chunks
        ),
        (RunOutcome::Succeeded, 5, 3, 3)
    );
    Ok(())
}

fn numbered(ids: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    ids.map(|i| json!({"key": format!("r{i}"), "modified": format!("2026-11-01T10:00:0{i}Z")}))
        .collect()
}

#[tokio::test]
async fn offset_pagination_with_api_key_header() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/events"))
        .respond_with(|req: &Request| {
            let q = query(req);
            let offset: u64 = q["offset"].parse().unwrap();
            let limit: u64 = q["size"].parse().unwrap();
            let items: Vec<Value> = numbered(1..=5)
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({"results": items}))
        })
        .mount(&server)
        .await;
    let sources = json!([{
        "name": "events", "url": format!("{}/events", server.uri()), "auth_type": "api_key", "api_key_header": "X-Token",
        "pagination": {"type": "offset", "limit_param": "size"}, "records_pointer": "/results", "id_field": "key",
        "updated_at_field": "modified", "since_param": "from", "after_id_param": null
    }]);
    assert_eq!(
        run_in_process(&env(&t, sources, &[]), run_all()).await?,
        ExitCode::SUCCESS
    );
    let reqs = requests(&server).await;
    let offsets: Vec<String> = reqs.iter().map(|r| query(r)["offset"].clone()).collect();
    assert_eq!(offsets, vec!["0", "2", "4"]);
    for r in &reqs {
        assert_eq!(header(r, "x-token"), Some("k-123"));
        assert_eq!(header(r, "authorization"), None);
        assert!(query(r).contains_key("from"));
    }
    assert_eq!(
        ids_of(&chunks(&t).await?),
        vec!["r1", "r2", "r3", "r4", "r5"]
    );
    Ok(())
}

#[tokio::test]
async fn cursor_pagination_with_api_key_in_the_query() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/feed"))
        .respond_with(|req: &Request| {
            let q = query(req);
            let (items, next) = match q.get("after").map(String::as_str) {
                None => (numbered(1..=2), json!("c2")),
                Some("c2") => (numbered(3..=4), json!("c3")),
                Some("c3") => (numbered(5..=5), Value::Null),
                Some(_) => (vec![], Value::Null),
            };
            ResponseTemplate::new(200)
                .set_body_json(json!({"items": items, "meta": {"next": next}}))
        })
        .mount(&server)
        .await;
    let sources = json!([{
        "name": "feed", "url": format!("{}/feed", server.uri()), "auth_type": "api_key_query", "api_key_param": "token",
        "pagination": {"type": "cursor", "cursor_pointer": "/meta/next", "cursor_param": "after"},
        "records_pointer": "/items", "id_field": "key", "updated_at_field": "modified"
    }]);
    assert_eq!(
        run_in_process(&env(&t, sources, &[]), run_all()).await?,
        ExitCode::SUCCESS
    );
    let reqs = requests(&server).await;
    let cursors: Vec<Option<String>> = reqs
        .iter()
        .map(|r| query(r).get("after").cloned())
        .collect();
    assert_eq!(cursors, vec![None, Some("c2".into()), Some("c3".into())]);
    for r in &reqs {
        assert_eq!(query(r)["token"], "k-123");
        assert_eq!(header(r, "authorization"), None);
    }
    assert_eq!(
        ids_of(&chunks(&t).await?),
        vec!["r1", "r2", "r3", "r4", "r5"]
    );
    Ok(())
}

#[tokio::test]
async fn link_header_pagination_with_basic_auth() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let base = server.uri();
    Mock::given(method("GET"))
        .and(path("/linked"))
        .respond_with(move |req: &Request| {
            let q = query(req);
            let p: u64 = q.get("p").and_then(|p| p.parse().ok()).unwrap_or(1);
            let items = match p {
                1 => numbered(1..=2),
                2 => numbered(3..=4),
                _ => numbered(5..=5),
            };
            let mut resp = ResponseTemplate::new(200).set_body_json(json!({"data": items}));
            if p < 3 {
                resp = resp.insert_header("link", format!(r#"<{base}/linked?p={}&per_page=2>; rel="next", <{base}/linked?p=1>; rel="first""#, p + 1));
            }
            resp
        })
        .mount(&server)
        .await;
    let sources = json!([{
        "name": "linked", "url": format!("{}/linked", server.uri()), "auth_type": "basic", "credential_env": "LINKED_CREDS",
        "pagination": {"type": "link", "limit_param": "per_page"}, "id_field": "key", "updated_at_field": "modified"
    }]);
    let env = env(&t, sources, &[("LINKED_CREDS", "collector:pa55")]);
    assert_eq!(run_in_process(&env, run_all()).await?, ExitCode::SUCCESS);
    let reqs = requests(&server).await;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("collector:pa55")
    );
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(header(r, "authorization"), Some(expected.as_str()));
    }
    assert!(
        query(&reqs[0]).contains_key("since"),
        "the first request carries the incremental parameters"
    );
    assert_eq!(query(&reqs[1]).get("p").map(String::as_str), Some("2"));
    assert_eq!(
        ids_of(&chunks(&t).await?),
        vec!["r1", "r2", "r3", "r4", "r5"]
    );
    Ok(())
}

#[tokio::test]
async fn auth_none_sends_no_credential() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(LegacyApi::with(&[(1, "2026-11-01T10:00:00Z")]))
        .mount(&server)
        .await;
    let sources = json!([{"name": "open", "url": format!("{}/open", server.uri()), "initial_lookback": "3650d"}]);
    let mut e = env(&t, sources, &[]);
    e.remove("DATA_API_KEY");
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    let reqs = requests(&server).await;
    assert_eq!(reqs.len(), 1);
    assert_eq!(header(&reqs[0], "authorization"), None);
    assert_eq!(header(&reqs[0], "x-api-key"), None);
    assert!(!query(&reqs[0]).values().any(|v| v.contains("k-123")));
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1"]);
    Ok(())
}

// ---------------------------------------------------------------- incremental

#[tokio::test]
async fn second_run_asks_only_for_what_follows_the_cursor() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    // 2, 3 and 4 share one updated_at; with pages of 2 the tie spans a page boundary.
    let api = LegacyApi::with(&[
        (1, "2026-11-01T10:00:00Z"),
        (2, "2026-11-01T10:00:05Z"),
        (3, "2026-11-01T10:00:05Z"),
        (4, "2026-11-01T10:00:05Z"),
        (5, "2026-11-01T10:00:09Z"),
    ]);
    Mock::given(method("GET"))
        .respond_with(api.clone())
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
    let e = env(&t, sources, &[]);
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1", "2", "3", "4", "5"]);
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(api.clone())
        .mount(&server)
        .await;

    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    let reqs = requests(&server).await;
    assert_eq!(
        reqs.len(),
        1,
        "one page: only record 5 is at or after the cursor"
    );
    let q = query(&reqs[0]);
    assert_eq!(q["since"], "2026-11-01T10:00:09Z");
    assert_eq!(q["after_id"], "5");
    assert_eq!(
        ids_of(&chunks(&t).await?),
        vec!["1", "2", "3", "4", "5"],
        "nothing new was published"
    );
    let reports = runs(&t).await?;
    assert_eq!(reports.last().unwrap().records, 0);
    Ok(())
}

#[tokio::test]
async fn records_sharing_one_updated_at_across_runs_arrive_exactly_once() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let api = LegacyApi::with(&[(1, "2026-11-01T10:00:00Z"), (2, "2026-11-01T10:00:05Z")]);
    Mock::given(method("GET"))
        .respond_with(api.clone())
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
    let e = env(&t, sources, &[]);
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    // Two more records with the very same updated_at as the cursor, and one later.
    api.add(&[
        (3, "2026-11-01T10:00:05Z"),
        (4, "2026-11-01T10:00:05Z"),
        (5, "2026-11-01T10:00:06Z"),
    ]);
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1", "2", "3", "4", "5"]);
    Ok(())
}

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn retry_after_is_honoured() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(503)
                .insert_header("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
        )
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(LegacyApi::with(&[(1, "2026-11-01T10:00:00Z")]))
        .with_priority(3)
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
    let sleeper = Arc::new(RecordingSleeper::default());
    let code = run_recording(&env(&t, sources, &[]), run_all(), sleeper.clone()).await?;
    assert_eq!(code, ExitCode::SUCCESS);
    let waits = sleeper.0.lock().unwrap().clone();
    assert_eq!(waits.len(), 2, "{waits:?}");
    assert!(
        waits[0] >= Duration::from_secs(2),
        "429 with Retry-After: 2 waited only {:?}",
        waits[0]
    );
    assert!(
        waits[1] < Duration::from_secs(1),
        "a Retry-After date in the past means no extra wait: {:?}",
        waits[1]
    );
    assert_eq!(requests(&server).await.len(), 3);
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1"]);
    Ok(())
}

#[tokio::test]
async fn retries_are_bounded_by_max_retries() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri())}]);
    let code = run_in_process(&env(&t, sources, &[("MAX_RETRIES", "2")]), run_all()).await?;
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(
        requests(&server).await.len(),
        3,
        "one attempt and two retries"
    );
    let report = runs(&t).await?.pop().unwrap();
    assert_eq!(report.outcome, RunOutcome::Failed);
    let error = report.error.unwrap();
    assert!(
        error.contains("HTTP 500") && error.contains("gave up after 3 attempts"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_pages_fail_the_source_with_the_url_and_no_credential() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/notjson"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>oops</html>"))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/nodata"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"items": []})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/noid"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"data": [{"updated_at": "2026-11-01T10:00:00Z"}]})),
        )
        .mount(&server)
        .await;
    let source = |name: &str| json!({"name": name, "url": format!("{}/{name}", server.uri()), "auth_type": "api_key_query", "api_key_param": "key"});
    let sources = json!([source("notjson"), source("nodata"), source("noid")]);
    let code = run_in_process(
        &env(&t, sources, &[("DATA_API_KEY", "very-secret-key")]),
        run_all(),
    )
    .await?;
    assert_eq!(code, ExitCode::FAILURE);
    let reports = runs(&t).await?;
    let error = |name: &str| {
        reports
            .iter()
            .find(|r| r.source == name)
            .and_then(|r| r.error.clone())
            .unwrap()
    };
    let e = error("notjson");
    assert!(
        e.contains("the response from") && e.contains("/notjson?") && e.contains("is not JSON"),
        "{e}"
    );
    let e = error("nodata");
    assert!(
        e.contains("unusable page from")
            && e.contains("the response has no records array at /data"),
        "{e}"
    );
    let e = error("noid");
    assert!(e.contains("record #0 has no id at /id"), "{e}");
    for r in &reports {
        let e = r.error.clone().unwrap();
        assert!(!e.contains("very-secret-key"), "credential leaked: {e}");
        assert!(
            e.contains("key=***"),
            "the credential is shown redacted: {e}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_live_lease_makes_the_second_fetcher_skip() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(LegacyApi::with(&[(1, "2026-11-01T10:00:00Z")]))
        .mount(&server)
        .await;
    let sources =
        json!([{"name": "s", "url": format!("{}/s", server.uri()), "initial_lookback": "3650d"}]);
    let e = env(&t, sources, &[("FETCH_LEASE_TTL", "60s")]);
    // Provision and take the lease as "another fetcher" would.
    let state = fetch_state(&t, Duration::from_secs(60)).await?;
    let fetcher::state::Acquired::Yes(held) = state
        .acquire(
            &fetcher::state::lease_key("s", false),
            "other-host:1",
            "run-x",
        )
        .await?
    else {
        panic!("lease should be free");
    };
    assert_eq!(
        run_in_process(&e, run_all()).await?,
        ExitCode::SUCCESS,
        "skipping is not a failure"
    );
    assert!(
        requests(&server).await.is_empty(),
        "the skipped source was not fetched"
    );
    let report = runs(&t).await?.pop().unwrap();
    assert_eq!(report.outcome, RunOutcome::Skipped);
    assert!(
        report
            .error
            .unwrap()
            .contains("another fetcher (other-host:1, run run-x) holds the lease")
    );
    state.release(&held).await?;
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1"]);
    Ok(())
}

#[tokio::test]
async fn backfill_fetches_a_window_and_leaves_the_cursor_alone() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let api = LegacyApi::with(&[
        (1, "2026-10-01T00:00:00Z"),
        (2, "2026-10-02T00:00:00Z"),
        (3, "2026-10-03T00:00:00Z"),
        (4, "2026-10-04T00:00:00Z"),
    ]);
    Mock::given(method("GET"))
        .respond_with(api)
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri())}]);
    let e = env(&t, sources, &[]);
    let command = fetcher::Command::Backfill {
        source: "s".into(),
        since: at("2026-10-02T00:00:00Z"),
        until: Some(at("2026-10-04T00:00:00Z")),
    };
    assert_eq!(run_in_process(&e, command).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), vec!["2", "3"]);
    assert_eq!(
        query(&requests(&server).await[0])["since"],
        "2026-10-02T00:00:00Z"
    );
    let store = t
        .jetstream()
        .get_key_value(t.names().fetch_state_bucket())
        .await?;
    assert!(
        store.get("cursor.s").await?.is_none(),
        "backfill never writes the cursor"
    );
    assert!(chunks(&t).await?.iter().all(|c| c.cursor_after.is_none()));
    Ok(())
}

// ---------------------------------------------------------------- the binary

/// Runs `fetcher <args>` to its end, at most two minutes (then it is killed and the test
/// fails): its exit status and output.
async fn run_fetcher(
    env: &BTreeMap<String, String>,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(bins::bin("fetcher")?);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("fetcher {args:?} still running after 2 minutes"))?
        .map_err(anyhow::Error::from)
}

fn spawn_fetcher(env: &BTreeMap<String, String>, args: &[&str]) -> Result<std::process::Child> {
    Ok(Command::new(bins::bin("fetcher")?)
        .args(args)
        .env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[tokio::test]
async fn a_failing_source_fails_its_own_run_only() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/a"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/b"))
        .respond_with(LegacyApi::with(&[
            (1, "2026-11-01T10:00:00Z"),
            (2, "2026-11-01T10:00:01Z"),
        ]))
        .mount(&server)
        .await;
    let sources = json!([
        {"name": "a", "url": format!("{}/a", server.uri()), "auth_type": "bearer"},
        {"name": "b", "url": format!("{}/b", server.uri()), "auth_type": "api_key", "initial_lookback": "3650d"}
    ]);
    let out = run_fetcher(&env(&t, sources, &[]), &["run"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line_a = stderr
        .lines()
        .find(|l| l.starts_with("a: "))
        .unwrap_or_default();
    assert!(line_a.starts_with("a: failed"), "{stderr}");
    assert!(
        line_a.contains("source a: HTTP 401")
            && line_a.contains("auth_type bearer")
            && line_a.contains("DATA_API_KEY"),
        "{line_a}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("b: succeeded, 2 records")),
        "{stderr}"
    );
    assert_eq!(
        requests(&server)
            .await
            .iter()
            .filter(|r| r.url.path() == "/a")
            .count(),
        1,
        "401 is not retried"
    );
    assert_eq!(ids_of(&chunks(&t).await?), vec!["1", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("k-123") && !stderr.contains("k-123"),
        "the credential was printed"
    );
    Ok(())
}

#[tokio::test]
async fn a_run_killed_mid_way_then_rerun_publishes_every_record_once() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let records: Vec<(u64, String)> = (1..=40)
        .map(|i| (i, format!("2026-11-01T10:{:02}:{:02}Z", i / 60, i % 60)))
        .collect();
    let api = LegacyApi::default();
    api.add(
        &records
            .iter()
            .map(|(i, s)| (*i, s.as_str()))
            .collect::<Vec<_>>(),
    );
    Mock::given(method("GET"))
        .respond_with(SlowResponder {
            inner: api,
            delay: Duration::from_millis(150),
        })
        .mount(&server)
        .await;
    let sources =
        json!([{"name": "s", "url": format!("{}/s", server.uri()), "initial_lookback": "3650d"}]);
    let e = env(
        &t,
        sources,
        &[("CHUNK_SIZE", "4"), ("FETCH_LEASE_TTL", "2s")],
    );

    let mut child = spawn_fetcher(&e, &["run"])?;
    let published = wait_for(
        "4 of the 10 chunks to be published",
        Duration::from_secs(60),
        || async { Ok((chunks(&t).await?.len() >= 4).then_some(())) },
    )
    .await;
    child.kill()?;
    child.wait()?;
    published?;
    let before = chunks(&t).await?.len();
    assert!(before < 10, "the run was interrupted ({before} chunks)");

    // The dead fetcher's lease expires; then a rerun finishes the job.
    let out = wait_for(
        "a rerun that is not skipped",
        Duration::from_secs(30),
        || {
            let e = e.clone();
            async move {
                let out = run_fetcher(&e, &["run"]).await?;
                let stderr = String::from_utf8_lossy(&out.stderr).to_string();
                Ok((!stderr.contains("skipped")).then_some((out.status.code(), stderr)))
            }
        },
    )
    .await?;
    assert_eq!(out.0, Some(0), "{}", out.1);
    let all = ids_of(&chunks(&t).await?);
    let expected: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    assert_eq!(all, expected, "every record exactly once, in order");
    Ok(())
}

struct SlowResponder {
    inner: LegacyApi,
    delay: Duration,
}

impl Respond for SlowResponder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.inner.respond(req).set_delay(self.delay)
    }
}

#[tokio::test]
async fn the_legacy_configmap_works_against_demo_source() -> Result<()> {
    use devtools::demo_source::{DemoConfig, Running};
    let t = TestNats::new().await?;
    let demo = Running::start(DemoConfig {
        backlog: 250,
        rate: 50.0,
        tie_group: 7,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let mut e = legacy_env();
    let sources: Value = serde_json::from_str(&e["DATA_SOURCES"])?;
    let rewritten: Vec<Value> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut s = s.clone();
            let url = s["url"]
                .as_str()
                .unwrap()
                .replace("https://api.example.com", &demo.url(""));
            s["url"] = json!(url);
            s
        })
        .collect();
    e.insert("DATA_SOURCES".into(), Value::Array(rewritten).to_string());
    e.insert("NATS_URL".into(), t.url.clone());
    e.insert("TARDIS_PREFIX".into(), t.prefix.clone());
    e.insert("CHUNK_SIZE".into(), "100".into());
    let out = run_fetcher(&e, &["run"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("market_data: succeeded, 250 records in 3 pages"),
        "{stderr}"
    );
    assert!(
        stderr.contains("user_events: succeeded, 250 records in 3 pages"),
        "{stderr}"
    );
    let published = chunks(&t).await?;
    for source in ["market_data", "user_events"] {
        let ids: Vec<String> = published
            .iter()
            .filter(|c| c.source == source)
            .flat_map(|c| c.records.iter().map(|r| r.id.clone()))
            .collect();
        assert_eq!(
            ids,
            (1..=250).map(|i| i.to_string()).collect::<Vec<_>>(),
            "{source}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn daemon_runs_each_source_on_its_schedule_until_stopped() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let api = LegacyApi::with(&[(1, "2026-11-01T10:00:00Z")]);
    Mock::given(method("GET"))
        .respond_with(api.clone())
        .mount(&server)
        .await;
    // Every second (six fields: with seconds), in a non-UTC zone.
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "schedule": "* * * * * *", "timezone": "Europe/Paris", "initial_lookback": "3650d"}]);
    let config = fetcher::Config::from_env_with(
        &env(&t, sources, &[]),
        fetcher::Command::Daemon { run_at_start: true },
    )?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(fetcher::run_with(
        config,
        shutdown.clone(),
        Arc::new(RecordingSleeper::default()),
    ));
    wait_for(
        "the first scheduled runs",
        Duration::from_secs(20),
        || async { Ok((runs(&t).await?.len() >= 2).then_some(())) },
    )
    .await?;
    api.add(&[(2, "2026-11-01T10:00:01Z")]);
    wait_for(
        "the new record to be fetched by a later run",
        Duration::from_secs(20),
        || async { Ok((ids_of(&chunks(&t).await?) == ["1", "2"]).then_some(())) },
    )
    .await?;
    shutdown.cancel();
    let code = tokio::time::timeout(Duration::from_secs(10), daemon).await???;
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(
        runs(&t)
            .await?
            .iter()
            .all(|r| matches!(r.outcome, RunOutcome::Succeeded | RunOutcome::Interrupted))
    );
    Ok(())
}

/// With no fetch state, a fetcher that is configured with Postgres must read the written
/// checkpoint before it falls back to `initial_lookback`: starting 24 hours back when the
/// checkpoint is older would skip records while reporting success.
#[tokio::test]
async fn an_unreadable_checkpoint_fails_the_run_instead_of_starting_from_the_lookback() -> Result<()>
{
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(LegacyApi::with(&[(1, "2026-11-01T10:00:00Z")]))
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri())}]);
    let closed = crate::harness::free_port()?.to_string();
    let e = env(
        &t,
        sources,
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", closed.as_str()),
            ("PGUSER", "tardis"),
            ("DB_CONNECT_TIMEOUT", "1s"),
        ],
    );
    assert_eq!(run_in_process(&e, run_all()).await?, ExitCode::from(1));
    assert!(requests(&server).await.is_empty(), "nothing fetched");
    let runs = runs(&t).await?;
    assert_eq!(runs.len(), 1);
    let error = runs[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("the written checkpoint in Postgres cannot be read"),
        "{error}"
    );
    Ok(())
}
