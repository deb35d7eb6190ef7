//! What the LLM costs: enrichments of unchanged content reused instead of paid for again, and
//! the fleet's daily budget. The real binaries as processes, real NATS and Postgres, a
//! wiremock source and mock-llm.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, SecondsFormat, Utc};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::pipeline::fetch_once;
use super::writer::migrate;
use crate::harness::{Captured, TestDb, TestNats, bins, free_port, http_get, wait_for};

/// One record of [`Events`]: id, updated_at, view count.
type Event = (u64, DateTime<Utc>, u64);

/// A source of [`Event`]s with `page`/`limit`, `pagination.total_pages`, `since` inclusive.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Event>>>);

impl Respond for Events {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let param = |name: &str| {
            req.url
                .query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let since: Option<DateTime<Utc>> = param("since")
            .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
            .map(|t| t.to_utc());
        let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
        let page: usize = param("page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let mut rows: Vec<Event> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|(_, t, _)| since.is_none_or(|s| *t >= s))
            .collect();
        rows.sort_by_key(|(id, t, _)| (*t, *id));
        let total_pages = rows.len().div_ceil(limit);
        let data: Vec<Value> = rows
            .iter()
            .skip(page.saturating_sub(1) * limit)
            .take(limit)
            .map(|(id, t, views)| {
                json!({
                    "id": id,
                    "title": format!("Order {id} shipped late, customer asks for a refund"),
                    "views": views,
                    "updated_at": t.to_rfc3339_opts(SecondsFormat::Millis, true),
                })
            })
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(json!({"data": data, "pagination": {"total_pages": total_pages}}))
    }
}

/// A worker binary with its ops server on `ops` (so its metrics can be read).
fn spawn_on(name: &str, env: &BTreeMap<String, String>, ops: u16) -> Result<Captured> {
    let mut cmd = Command::new(bins::bin(name)?);
    cmd.env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{ops}"));
    Captured::spawn(cmd)
}

/// The sum of a metric's series (with `filter` in their labels) on `/metrics` at `ops`.
async fn metric(ops: u16, name: &str, filter: &str) -> Result<f64> {
    let (_, text) = http_get(&format!("http://127.0.0.1:{ops}/metrics")).await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn llm_requests(llm: &MockLlm) -> u64 {
    llm.mock.stats()["requests"].as_u64().unwrap_or(0)
}

/// Every row's enrichment and when it was made, by record id.
async fn enrichments(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, Value, DateTime<Utc>)>> {
    Ok(client
        .query(
            "SELECT record_id, enrichment, enriched_at FROM records ORDER BY record_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

fn env_for(t: &TestNats, db: &TestDb, source_url: &str, llm: &MockLlm) -> BTreeMap<String, String> {
    let mut env = super::operations::base_env(t, db, llm);
    env.insert(
        "DATA_SOURCES".into(),
        json!([{
            "name": "orders", "url": source_url, "auth_type": "none",
            "initial_lookback": "3650d", "after_id_param": null,
            "ignore_fields": ["views"],
        }])
        .to_string(),
    );
    env.insert("CHUNK_SIZE".into(), "250".into());
    env
}

#[tokio::test]
async fn refetching_a_thousand_unchanged_records_makes_no_llm_call() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let events = Events::default();
    let t0 = Utc::now() - chrono::Duration::days(2);
    *events.0.lock().unwrap() = (1..=1000)
        .map(|i| (i, t0 + chrono::Duration::seconds(i as i64), i))
        .collect();
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orders"))
        .respond_with(events.clone())
        .mount(&server)
        .await;
    let env = env_for(&t, &db, &format!("{}/orders", server.uri()), &llm);
    migrate(&env).await?;
    let enricher_ops = free_port()?;
    let writer = spawn_on("writer", &env, free_port()?)?;
    let enricher = spawn_on("enricher", &env, enricher_ops)?;
    let client = db.connect().await?;
    let count = |sql: &'static str| {
        let client = &client;
        async move { anyhow::Ok(client.query_one(sql, &[]).await?.get::<_, i64>(0)) }
    };
    let logs = || {
        format!(
            "enricher:\n{}\nwriter:\n{}",
            enricher.output(),
            writer.output()
        )
    };

    fetch_once(&env).await?;
    wait_for("1,000 rows", Duration::from_secs(120), || async {
        Ok((count("SELECT count(*) FROM records").await? == 1000).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    let paid = llm_requests(&llm);
    assert!(paid > 0);
    let before = enrichments(&client).await?;
    assert_eq!(count("SELECT count(*) FROM records WHERE content_key IS NOT NULL AND NOT reused AND cost_usd > 0").await?, 1000);

    // The source re-saves every record: a new updated_at, a new view count (ignored), the
    // same content.
    for (_, t, views) in events.0.lock().unwrap().iter_mut() {
        *t += chrono::Duration::days(1);
        *views += 1000;
    }
    let out = fetch_once(&env).await?;
    assert!(out.contains("orders: succeeded, 1000 records"), "{out}");
    wait_for(
        "1,000 rows with the new updated_at",
        Duration::from_secs(120),
        || async {
            Ok((count(
                "SELECT count(*) FROM records WHERE reused AND (payload->>'views')::int > 1000",
            )
            .await?
                == 1000)
                .then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    assert_eq!(
        llm_requests(&llm),
        paid,
        "no LLM call for unchanged content"
    );
    let after = enrichments(&client).await?;
    assert_eq!(
        after, before,
        "enrichments and when they were made are kept"
    );
    assert_eq!(
        count("SELECT count(*) FROM records WHERE source_updated_at > now() - interval '1 day 1 hour' AND cost_usd = 0 AND prompt_tokens = 0 AND saved_usd > 0").await?,
        1000,
        "updated_at moved; nothing spent; what was saved is recorded"
    );
    assert_eq!(
        metric(
            enricher_ops,
            "tardis_enrich_records_total",
            "outcome=\"reused\""
        )
        .await?,
        1000.0
    );
    let saved = metric(enricher_ops, "tardis_enrich_saved_usd_total", "").await?;
    let spent: f64 = client
        .query_one("SELECT sum(saved_usd)::float8 FROM records", &[])
        .await?
        .get(0);
    assert!(
        saved > 0.0 && (saved - spent).abs() < 1e-9,
        "{saved} vs {spent}"
    );
    assert!(metric(enricher_ops, "tardis_enrich_saved_calls_total", "").await? > 0.0);
    println!(
        "re-fetch of 1,000 unchanged records: {paid} LLM calls the first time, 0 the second; saved ${saved:.6}"
    );

    Ok(())
}

/// Scans of `records` (sequential and by index) counted by Postgres in this database, once
/// every other session has ended: a session flushes its counts as it ends, before it leaves
/// `pg_stat_activity` (Postgres 15 and later).
async fn scans_of_records(client: &tokio_postgres::Client) -> Result<i64> {
    wait_for("the other sessions to end", Duration::from_secs(30), || async {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        Ok((others == 0).then_some(()))
    })
    .await?;
    client
        .execute("SELECT pg_stat_clear_snapshot()", &[])
        .await?;
    Ok(client
        .query_one(
            "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8 FROM pg_stat_user_tables WHERE relname = 'records'",
            &[],
        )
        .await?
        .get(0))
}

#[tokio::test]
async fn a_first_load_looks_up_no_stored_enrichment_and_the_next_run_does() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let events = Events::default();
    let t0 = Utc::now() - chrono::Duration::days(2);
    *events.0.lock().unwrap() = (1..=1000)
        .map(|i| (i, t0 + chrono::Duration::seconds(i as i64), i))
        .collect();
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orders"))
        .respond_with(events.clone())
        .mount(&server)
        .await;
    let env = env_for(&t, &db, &format!("{}/orders", server.uri()), &llm);
    migrate(&env).await?;
    let client = db.connect().await?;
    let first_load_line = "no record of this source is stored yet";

    // The first run, nothing stored: one query says so, and no chunk is looked up.
    let before = scans_of_records(&client).await?;
    let out = fetch_once(&env).await?;
    assert!(out.contains("orders: succeeded, 1000 records"), "{out}");
    let first = scans_of_records(&client).await? - before;
    assert!(
        first <= 2,
        "a first load scanned records {first} times (a lookup per record would be 1,000)"
    );
    assert!(out.contains(first_load_line), "{out}");

    let writer = spawn_on("writer", &env, free_port()?)?;
    let enricher = spawn_on("enricher", &env, free_port()?)?;
    wait_for("1,000 rows", Duration::from_secs(120), || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0);
        Ok((n == 1000).then_some(()))
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\nenricher:\n{}\nwriter:\n{}",
            enricher.output(),
            writer.output()
        )
    })?;
    enricher.terminate()?;
    writer.terminate()?;

    // The source re-saves every record with the same content: the next run looks each up.
    for (_, t, _) in events.0.lock().unwrap().iter_mut() {
        *t += chrono::Duration::days(1);
    }
    let before = scans_of_records(&client).await?;
    let out = fetch_once(&env).await?;
    assert!(out.contains("orders: succeeded, 1000 records"), "{out}");
    assert!(!out.contains(first_load_line), "{out}");
    let second = scans_of_records(&client).await? - before;
    assert!(
        second >= 1000,
        "a run with records stored scanned records {second} times (one lookup per record)"
    );
    println!(
        "records scanned: {first} times by a first load of 1,000 records, {second} by the next run"
    );
    Ok(())
}

#[tokio::test]
async fn the_daily_budget_pauses_the_fleet_and_a_larger_one_resumes_it_without_loss() -> Result<()>
{
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let mut env = super::operations::base_env(&t, &db, &llm);
    env.insert("LLM_BATCH_SIZE".into(), "10".into());
    env.insert("LLM_CONCURRENCY".into(), "1".into());
    env.insert("ENRICH_MAX_IN_FLIGHT".into(), "1".into());
    // A request of 10 of these records costs about $0.0003 at $0.42 per million tokens.
    env.insert("LLM_DAILY_BUDGET_USD".into(), "0.001".into());
    migrate(&env).await?;
    crate::harness::fleet::publish_records(&t.jetstream(), &t.names(), "reviews", 400, 20).await?;

    let ops = free_port()?;
    let writer = spawn_on("writer", &env, free_port()?)?;
    let enricher = spawn_on("enricher", &env, ops)?;
    let client = db.connect().await?;
    let rows = || async {
        anyhow::Ok(
            client
                .query_one("SELECT count(*) FROM records", &[])
                .await?
                .get::<_, i64>(0),
        )
    };
    wait_for(
        "the enricher paused by the budget",
        Duration::from_secs(60),
        || async { Ok((metric(ops, "tardis_enrich_paused", "").await? == 1.0).then_some(())) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", enricher.output()))?;
    let spent = metric(ops, "tardis_llm_spend_today_usd", "").await?;
    assert!(spent >= 0.001, "{spent}");
    // Paused, not broken: ready, and what it held is finished; nothing more is taken.
    let (status, _) = http_get(&format!("http://127.0.0.1:{ops}/ready")).await?;
    assert_eq!(status, 200);
    let requests = llm_requests(&llm);
    let settled = wait_for(
        "the held chunk written",
        Duration::from_secs(30),
        || async {
            let n = rows().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok((rows().await? == n).then_some(n))
        },
    )
    .await?;
    assert!(settled < 400, "{settled} of 400 rows while paused");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(llm_requests(&llm), requests, "no request while paused");
    assert!(
        enricher.output().contains("reached LLM_DAILY_BUDGET_USD"),
        "{}",
        enricher.output()
    );
    assert_eq!(
        client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await?
            .get::<_, i64>(0),
        0,
        "nothing is dead-lettered for the budget"
    );

    // A larger budget (a restart with it) resumes: every record lands, once.
    enricher.terminate()?;
    env.insert("LLM_DAILY_BUDGET_USD".into(), "100".into());
    let enricher = spawn_on("enricher", &env, ops)?;
    wait_for("400 rows", Duration::from_secs(60), || async {
        Ok((rows().await? == 400).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", enricher.output(), writer.output()))?;
    assert_eq!(metric(ops, "tardis_enrich_paused", "").await?, 0.0);
    let distinct: i64 = client
        .query_one("SELECT count(DISTINCT record_id) FROM records", &[])
        .await?
        .get(0);
    assert_eq!(distinct, 400);
    Ok(())
}

/// Without a budget a replica saves its spend once a second, not per answer; what it has not
/// saved when it is stopped is saved on the way out, so the day's total is what the answers
/// cost, to the token. Stopped mid-run, its last answers come back after the SIGTERM, within
/// the second: without the save at stop the total falls short.
#[tokio::test]
async fn the_days_spend_is_exact_after_a_replica_stops_though_saved_once_a_second() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let mut env = super::operations::base_env(&t, &db, &llm);
    env.insert("LLM_BATCH_SIZE".into(), "10".into());
    migrate(&env).await?;
    crate::harness::fleet::publish_records(&t.jetstream(), &t.names(), "reviews", 4000, 20).await?;
    let _writer = spawn_on("writer", &env, free_port()?)?;
    let enricher = spawn_on("enricher", &env, free_port()?)?;
    let client = db.connect().await?;
    wait_for("100 rows", Duration::from_secs(60), || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0);
        Ok((n >= 100).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", enricher.output()))?;
    // Stopped mid-run: the answers to the requests in flight come back after the SIGTERM
    // (the mock LLM runs on this test's runtime, so the wait must not block it).
    let (code, output) = tokio::task::spawn_blocking(move || enricher.terminate()).await??;
    assert_eq!(code, Some(0), "{output}");

    let tokens = llm.mock.stats()["tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0);
    // LLM_PRICE_INPUT_PER_MTOK and LLM_PRICE_OUTPUT_PER_MTOK default to 0.42.
    let paid = tokens as f64 * 0.42 / 1e6;
    let kv = t
        .jetstream()
        .get_key_value(t.names().llm_budget_bucket())
        .await?;
    // Today's entry, and yesterday's should the test straddle midnight UTC.
    let now = Utc::now();
    let mut saved = 0.0;
    for day in [now, now - chrono::Duration::days(1)] {
        if let Some(v) = kv.get(format!("spend.{}", day.format("%Y-%m-%d"))).await? {
            saved += std::str::from_utf8(&v)?.trim().parse::<f64>()?;
        }
    }
    assert!(
        (saved - paid).abs() < 1e-9,
        "the day's total is {saved}, the answers cost {paid}\n{output}"
    );
    Ok(())
}

/// The reuse lookup of a chunk must cost a probe of the primary key per record, whatever the
/// size of `records`: on a table of tens of thousands of rows the planner's cost model picked
/// a hash join over a scan of the whole table, once per chunk (20 ms per chunk at 50,000 rows,
/// growing with the table, against ≈ 3 ms of probes).
#[tokio::test]
async fn the_reuse_lookup_probes_the_primary_key_whatever_the_tables_size() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    migrate(&super::writer::env(&t, &db.url)).await?;
    let client = db.connect().await?;
    let ids: Vec<String> = (0..1000).map(|i| (i * 37).to_string()).collect();
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    // Analyzed at 1,000 and 50,000 rows, and 20,000 rows the statistics (taken of the empty
    // table) still call empty.
    for (rows, analyze) in [(1_000, true), (50_000, true), (20_000, false)] {
        let (before, after) = if analyze {
            ("", "ANALYZE records")
        } else {
            ("ANALYZE records;", "")
        };
        client
            .batch_execute(&format!(
                "TRUNCATE records;
                 {before}
                 INSERT INTO records (source, record_id, payload, enrichment, model, prompt_version,
                     content_hash, fetched_at, enriched_at, content_key)
                 SELECT 's', i::text, jsonb_build_object('id', i, 'text', repeat('x', 200)),
                     '{{\"category\": \"c\"}}', 'm', 'v1', md5(i::text), now(), now(), 'k' || i
                 FROM generate_series(1, {rows}) i;
                 {after}"
            ))
            .await?;
        let plan: String = client
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) {}", fetcher::checkpoint::PRIORS),
                &[&"s", &ids, &keys],
            )
            .await?
            .get::<_, Value>(0)
            .to_string();
        assert!(
            !plan.contains("\"Seq Scan\"") && plan.contains("records_pkey"),
            "with {rows} rows in records (analyzed: {analyze}) the lookup scans the table: {plan}"
        );
    }
    Ok(())
}
