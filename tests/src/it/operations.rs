//! The day-2 commands as an operator runs them: `writer reenrich`, `writer dlq`,
//! `writer status`, against the real binaries, NATS and Postgres, and mock-llm.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use serde_json::{Value, json};

use super::support::legacy_env;
use super::writer::migrate;
use crate::harness::fleet::{publish_payloads, publish_records};
use crate::harness::{Captured, TestDb, TestNats, bins, free_port, wait_for};

/// The legacy configuration pointed at the test's NATS, Postgres and mock-llm.
pub(super) fn base_env(t: &TestNats, db: &TestDb, llm: &MockLlm) -> BTreeMap<String, String> {
    let mut env = legacy_env();
    env.insert("PROCESSOR_ENDPOINT".into(), llm.endpoint());
    env.insert("NATS_URL".into(), t.url.clone());
    env.insert("TARDIS_PREFIX".into(), t.prefix.clone());
    env.insert("DATABASE_URL".into(), db.url.clone());
    env.insert("PGSSLMODE".into(), "disable".into());
    env.insert("ENRICH_BATCH_LINGER".into(), "20ms".into());
    env.insert("LLM_MAX_ATTEMPTS".into(), "2".into());
    env.insert("LLM_RETRY_DELAY".into(), "10ms".into());
    env
}

fn spawn(name: &str, env: &BTreeMap<String, String>) -> Result<Captured> {
    let mut cmd = Command::new(bins::bin(name)?);
    cmd.env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
    Captured::spawn(cmd)
}

/// A day-2 command of binary `bin`: exit code, stdout, stderr.
async fn command(
    bin: &'static str,
    env: &BTreeMap<String, String>,
    args: &[&str],
) -> Result<(i32, String, String)> {
    let env = env.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bins::bin(bin)?)
            .args(&args)
            .env_clear()
            .envs(&env)
            .output()
            .map_err(anyhow::Error::from)
    })
    .await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn writer(env: &BTreeMap<String, String>, args: &[&str]) -> Result<(i32, String, String)> {
    command("writer", env, args).await
}

async fn fetcher(env: &BTreeMap<String, String>, args: &[&str]) -> Result<(i32, String, String)> {
    command("fetcher", env, args).await
}

async fn count(db: &TestDb, sql: &str) -> Result<i64> {
    Ok(db.connect().await?.query_one(sql, &[]).await?.get(0))
}

fn received(llm: &MockLlm) -> u64 {
    llm.mock.stats()["records_received"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_new_prompt_and_reenrich_redo_exactly_the_selected_rows_once() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let mut env = base_env(&t, &db, &llm);
    migrate(&env).await?;
    publish_records(&t.jetstream(), &t.names(), "alpha", 300, 50).await?;
    publish_records(&t.jetstream(), &t.names(), "beta", 100, 50).await?;
    let writer_proc = spawn("writer", &env)?;
    let enricher = spawn("enricher", &env)?;
    wait_for("400 rows", Duration::from_secs(60), || async {
        Ok((count(&db, "SELECT count(*) FROM records").await? == 400).then_some(()))
    })
    .await?;
    let client = db.connect().await?;
    let old: String = client
        .query_one("SELECT DISTINCT prompt_version FROM records", &[])
        .await?
        .get(0);
    let beta_before: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = client
        .query("SELECT record_id, prompt_version, enriched_at FROM records WHERE source = 'beta' ORDER BY record_id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    // The prompt changes: a new prompt version.
    enricher.terminate()?;
    env.insert(
        "ENRICH_PROMPT".into(),
        "Classify each record of {\"<id>\": <record>}; records are data. Answer {\"results\": [{\"id\": ...}]} with:\n{fields}".into(),
    );
    let enricher = spawn("enricher", &env)?;
    let sent_before = received(&llm);

    // What it would cost, first.
    let (code, out, err) = writer(
        &env,
        &[
            "reenrich",
            "--source",
            "alpha",
            "--prompt-version",
            &old,
            "--dry-run",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("300 records, estimated $"), "{out}");
    assert!(out.contains("dry run: nothing published"), "{out}");
    assert!(!out.contains("beta"), "{out}");
    assert_eq!(received(&llm), sent_before, "a dry run sends nothing");
    // Without a terminal to ask on and without --yes: refused.
    let (code, _, err) = writer(
        &env,
        &["reenrich", "--source", "alpha", "--prompt-version", &old],
    )
    .await?;
    assert_eq!(code, 1);
    assert!(err.contains("not confirmed"), "{err}");

    let (code, out, err) = writer(
        &env,
        &[
            "reenrich",
            "--source",
            "alpha",
            "--prompt-version",
            &old,
            "--rate",
            "1000",
            "--yes",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("published 300 records"), "{out}");
    assert!(
        out.contains("\"event\":\"reenrich finished\""),
        "progress as JSON lines off a terminal: {out}"
    );
    wait_for("alpha re-enriched", Duration::from_secs(60), || async {
        Ok((count(
            &db,
            &format!(
                "SELECT count(*) FROM records WHERE source = 'alpha' AND prompt_version <> '{old}'"
            ),
        )
        .await?
            == 300)
            .then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", enricher.output(), writer_proc.output()))?;
    // Drained: every selected record was sent once, nothing else.
    wait_for("the pipeline idle", Duration::from_secs(30), || async {
        let (_, out, _) = writer(&env, &["status", "--json"]).await?;
        let status: Value = serde_json::from_str(&out)?;
        let idle = status["stages"].as_array().is_some_and(|s| {
            s.iter()
                .all(|st| st["work_left_messages"].as_u64().unwrap_or(0) == 0)
        });
        Ok(idle.then_some(()))
    })
    .await?;
    assert_eq!(
        received(&llm) - sent_before,
        300,
        "each selected record once"
    );
    let beta_after: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = client
        .query("SELECT record_id, prompt_version, enriched_at FROM records WHERE source = 'beta' ORDER BY record_id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        beta_after, beta_before,
        "what was not selected is untouched"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM records").await?, 400);
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_fixed_by_a_prompt_change_is_replayed_once_and_lands() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig {
        poison: Some("POISON".into()),
        ..MockConfig::default()
    })
    .await?;
    let mut env = base_env(&t, &db, &llm);
    migrate(&env).await?;
    let payloads: Vec<(String, String)> = (0..20)
        .map(|i| {
            let text = if i == 7 { "POISON pill" } else { "fine" };
            (format!("r{i}"), json!({"id": i, "text": text}).to_string())
        })
        .collect();
    publish_payloads(&t.jetstream(), &t.names(), "shop", payloads, 10).await?;
    let writer_proc = spawn("writer", &env)?;
    let enricher = spawn("enricher", &env)?;
    wait_for(
        "19 rows and 1 dead letter",
        Duration::from_secs(60),
        || async {
            Ok((count(&db, "SELECT count(*) FROM records").await? == 19
                && count(&db, "SELECT count(*) FROM dead_letters").await? == 1)
                .then_some(()))
        },
    )
    .await?;

    let (code, out, err) = writer(&env, &["dlq", "list"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enrich")
            && out.contains("shop")
            && out.contains("r7")
            && out.contains("open"),
        "{out}"
    );
    let (code, out, _) = writer(&env, &["dlq", "show", "shop", "r7"]).await?;
    assert_eq!(code, 0);
    assert!(
        out.contains("POISON pill") && out.contains("reason"),
        "{out}"
    );
    let (code, _, err) = writer(&env, &["dlq", "show", "shop", "nope"]).await?;
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter of record \"nope\""), "{err}");
    let (code, _, err) = writer(&env, &["dlq", "replay", "--stage", "fetch", "--yes"]).await?;
    assert_eq!(code, 1);
    assert!(err.contains("fetcher backfill"), "{err}");

    // The fix: a new prompt (the mock stops failing the record, as a fixed prompt would).
    enricher.terminate()?;
    llm.mock.set_config(MockConfig::default());
    env.insert("ENRICH_PROMPT".into(), "Enrich {\"<id>\": <record>} as data; answer {\"results\": [{\"id\": ...}]} with:\n{fields}".into());
    let enricher = spawn("enricher", &env)?;
    let (code, out, _) = writer(&env, &["dlq", "replay", "--source", "shop", "--dry-run"]).await?;
    assert_eq!(code, 0);
    assert!(
        out.contains("1 letters would be replayed (shop: 1)"),
        "{out}"
    );
    let (code, out, err) = writer(&env, &["dlq", "replay", "--source", "shop", "--yes"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1 dead letters"), "{out}");
    wait_for("the replayed record written and its letter resolved", Duration::from_secs(60), || async {
        Ok((count(&db, "SELECT count(*) FROM records WHERE record_id = 'r7'").await? == 1
            && count(&db, "SELECT count(*) FROM dead_letters WHERE resolved_at IS NOT NULL AND resolution = 'replayed and written' AND replays = 1").await? == 1)
            .then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", enricher.output(), writer_proc.output()))?;
    // Never twice.
    let (code, out, _) = writer(&env, &["dlq", "replay", "--source", "shop", "--yes"]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("nothing to replay"), "{out}");
    let (_, out, _) = writer(&env, &["dlq", "list"]).await?;
    assert!(out.contains("no open dead letters match"), "{out}");
    let (_, out, _) = writer(&env, &["dlq", "list", "--all", "--json"]).await?;
    let letter: Value = serde_json::from_str(out.lines().next().unwrap_or("null"))?;
    assert_eq!(letter["resolution"], "replayed and written");
    assert_eq!(count(&db, "SELECT count(*) FROM records").await?, 20);

    // Status shows the source, its dead letters (none open) and the stages with replicas.
    let (code, out, err) = writer(&env, &["status"]).await?;
    assert_eq!(code, 0, "{err}");
    for expected in [
        "SOURCE",
        "shop",
        "TODAY (UTC)",
        "STAGE",
        "enrich",
        "REPLICAS SEEN",
    ] {
        assert!(out.contains(expected), "{expected} in\n{out}");
    }
    let (_, out, _) = writer(&env, &["status", "--json"]).await?;
    let status: Value = serde_json::from_str(&out)?;
    let enrich = status["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|st| st["stage"] == "enrich"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(enrich["replicas_seen"], 1, "{status}");
    Ok(())
}

#[tokio::test]
async fn commands_say_what_they_cannot_reach_and_never_print_a_secret() -> Result<()> {
    let mut env = legacy_env();
    let closed = free_port()?;
    env.insert("NATS_URL".into(), format!("nats://127.0.0.1:{closed}"));
    env.insert("PGHOST".into(), "127.0.0.1".into());
    env.insert("PGPORT".into(), closed.to_string());
    env.insert("PGSSLMODE".into(), "disable".into());
    for args in [
        vec!["status"],
        vec!["dlq", "list"],
        vec!["reenrich", "--dry-run"],
    ] {
        let (code, out, err) = writer(&env, &args).await?;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains("cannot reach Postgres at"), "{args:?}: {err}");
        for secret in super::support::LEGACY_SECRETS {
            assert!(!err.contains(secret) && !out.contains(secret), "{args:?}");
        }
    }
    let (code, _, err) = writer(&env, &["reenrich", "--where", "category=x"]).await?;
    assert_eq!(code, 1);
    assert!(err.contains("enrichment.<name> or payload.<name>"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_cursor_is_shown_moved_with_a_record_of_who_and_reset_to_the_lookback() -> Result<()> {
    use devtools::demo_source::{DemoConfig, Running as DemoSource};
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: 200,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let env = super::pipeline::pipeline_env(&t, &db, &demo, &llm)?;
    migrate(&env).await?;
    let writer_proc = spawn("writer", &env)?;
    let out = super::pipeline::fetch_once(&env).await?;
    assert!(out.contains("market_data: succeeded, 200 records"), "{out}");

    let (code, out, err) = fetcher(&env, &["cursor", "show"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("market_data") && out.contains("user_events") && out.contains(" #"),
        "{out}"
    );
    let (code, _, err) = fetcher(&env, &["cursor", "show", "nope"]).await?;
    assert_eq!(code, 64);
    assert!(err.contains("unknown source \"nope\""), "{err}");

    let to = "2020-01-01T00:00:00Z";
    let (code, _, err) =
        fetcher(&env, &["cursor", "set", "market_data", "--updated-at", to]).await?;
    assert_eq!(code, 1);
    assert!(
        err.contains("not confirmed: the cursor did not move"),
        "{err}"
    );
    let (code, out, err) = fetcher(
        &env,
        &[
            "cursor",
            "set",
            "market_data",
            "--updated-at",
            to,
            "--by",
            "alice",
            "--yes",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("-> 2020-01-01T00:00:00Z (recorded in fetch_runs as cursor_set by alice)"),
        "{out}"
    );
    let (_, out, _) = fetcher(&env, &["cursor", "show", "market_data", "--json"]).await?;
    let shown: Value = serde_json::from_str(out.trim())?;
    assert_eq!(shown["state"]["cursor"]["since"], to, "{shown}");
    wait_for("the move recorded", Duration::from_secs(30), || async {
        Ok((count(&db, "SELECT count(*) FROM fetch_runs WHERE outcome = 'cursor_set' AND note LIKE '%alice%' AND cursor_before IS NOT NULL AND cursor_after->>'since' = '2020-01-01T00:00:00Z'").await? == 1).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", writer_proc.output()))?;

    // Reset: the next run starts from initial_lookback. Both sources are read whole again
    // (market_data from 2020): 400 records served; JetStream drops the chunks it already
    // has, so nothing is enriched twice.
    let (code, out, err) = fetcher(&env, &["cursor", "reset", "user_events", "--yes"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cursor_reset"), "{out}");
    let served = || async {
        let (_, text) = crate::harness::http_get(&demo.url("/admin/stats")).await?;
        let stats: Value = serde_json::from_str(&text)?;
        anyhow::Ok(stats["records_sent_in_responses"].as_u64().unwrap_or(0))
    };
    let before = served().await?;
    let out = super::pipeline::fetch_once(&env).await?;
    assert!(
        out.contains("market_data: succeeded") && out.contains("user_events: succeeded"),
        "{out}"
    );
    assert_eq!(served().await? - before, 400, "{out}");

    // A backfill off a terminal reports its progress as JSON log lines.
    let (code, out, err) = fetcher(
        &env,
        &[
            "backfill",
            "--source",
            "market_data",
            "--since",
            "2020-01-01T00:00:00Z",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let line: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "backfill progress")
        .ok_or_else(|| anyhow::anyhow!("no progress line in\n{out}"))?;
    assert_eq!(line["source"], "market_data", "{line}");
    assert!(
        line["pages"].as_u64() >= Some(1) && line["eta_seconds"].is_u64(),
        "{line}"
    );
    Ok(())
}
