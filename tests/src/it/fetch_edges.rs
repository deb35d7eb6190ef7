//! The fetcher at the edges: a real third-party REST server it was never tuned to
//! (json-server 0.17.4), odd `updated_at` formats, absurd headers, credentials in URLs, a NATS
//! blip under a lease. Each test is a case where the fetcher used to skip records, loop or
//! panic while reporting success; none may pass unless nothing was skipped or the run says
//! it could not prove it.
//!
//! Run reports are read as JSON, so these tests state the contract in the wire format.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fetcher::RecordingSleeper;
use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tardis_common::messages::RecordChunk;
use tardis_common::nats::StreamKind;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::support::stream_messages;
use crate::harness::json_server::JsonServer;
use crate::harness::{NatsServer, TestNats};

// ---------------------------------------------------------------- helpers

/// The fetcher tests' environment, with a credential long enough to be looked for in reports.
fn env(t: &TestNats, sources: Value, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut pairs = vec![
        ("DATA_API_KEY", "k-123-secret"),
        ("CHUNK_SIZE", "5"),
        ("FETCH_LEASE_TTL", "5s"),
    ];
    pairs.extend_from_slice(extra);
    super::fetcher::env(t, sources, &pairs)
}

async fn run_with(
    env: &BTreeMap<String, String>,
    sleeper: Arc<RecordingSleeper>,
) -> Result<ExitCode> {
    super::fetcher::run_recording(env, fetcher::Command::Run { sources: vec![] }, sleeper).await
}

async fn run(env: &BTreeMap<String, String>) -> Result<ExitCode> {
    run_with(env, Arc::new(RecordingSleeper::default())).await
}

async fn chunks(t: &TestNats) -> Result<Vec<RecordChunk>> {
    stream_messages(&t.jetstream(), &t.names().stream(StreamKind::Records)).await
}

fn ids_of(chunks: &[RecordChunk]) -> Vec<u64> {
    chunks
        .iter()
        .flat_map(|c| c.records.iter().map(|r| r.id.parse::<u64>().unwrap()))
        .collect()
}

/// The run reports, as JSON.
async fn runs(t: &TestNats) -> Result<Vec<Value>> {
    let mut s = t
        .jetstream()
        .get_stream(t.names().stream(StreamKind::Runs))
        .await?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&m.payload)?);
        }
    }
    Ok(out)
}

async fn last_run(t: &TestNats) -> Result<Value> {
    Ok(runs(t).await?.pop().expect("a run report"))
}

fn outcome(run: &Value) -> &str {
    run["outcome"].as_str().unwrap_or("")
}

fn text(run: &Value, field: &str) -> String {
    match &run[field] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn incomplete() -> ExitCode {
    ExitCode::from(3)
}

fn at(i: u64) -> String {
    // One record per 100 ms, written as json-server users write times (JavaScript's
    // toISOString: always three fractional digits).
    let t = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
        .unwrap()
        .to_utc()
        + chrono::Duration::milliseconds(100 * i as i64);
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn event(id: u64, updated_at: &str) -> Value {
    json!({"id": id, "updated_at": updated_at, "title": format!("event {id}")})
}

/// json-server with events 1..=n, one every 100 ms, in order.
async fn sorted_server(n: u64) -> Result<JsonServer> {
    JsonServer::start(&json!({"events": (1..=n).map(|i| event(i, &at(i))).collect::<Vec<_>>()}))
        .await
}

/// A json-server source: `Link` pagination with `_page`/`_limit`, `updated_at_gte`.
fn json_server_source(server: &JsonServer, query: &str, extra: Value) -> Value {
    let mut source = json!({
        "name": "events",
        "url": server.url(&format!("/events?{query}")),
        "auth_type": "none",
        "pagination": {"type": "link", "limit_param": "_limit"},
        "records_pointer": "/",
        "since_param": "updated_at_gte",
        "after_id_param": null,
        "page_size": 10,
        "initial_lookback": "3650d",
    });
    if let (Some(s), Some(e)) = (source.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!([source])
}

// ---------------------------------------------------------------- 1. Link headers

#[tokio::test]
async fn a_comma_inside_a_link_url_does_not_end_the_run() -> Result<()> {
    let t = TestNats::new().await?;
    let server = sorted_server(45).await?;
    let e = env(
        &t,
        json_server_source(&server, "_page=1&_sort=updated_at,id", json!({})),
        &[],
    );
    assert_eq!(run(&e).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), (1..=45).collect::<Vec<_>>());
    let report = last_run(&t).await?;
    assert_eq!(outcome(&report), "succeeded");
    assert_eq!(report["pages"], 5);
    Ok(())
}

#[tokio::test]
async fn a_link_header_that_cannot_be_parsed_fails_the_source() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([{"id": 1, "updated_at": "2026-11-30T10:00:00Z"}]))
                .insert_header("link", r#"<http://127.0.0.1:1/e?page=2; rel="next""#),
        )
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/e", server.uri()), "auth_type": "none",
        "pagination": {"type": "link"}, "records_pointer": "/", "page_size": 10}]);
    assert_eq!(run(&env(&t, sources, &[])).await?, ExitCode::FAILURE);
    let report = last_run(&t).await?;
    assert_eq!(outcome(&report), "failed");
    assert!(text(&report, "error").contains("Link header"), "{report}");
    Ok(())
}

// ---------------------------------------------------------------- 2. since as written

#[tokio::test]
async fn since_goes_back_exactly_as_the_source_wrote_it() -> Result<()> {
    let t = TestNats::new().await?;
    let server =
        JsonServer::start(&json!({"events": [event(1, "2026-11-30T10:00:39.000Z")]})).await?;
    let e = env(
        &t,
        json_server_source(&server, "_page=1&_sort=updated_at,id", json!({})),
        &[],
    );
    assert_eq!(run(&e).await?, ExitCode::SUCCESS);
    // json-server compares strings: "…39Z" sorts after "…39.500Z", so a re-formatted
    // cursor would skip event 2.
    server
        .add("events", &event(2, "2026-11-30T10:00:39.500Z"))
        .await?;
    server
        .add("events", &event(3, "2026-11-30T10:00:40.000Z"))
        .await?;
    assert_eq!(run(&e).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), vec![1, 2, 3]);
    Ok(())
}

/// A legacy-shaped source that records the `since` it is sent and serves one record with the
/// given `updated_at` text.
#[derive(Clone)]
struct EchoSince {
    updated_at: Value,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl Respond for EchoSince {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let since = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "since")
            .map(|(_, v)| v.into_owned());
        self.seen.lock().unwrap().push(since);
        ResponseTemplate::new(200).set_body_json(json!({
            "data": [{"id": 1, "updated_at": self.updated_at}],
            "pagination": {"total_pages": 1}
        }))
    }
}

#[tokio::test]
async fn since_keeps_every_format_the_source_uses() -> Result<()> {
    for written in [
        json!("2026-11-30T10:00:39.000Z"),
        json!("2026-11-30T10:00:39Z"),
        json!("2026-11-30T10:00:39+00:00"),
        json!("2026-11-30T11:00:39.123456+01:00"),
        json!("2026-11-30T10:00:39.123456789Z"),
        json!("2026-11-30 10:00:39.5"),
        json!(1_796_032_839),
    ] {
        let t = TestNats::new().await?;
        let server = MockServer::start().await;
        let echo = EchoSince {
            updated_at: written.clone(),
            seen: Arc::default(),
        };
        Mock::given(method("GET"))
            .respond_with(echo.clone())
            .mount(&server)
            .await;
        let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
        let e = env(&t, sources, &[]);
        assert_eq!(run(&e).await?, ExitCode::SUCCESS);
        assert_eq!(run(&e).await?, ExitCode::SUCCESS);
        let seen = echo.seen.lock().unwrap().clone();
        let expected = match &written {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(
            seen[1].as_deref(),
            Some(expected.as_str()),
            "second run's since for a source writing {written}"
        );
        assert_eq!(ids_of(&chunks(&t).await?), vec![1], "{written}");
    }
    Ok(())
}

// ---------------------------------------------------------------- 3. unsorted sources

/// 50 events whose `updated_at` order differs from their order in the file.
fn shuffled_events() -> Vec<Value> {
    (1..=50u64)
        .map(|i| event(i, &at((i * 37) % 50 + 1)))
        .collect()
}

#[tokio::test]
async fn an_unsorted_source_cut_short_skips_nothing() -> Result<()> {
    let t = TestNats::new().await?;
    let server = JsonServer::start(&json!({"events": shuffled_events()})).await?;
    let cut = env(
        &t,
        json_server_source(&server, "_page=1", json!({"max_pages": 3})),
        &[],
    );
    for _ in 0..2 {
        assert_eq!(run(&cut).await?, incomplete(), "a cut run is not a success");
        let report = last_run(&t).await?;
        assert_eq!(outcome(&report), "incomplete");
        assert!(
            text(&report, "error").contains("next run reads from there again"),
            "{report}"
        );
        assert!(report["out_of_order"].as_u64().unwrap_or(0) > 0, "{report}");
        assert!(
            text(&report, "warnings").contains("not in (updated_at, id) order"),
            "{report}"
        );
    }
    let whole = env(
        &t,
        json_server_source(&server, "_page=1", json!({"max_pages": 100})),
        &[],
    );
    assert_eq!(run(&whole).await?, ExitCode::SUCCESS);
    let ids = ids_of(&chunks(&t).await?);
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        (1..=50).collect::<BTreeSet<_>>(),
        "every record, none skipped"
    );
    assert_eq!(ids.len(), 50, "each once");
    server.add("events", &event(51, &at(60))).await?;
    server.add("events", &event(52, &at(55))).await?;
    assert_eq!(run(&whole).await?, ExitCode::SUCCESS);
    let ids = ids_of(&chunks(&t).await?);
    assert_eq!(ids.len(), 52);
    assert_eq!(
        &ids[50..].iter().copied().collect::<BTreeSet<_>>(),
        &BTreeSet::from([51, 52])
    );
    Ok(())
}

#[tokio::test]
async fn a_source_declared_unsorted_keeps_its_cursor_until_a_run_reads_every_page() -> Result<()> {
    let t = TestNats::new().await?;
    let server = sorted_server(30).await?;
    let cut = env(
        &t,
        json_server_source(
            &server,
            "_page=1&_sort=updated_at,id",
            json!({"max_pages": 2, "order": "unsorted"}),
        ),
        &[],
    );
    assert_eq!(run(&cut).await?, incomplete());
    let store = t
        .jetstream()
        .get_key_value(t.names().fetch_state_bucket())
        .await?;
    let state: Value = serde_json::from_slice(&store.get("cursor.events").await?.unwrap())?;
    assert_eq!(
        state["cursor"],
        Value::Null,
        "not moved by a cut run: {state}"
    );
    let whole = env(
        &t,
        json_server_source(
            &server,
            "_page=1&_sort=updated_at,id",
            json!({"order": "unsorted"}),
        ),
        &[],
    );
    assert_eq!(run(&whole).await?, ExitCode::SUCCESS);
    let state: Value = serde_json::from_slice(&store.get("cursor.events").await?.unwrap())?;
    assert_eq!(state["cursor"]["id"], "30", "{state}");
    assert_eq!(state["cursor"]["since"], at(30).as_str(), "{state}");
    let published = chunks(&t).await?;
    assert_eq!(
        published
            .last()
            .unwrap()
            .cursor_after
            .as_ref()
            .map(|c| serde_json::to_value(c).unwrap()["id"].clone()),
        Some(json!("30")),
        "the run's last chunk carries the cursor to the written checkpoint"
    );
    assert_eq!(ids_of(&published).len(), 30);
    Ok(())
}

// ---------------------------------------------------------------- 4. loops and max_pages

#[tokio::test]
async fn a_next_link_that_never_advances_fails_at_once() -> Result<()> {
    let t = TestNats::new().await?;
    let server = sorted_server(4).await?;
    let e = env(
        &t,
        json_server_source(&server, "_page=0", json!({"max_pages": 50, "page_size": 2})),
        &[],
    );
    assert_eq!(run(&e).await?, ExitCode::FAILURE);
    let report = last_run(&t).await?;
    assert_eq!(outcome(&report), "failed");
    assert!(report["pages"].as_u64().unwrap() <= 2, "{report}");
    let error = text(&report, "error");
    assert!(error.contains("already read in this run"), "{error}");
    assert!(
        error.contains("_page=0"),
        "the message names the URL: {error}"
    );
    Ok(())
}

#[tokio::test]
async fn reaching_max_pages_is_incomplete_and_the_next_run_continues() -> Result<()> {
    let t = TestNats::new().await?;
    let server = sorted_server(45).await?;
    let e = env(
        &t,
        json_server_source(
            &server,
            "_page=1&_sort=updated_at,id",
            json!({"max_pages": 2}),
        ),
        &[],
    );
    assert_eq!(run(&e).await?, incomplete());
    let report = last_run(&t).await?;
    assert_eq!(outcome(&report), "incomplete");
    assert!(
        text(&report, "error").contains("the next run continues from the cursor"),
        "{report}"
    );
    assert_eq!(run(&e).await?, incomplete());
    assert_eq!(
        run(&e).await?,
        ExitCode::SUCCESS,
        "the rest fits in one page"
    );
    assert_eq!(ids_of(&chunks(&t).await?), (1..=45).collect::<Vec<_>>());
    Ok(())
}

// ---------------------------------------------------------------- 5. no way to the next page

#[tokio::test]
async fn a_full_page_with_no_next_page_is_reported() -> Result<()> {
    let t = TestNats::new().await?;
    let server = sorted_server(25).await?;
    // Without `_page`, json-server sends the first `_limit` records and no Link header.
    let e = env(
        &t,
        json_server_source(&server, "_sort=updated_at,id", json!({})),
        &[],
    );
    run(&e).await?;
    let report = last_run(&t).await?;
    assert!(
        text(&report, "warnings")
            .contains("page full and no next page: is the pagination configured?"),
        "{report}"
    );
    Ok(())
}

// ---------------------------------------------------------------- 6. absurd Retry-After

#[tokio::test]
async fn an_absurd_retry_after_is_capped_not_a_panic() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1e300"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "NaN"))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": [{"id": 1, "updated_at": "2026-11-30T10:00:00Z"}],
            "pagination": {"total_pages": 1}
        })))
        .with_priority(3)
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer", "initial_lookback": "3650d"}]);
    let sleeper = Arc::new(RecordingSleeper::default());
    let e = env(&t, sources, &[("RETRY_MAX_WAIT", "7s")]);
    assert_eq!(run_with(&e, sleeper.clone()).await?, ExitCode::SUCCESS);
    let waits = sleeper.0.lock().unwrap().clone();
    assert_eq!(waits.len(), 2, "{waits:?}");
    assert_eq!(waits[0], Duration::from_secs(7), "capped at RETRY_MAX_WAIT");
    assert!(
        waits[1] < Duration::from_secs(1),
        "NaN is no hint: {waits:?}"
    );
    assert_eq!(ids_of(&chunks(&t).await?), vec![1]);
    Ok(())
}

// ---------------------------------------------------------------- 7. credentials in URLs

#[tokio::test]
async fn credentials_in_urls_and_bodies_never_reach_reports() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(400).set_body_string(format!(
            "{}bad request for Bearer k-123-secret, sorry",
            "x".repeat(180)
        )))
        .mount(&server)
        .await;
    let base = server
        .uri()
        .replace("http://", "http://reader:pw-secret-3@");
    let sources = json!([{"name": "s",
        "url": format!("{base}/s?access_token=tok-secret-1&X-Amz-Signature=sig-secret-2&region=eu"),
        "auth_type": "bearer"}]);
    assert_eq!(run(&env(&t, sources, &[])).await?, ExitCode::FAILURE);
    let report = last_run(&t).await?;
    let error = text(&report, "error");
    for secret in [
        "tok-secret-1",
        "sig-secret-2",
        "pw-secret-3",
        "k-123-secret",
        "k-123-s",
    ] {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    assert!(error.contains("access_token=***"), "{error}");
    assert!(error.contains("X-Amz-Signature=***"), "{error}");
    assert!(error.contains("region=eu"), "{error}");
    assert!(error.contains("HTTP 400"), "{error}");
    Ok(())
}

// ---------------------------------------------------------------- 8. leases

/// A legacy-shaped source of `n` records that answers each page after `delay`.
#[derive(Clone)]
struct SlowPages {
    n: u64,
    delay: Duration,
}

impl Respond for SlowPages {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let q: BTreeMap<String, String> = req
            .url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let page: u64 = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let limit: u64 = q.get("limit").and_then(|p| p.parse().ok()).unwrap_or(10);
        let data: Vec<Value> = ((page - 1) * limit + 1..=(page * limit).min(self.n))
            .map(|i| event(i, &at(i)))
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(
                json!({"data": data, "pagination": {"total_pages": self.n.div_ceil(limit)}}),
            )
            .set_delay(self.delay)
    }
}

#[tokio::test]
async fn a_nats_blip_does_not_lose_the_lease() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let t = TestNats::on(&nats.url()).await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(SlowPages {
            n: 100,
            delay: Duration::from_millis(300),
        })
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer",
        "initial_lookback": "3650d", "page_size": 4}]);
    let e = env(&t, sources, &[("FETCH_LEASE_TTL", "30s")]);
    let fetch = tokio::spawn(async move { run(&e).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.kill().await?;
    // Down across the first renewal (at TTL / 3 = 10 s) for longer than a JetStream request
    // may wait (5 s), so that renewal fails; back well within the TTL.
    tokio::time::sleep(Duration::from_millis(15_500)).await;
    nats.restart().await?;
    let code = fetch.await??;
    let report = last_run(&t).await?;
    assert_eq!(code, ExitCode::SUCCESS, "{report}");
    assert_eq!(outcome(&report), "succeeded");
    let ids = ids_of(&chunks(&t).await?);
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
    Ok(())
}

// ---------------------------------------------------------------- 9. bounded pages

#[tokio::test]
async fn a_page_larger_than_max_page_bytes_fails_the_source() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let big = "y".repeat(8192);
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": [{"id": 1, "updated_at": "2026-11-30T10:00:00Z", "blob": big}],
            "pagination": {"total_pages": 1}
        })))
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer",
        "initial_lookback": "3650d", "max_page_bytes": 4096}]);
    assert_eq!(run(&env(&t, sources, &[])).await?, ExitCode::FAILURE);
    let error = text(&last_run(&t).await?, "error");
    assert!(error.contains("larger than 4096 bytes"), "{error}");
    assert!(chunks(&t).await?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------- lease fencing (new API)

#[tokio::test]
async fn a_fetcher_that_lost_its_lease_cannot_move_the_cursor() -> Result<()> {
    use fetcher::state::{Acquired, CursorState};
    let t = TestNats::new().await?;
    let ttl = Duration::from_secs(1);
    let state = super::fetcher::fetch_state(&t, ttl).await?;
    let key = fetcher::state::lease_key("s", false);
    let Acquired::Yes(_a_lease) = state.acquire(&key, "host-a:1", "run-a").await? else {
        panic!("the lease is free");
    };
    let (_, mut a_cursor) = state.fence_cursor("s").await?;
    assert!(matches!(
        state.acquire(&key, "host-b:1", "run-b").await?,
        Acquired::No(l) if l.holder == "host-a:1"
    ));
    // A stalls past the TTL: the server expires the lease on its own clock.
    let b_lease = crate::harness::wait_for(
        "the stalled lease to expire on the server",
        Duration::from_secs(10),
        || {
            let state = state.clone();
            let key = key.clone();
            async move {
                Ok(match state.acquire(&key, "host-b:1", "run-b").await? {
                    Acquired::Yes(held) => Some(held),
                    Acquired::No(_) => None,
                })
            }
        },
    )
    .await?;
    let (_, mut b_cursor) = state.fence_cursor("s").await?;
    let cursor = |id: &str| CursorState {
        cursor: Some(tardis_common::messages::Cursor::Position {
            updated_at: Utc::now(),
            id: id.into(),
            since: None,
        }),
        published_total: 1,
        updated_at: Utc::now(),
        reset: false,
    };
    let err = state
        .save_cursor(&mut a_cursor, &cursor("from-a"))
        .await
        .unwrap_err();
    assert!(err.is_lost(), "{err}");
    state.save_cursor(&mut b_cursor, &cursor("from-b")).await?;
    let saved = state.load_cursor("s").await?.unwrap();
    assert!(
        matches!(saved.cursor, Some(tardis_common::messages::Cursor::Position { ref id, .. }) if id == "from-b")
    );
    state.release(&b_lease).await?;
    Ok(())
}

/// Pages of 2 records; the `next` link comes in a second `Link` header field.
#[derive(Clone)]
struct TwoLinkFields {
    base: String,
}

impl Respond for TwoLinkFields {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let page: u64 = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "p")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let data: Vec<Value> = (2 * page - 1..=2 * page)
            .map(|i| event(i, &at(i)))
            .collect();
        let base = &self.base;
        let mut r = ResponseTemplate::new(200)
            .set_body_json(data)
            .append_header("link", format!("<{base}/e?p=1>; rel=\"first\"").as_str());
        if page < 3 {
            r = r.append_header(
                "link",
                format!("<{base}/e?p={}>; rel=\"next\"", page + 1).as_str(),
            );
        }
        r
    }
}

#[tokio::test]
async fn a_next_link_in_a_second_link_field_is_followed() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(TwoLinkFields { base: server.uri() })
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/e?p=1", server.uri()), "auth_type": "none",
        "pagination": {"type": "link"}, "records_pointer": "/", "page_size": 2,
        "since_param": null, "after_id_param": null, "initial_lookback": "3650d"}]);
    let code = run(&env(&t, sources, &[])).await?;
    let report = last_run(&t).await?;
    assert_eq!(code, ExitCode::SUCCESS, "{report}");
    assert_eq!(ids_of(&chunks(&t).await?), vec![1, 2, 3, 4, 5, 6]);
    Ok(())
}

// ---------------------------------------------------------------- 10. records as written

/// A page as a source writes it: pretty-printed, with numbers no `f64` holds (a 30-digit
/// integer, a 30-digit decimal), numbers written their own way (`1.50`, `1E+3`, `-0.0`) and
/// escapes (`\u00e9`, `\"`, `\/`).
const WRITTEN_PAGE: &str = r#"{
  "data": [
    {
      "id": 1,
      "updated_at": "2026-11-30T10:00:00Z",
      "big": 123456789012345678901234567890,
      "amount": 12345678901234567890.1234567891,
      "price": 1.50,
      "sci": 1E+3,
      "neg": -0.0,
      "name": "caf\u00e9 \"quoted\" a\/b  two  spaces",
      "nested": { "b": [ 1, 2.0, { "c": null } ], "t": true }
    },
    {"id":"two","updated_at":"2026-11-30T10:00:01Z","tiny":1e-320}
  ],
  "pagination": { "page": 1, "total_pages": 1 }
}"#;

#[tokio::test]
async fn a_record_reaches_nats_as_the_source_wrote_it_without_whitespace() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(WRITTEN_PAGE, "application/json"))
        .mount(&server)
        .await;
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer",
        "initial_lookback": "3650d"}]);
    assert_eq!(run(&env(&t, sources, &[])).await?, ExitCode::SUCCESS);
    let published = chunks(&t).await?;
    let records: Vec<_> = published.iter().flat_map(|c| c.records.iter()).collect();
    let payloads: Vec<&str> = records.iter().map(|r| r.payload.get()).collect();
    assert_eq!(
        payloads,
        [
            r#"{"id":1,"updated_at":"2026-11-30T10:00:00Z","big":123456789012345678901234567890,"amount":12345678901234567890.1234567891,"price":1.50,"sci":1E+3,"neg":-0.0,"name":"caf\u00e9 \"quoted\" a\/b  two  spaces","nested":{"b":[1,2.0,{"c":null}],"t":true}}"#,
            r#"{"id":"two","updated_at":"2026-11-30T10:00:01Z","tiny":1e-320}"#,
        ],
        "no digit lost, nothing rewritten but the whitespace between tokens"
    );
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["1", "two"]);
    Ok(())
}

#[tokio::test]
async fn a_record_that_is_not_json_fails_its_page() -> Result<()> {
    // JSON's grammar allows them; a `serde_json::Value` holds neither, and the fetcher
    // always refused such a page (it did through its parse of the whole page).
    for record in [r#""name": "\ud800 alone""#, r#""n": 1e400"#] {
        let t = TestNats::new().await?;
        let server = MockServer::start().await;
        let page = format!(
            r#"{{"data": [{{"id": 1, "updated_at": "2026-11-30T10:00:00Z"}}, {{"id": 2, "updated_at": "2026-11-30T10:00:01Z", {record}}}], "pagination": {{"total_pages": 1}}}}"#
        );
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(page, "application/json"))
            .mount(&server)
            .await;
        let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer",
            "initial_lookback": "3650d"}]);
        assert_eq!(
            run(&env(&t, sources, &[])).await?,
            ExitCode::FAILURE,
            "{record}"
        );
        let error = text(&last_run(&t).await?, "error");
        assert!(error.contains("not JSON"), "{record}: {error}");
        assert!(chunks(&t).await?.is_empty(), "{record}");
    }
    Ok(())
}

#[tokio::test]
async fn a_cursor_read_from_the_last_record_still_leads_to_the_next_page() -> Result<()> {
    use wiremock::matchers::{query_param, query_param_is_missing};
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    let page = |ids: &[u64]| {
        let data: Vec<Value> = ids
            .iter()
            .map(|&i| json!({"id": i, "updated_at": at(i)}))
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({"data": data}))
    };
    Mock::given(method("GET"))
        .and(query_param_is_missing("after"))
        .respond_with(page(&[1, 2]))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(query_param("after", "2"))
        .respond_with(page(&[3]))
        .mount(&server)
        .await;
    // The token is the id of the page's second record: the pointer leads into the records.
    let sources = json!([{"name": "s", "url": format!("{}/s", server.uri()), "auth_type": "bearer",
        "initial_lookback": "3650d", "page_size": 2,
        "pagination": {"type": "cursor", "cursor_pointer": "/data/1/id", "cursor_param": "after"}}]);
    assert_eq!(run(&env(&t, sources, &[])).await?, ExitCode::SUCCESS);
    assert_eq!(ids_of(&chunks(&t).await?), [1, 2, 3]);
    assert_eq!(outcome(&last_run(&t).await?), "succeeded");
    Ok(())
}
