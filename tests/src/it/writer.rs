//! The writer against real Postgres and nats-server: migrations, idempotent upserts,
//! monotonic checkpoints, crashes and outages.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::json;
use tardis_common::messages::{
    self, Cursor, DeadLetter, EnrichedChunk, EnrichedRecord, SCHEMA_VERSION, SourceRecord, Stage,
    Usage,
};
use tardis_common::nats::{StreamKind, Topology, publish_durably};
use tokio_util::sync::CancellationToken;

use crate::harness::{Captured, PostgresServer, TestDb, TestNats, bins, free_port, wait_for};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

pub fn env(t: &TestNats, db_url: &str) -> BTreeMap<String, String> {
    [
        ("NATS_URL", t.url.as_str()),
        ("TARDIS_PREFIX", t.prefix.as_str()),
        ("OPS_ADDR", "127.0.0.1:0"),
        ("DATABASE_URL", db_url),
        ("PGSSLMODE", "disable"),
        ("WRITER_BATCH_WAIT", "100ms"),
        ("WRITER_ACK_WAIT", "3s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub async fn migrate(env: &BTreeMap<String, String>) -> Result<String> {
    let out = tokio::task::spawn_blocking({
        let env = env.clone();
        move || {
            Command::new(bins::bin("writer")?)
                .arg("migrate")
                .env_clear()
                .envs(&env)
                .output()
                .map_err(anyhow::Error::from)
        }
    })
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "writer migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Runs the writer binary until it exits (one that refuses to start).
async fn run_writer(env: &BTreeMap<String, String>) -> Result<std::process::Output> {
    let env = env.clone();
    tokio::task::spawn_blocking(move || {
        Command::new(bins::bin("writer")?)
            .env_clear()
            .envs(&env)
            .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
            .output()
            .map_err(anyhow::Error::from)
    })
    .await?
}

pub(super) fn start(
    env: &BTreeMap<String, String>,
) -> Result<(
    CancellationToken,
    tokio::task::JoinHandle<Result<std::process::ExitCode>>,
)> {
    let config = writer::Config::from_env(env)?;
    let stop = CancellationToken::new();
    Ok((stop.clone(), tokio::spawn(writer::run(config, stop))))
}

pub(super) async fn stop(
    h: (
        CancellationToken,
        tokio::task::JoinHandle<Result<std::process::ExitCode>>,
    ),
) -> Result<()> {
    h.0.cancel();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(20), h.1).await???,
        std::process::ExitCode::SUCCESS
    );
    Ok(())
}

/// An enriched chunk of `records` = (id, updated_at, payload text).
pub(super) fn chunk(source: &str, records: &[(&str, &str, &str)]) -> EnrichedChunk {
    let recs: Vec<EnrichedRecord> = records
        .iter()
        .map(|(id, t, text)| EnrichedRecord {
            id: id.to_string(),
            updated_at: Some(at(t)),
            payload: serde_json::value::RawValue::from_string(
                json!({"id": id, "text": text}).to_string(),
            )
            .unwrap(),
            enrichment: serde_json::value::to_raw_value(
                &json!({"sentiment": "neutral", "category": "test", "summary": text}),
            )
            .unwrap(),
            model: "m".into(),
            prompt_version: "v1-test".into(),
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cost_usd: 0.000_006,
            },
            enriched_at: Utc::now(),
            content_key: None,
            reused: false,
            saved_usd: 0.0,
        })
        .collect();
    let last = records
        .iter()
        .max_by_key(|(id, t, _)| (at(t), id.parse::<u64>().unwrap_or(0)))
        .unwrap();
    let source_records: Vec<SourceRecord> = recs
        .iter()
        .map(|r| SourceRecord {
            id: r.id.clone(),
            updated_at: r.updated_at,
            payload: r.payload.clone(),
            content_key: None,
            prior: None,
        })
        .collect();
    EnrichedChunk {
        schema_version: SCHEMA_VERSION,
        source: source.into(),
        chunk_id: messages::chunk_id(source, &source_records),
        run_id: "r".into(),
        chunk_seq: 0,
        records: recs,
        dead: vec![],
        part: None,
        cursor_after: Some(Cursor::Position {
            updated_at: at(last.1),
            id: last.0.to_string(),
            since: None,
        }),
        fetched_at: Utc::now(),
    }
}

/// Publishes `c` with a fresh `Nats-Msg-Id` (a replay JetStream does not de-duplicate).
pub(super) async fn publish(t: &TestNats, c: &EnrichedChunk) -> Result<()> {
    Topology::new(t.names(), Default::default())
        .provision(&t.jetstream(), &[StreamKind::Enriched], &[], false)
        .await?;
    let id = format!("{}-{}", c.msg_id(), crate::harness::unique_suffix());
    publish_durably(
        &t.jetstream(),
        &t.names().enriched_subject(&c.source),
        &id,
        messages::encode(c)?.into(),
        Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await?;
    Ok(())
}

async fn count(db: &TestDb, sql: &str) -> Result<i64> {
    Ok(db.connect().await?.query_one(sql, &[]).await?.get(0))
}

pub(super) async fn wait_rows(db: &TestDb, n: i64, within: Duration) -> Result<()> {
    wait_for(&format!("{n} rows in records"), within, || async {
        Ok((count(db, "SELECT count(*) FROM records").await? >= n).then_some(()))
    })
    .await
}

#[tokio::test]
async fn migrations_apply_once_and_the_writer_runs_on_newer_additive_ones_only() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    // Not migrated: the writer refuses and says how to fix it.
    let out = run_writer(&e).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the database schema is not initialised; run `writer migrate` first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = migrate(&e).await?;
    assert!(
        first.lines().any(|l| l == "applied migration 1 (init)")
            && first
                .lines()
                .any(|l| l == "applied migration 2 (dead_letter_raw)")
            && first
                .lines()
                .any(|l| l == "applied migration 3 (cost_numeric)")
            && first.lines().any(|l| l == "applied migration 4 (reuse)")
            && first
                .lines()
                .any(|l| l == "applied migration 5 (operations)"),
        "{first}"
    );
    let second = migrate(&e).await?;
    assert!(
        second.lines().any(|l| l == "schema up to date (version 5)"),
        "{second}"
    );
    assert!(!second.contains("applied migration"), "{second}");
    let tables = count(&db, "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('records','source_checkpoints','dead_letters','fetch_runs')").await?;
    assert_eq!(tables, 4);

    // A newer build's additive migration (a rollback after an upgrade, or an old writer pod
    // restarting): this writer and its `migrate` still run, and records are written.
    db.connect().await?.batch_execute("INSERT INTO tardis_schema_migrations (version, name, checksum, additive) VALUES (98, 'future_column', 'x', true)").await?;
    let again = migrate(&e).await?;
    assert!(
        again.lines().any(|l| l == "schema up to date (version 5)"),
        "{again}"
    );
    let w = start(&e)?;
    publish(
        &t,
        &chunk("s", &[("1", "2026-11-01T10:00:00Z", "on a newer schema")]),
    )
    .await?;
    wait_rows(&db, 1, Duration::from_secs(30)).await?;
    stop(w).await?;
    // Money is numeric: the record's cost is stored as the decimal it is, with no float noise.
    let cost: String = db
        .connect()
        .await?
        .query_one("SELECT cost_usd::text FROM records", &[])
        .await?
        .get(0);
    assert_eq!(cost, "0.000006000000");
    // One that is not additive: refused, naming it.
    db.connect().await?.batch_execute("INSERT INTO tardis_schema_migrations (version, name, checksum) VALUES (99, 'future', 'x')").await?;
    let out = run_writer(&e).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("newer than this writer knows (5), and migration 99 (future) is not additive; upgrade the writer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn replays_and_out_of_order_versions_leave_one_row_per_record_with_the_newest() -> Result<()>
{
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    let older = chunk(
        "s",
        &[
            ("1", "2026-11-01T10:00:00Z", "old one"),
            ("2", "2026-11-01T10:00:00Z", "two"),
        ],
    );
    let newer = chunk(
        "s",
        &[
            ("1", "2026-11-01T11:00:00Z", "new one"),
            ("3", "2026-11-01T11:00:00Z", "three"),
        ],
    );
    // Newest first, then the older version arrives late, twice.
    publish(&t, &newer).await?;
    publish(&t, &older).await?;
    publish(&t, &older).await?;
    let running = start(&e)?;
    wait_rows(&db, 3, Duration::from_secs(30)).await?;
    drained(&t).await?;
    let client = db.connect().await?;
    let rows = client.query("SELECT record_id, payload->>'text', xmin::text::bigint FROM records ORDER BY record_id", &[]).await?;
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            ("1".into(), "new one".into()),
            ("2".into(), "two".into()),
            ("3".into(), "three".into())
        ]
    );
    let cp = client
        .query_one(
            "SELECT cursor, records_written FROM source_checkpoints WHERE source = 's'",
            &[],
        )
        .await?;
    assert_eq!(
        cp.get::<_, serde_json::Value>(0),
        json!({"kind": "position", "updated_at": "2026-11-01T11:00:00Z", "id": "3"}),
        "the checkpoint is the maximum, whatever the order"
    );
    assert_eq!(cp.get::<_, i64>(1), 3, "the stale versions changed nothing");
    let xmins: Vec<i64> = rows.iter().map(|r| r.get(2)).collect();

    // An identical replay of everything: no row is touched.
    publish(&t, &newer).await?;
    publish(&t, &older).await?;
    drained(&t).await?;
    let after: Vec<i64> = client
        .query(
            "SELECT xmin::text::bigint FROM records ORDER BY record_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(after, xmins, "identical replays leave the rows untouched");
    assert_eq!(
        count(
            &db,
            "SELECT records_written FROM source_checkpoints WHERE source = 's'"
        )
        .await?,
        3
    );
    stop(running).await
}

#[tokio::test]
async fn the_same_content_takes_a_newer_different_enrichment_but_never_a_reused_or_older_one()
-> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    let running = start(&e)?;
    let client = db.connect().await?;
    let row = || async {
        let r = client
            .query_one(
                "SELECT prompt_version, enrichment->>'summary', reused, xmin::text::bigint FROM records WHERE record_id = '1'",
                &[],
            )
            .await?;
        anyhow::Ok((
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, bool>(2),
            r.get::<_, i64>(3),
        ))
    };
    let base = Utc::now() - chrono::Duration::hours(1);
    // Each variant is its own message (a re-enrichment is a new chunk id).
    let variant = |n: u32, prompt: &str, summary: &str, minutes: i64, reused: bool| {
        let mut c = chunk("s", &[("1", "2026-11-01T10:00:00Z", "same content")]);
        c.chunk_id = format!("variant-{n}");
        let r = &mut c.records[0];
        r.prompt_version = prompt.into();
        let mut enrichment: serde_json::Value = serde_json::from_str(r.enrichment.get()).unwrap();
        enrichment["summary"] = json!(summary);
        r.enrichment = serde_json::value::to_raw_value(&enrichment).unwrap();
        r.enriched_at = base + chrono::Duration::minutes(minutes);
        r.reused = reused;
        c
    };
    publish(&t, &variant(1, "v1-a", "first", 0, false)).await?;
    wait_rows(&db, 1, Duration::from_secs(30)).await?;
    drained(&t).await?;
    let (_, _, _, first_xmin) = row().await?;

    // A newer enrichment of the same content with another prompt replaces it.
    publish(&t, &variant(2, "v1-b", "second", 10, false)).await?;
    drained(&t).await?;
    let (prompt, summary, reused, xmin) = row().await?;
    assert_eq!(
        (prompt.as_str(), summary.as_str(), reused),
        ("v1-b", "second", false)
    );
    assert_ne!(xmin, first_xmin);

    // Older, reused, or the same enrichment again: nothing changes.
    publish(&t, &variant(3, "v1-c", "older", 5, false)).await?;
    publish(&t, &variant(4, "v1-d", "reused", 20, true)).await?;
    publish(&t, &variant(5, "v1-b", "second", 30, false)).await?;
    drained(&t).await?;
    assert_eq!(row().await?, (prompt, summary, reused, xmin));

    // The same prompt with a newer, different answer (a re-enrichment on purpose) replaces it.
    publish(&t, &variant(6, "v1-b", "third", 40, false)).await?;
    drained(&t).await?;
    assert_eq!(row().await?.1, "third");
    stop(running).await
}

#[tokio::test]
async fn dead_letters_and_fetch_runs_are_persisted() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    Topology::new(t.names(), Default::default())
        .provision(
            &t.jetstream(),
            &[StreamKind::DeadLetters, StreamKind::Runs],
            &[],
            false,
        )
        .await?;
    let letter = DeadLetter {
        schema_version: SCHEMA_VERSION,
        source: "s".into(),
        stage: Stage::Enrich,
        chunk_id: "c".into(),
        run_id: "r".into(),
        record: SourceRecord {
            id: "42".into(),
            updated_at: None,
            payload: serde_json::value::RawValue::from_string("{\"id\":42}".into())?,
            content_key: None,
            prior: None,
        },
        reason: "no valid enrichment after 3 attempts: sentiment".into(),
        attempts: 3,
        last_error: Some("sentiment".into()),
        failed_at: Utc::now(),
    };
    for _ in 0..2 {
        publish_durably(
            &t.jetstream(),
            &t.names().dlq_subject(Stage::Enrich, "s"),
            &format!("x{}", crate::harness::unique_suffix()),
            messages::encode(&letter)?.into(),
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await?;
    }
    let run = tardis_common::messages::FetchRun {
        schema_version: SCHEMA_VERSION,
        run_id: "run-1".into(),
        source: "s".into(),
        started_at: Utc::now(),
        finished_at: Utc::now(),
        records: 7,
        pages: 1,
        chunks: 1,
        bytes: 100,
        outcome: tardis_common::messages::RunOutcome::Incomplete,
        error: Some("max_pages (1) reached".into()),
        cursor_after: None,
        warnings: vec!["page full and no next page".into()],
        out_of_order: 0,
        cursor_before: None,
        note: None,
    };
    publish_durably(
        &t.jetstream(),
        &t.names().runs_subject("s"),
        &run.msg_id(),
        messages::encode(&run)?.into(),
        Duration::from_secs(5),
        &CancellationToken::new(),
    )
    .await?;
    let running = start(&e)?;
    wait_for(
        "the dead letter and the run",
        Duration::from_secs(30),
        || async {
            Ok((count(&db, "SELECT count(*) FROM dead_letters").await? == 1
                && count(&db, "SELECT count(*) FROM fetch_runs").await? == 1)
                .then_some(()))
        },
    )
    .await?;
    let row = db
        .connect()
        .await?
        .query_one(
            "SELECT stage, record_id, reason, attempts, occurrences FROM dead_letters",
            &[],
        )
        .await?;
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, i32>(3),
            row.get::<_, i32>(4)
        ),
        ("enrich".into(), "42".into(), 3, 1),
        "a replayed dead letter is one occurrence"
    );
    assert!(row.get::<_, String>(2).contains("sentiment"));
    assert_eq!(
        count(&db, "SELECT records FROM fetch_runs WHERE run_id = 'run-1'").await?,
        7
    );
    let run_row = db
        .connect()
        .await?
        .query_one(
            "SELECT outcome, error FROM fetch_runs WHERE run_id = 'run-1'",
            &[],
        )
        .await?;
    assert_eq!(run_row.get::<_, String>(0), "incomplete");
    assert_eq!(
        run_row.get::<_, String>(1),
        "max_pages (1) reached; warning: page full and no next page",
        "warnings are kept after the error"
    );
    stop(running).await
}

#[tokio::test]
async fn a_writer_killed_between_commit_and_ack_loses_and_duplicates_nothing() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    for i in 0..5 {
        let a = format!("{}", i * 2 + 1);
        let b = format!("{}", i * 2 + 2);
        publish(
            &t,
            &chunk(
                "s",
                &[
                    (&a, "2026-11-01T10:00:00Z", "x"),
                    (&b, "2026-11-01T10:00:01Z", "y"),
                ],
            ),
        )
        .await?;
    }
    let mut cmd = Command::new(bins::bin("writer")?);
    cmd.env_clear()
        .envs(&e)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .env("WRITER_TEST_CRASH_AFTER_COMMIT", "true")
        .env("WRITER_BATCH_MESSAGES", "2");
    let mut crashing = Captured::spawn(cmd)?;
    // Bounded: a writer whose hook does not fire fails the test (and is killed with it).
    let exit = wait_for(
        "the writer to abort after its first commit",
        Duration::from_secs(60),
        || {
            let exited = crashing.child.try_wait();
            async move { Ok(exited?) }
        },
    )
    .await?;
    let status = (exit, crashing.output());
    assert!(
        !status.0.success(),
        "the hook aborts the writer: {}",
        status.1
    );
    assert!(
        status
            .1
            .contains("aborting after the commit, before the ack"),
        "{}",
        status.1
    );
    let committed = count(&db, "SELECT count(*) FROM records").await?;
    assert!(
        committed > 0 && committed < 10,
        "one batch committed, {committed} rows"
    );
    let running = start(&e)?;
    wait_rows(&db, 10, Duration::from_secs(30)).await?;
    wait_for("the stream to drain", Duration::from_secs(30), || async {
        Ok((t
            .jetstream()
            .get_stream(t.names().stream(StreamKind::Enriched))
            .await?
            .info()
            .await?
            .state
            .messages
            == 0)
            .then_some(()))
    })
    .await?;
    assert_eq!(count(&db, "SELECT count(*) FROM records").await?, 10);
    assert_eq!(
        count(&db, "SELECT records_written FROM source_checkpoints").await?,
        10,
        "the replayed batch wrote nothing twice"
    );
    stop(running).await
}

#[tokio::test]
async fn postgres_down_for_ten_seconds_mid_stream_loses_nothing() -> Result<()> {
    let t = TestNats::new().await?;
    let mut pg = PostgresServer::start().await?;
    let db = TestDb::on(&pg.admin_url()).await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    let running = start(&e)?;
    let mut published = 0u64;
    let next = |n: u64| {
        let id = n.to_string();
        chunk("s", &[(id.as_str(), "2026-11-01T10:00:00Z", "z")])
    };
    for _ in 0..20 {
        published += 1;
        publish(&t, &next(published)).await?;
    }
    wait_rows(&db, 20, Duration::from_secs(30)).await?;
    pg.stop().await?;
    // Ten seconds without Postgres while records keep arriving.
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(10) {
        published += 1;
        publish(&t, &next(published)).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    pg.restart().await?;
    for _ in 0..20 {
        published += 1;
        publish(&t, &next(published)).await?;
    }
    wait_rows(&db, published as i64, Duration::from_secs(60)).await?;
    assert_eq!(
        count(&db, "SELECT count(*) FROM records").await?,
        published as i64
    );
    assert_eq!(
        count(&db, "SELECT count(DISTINCT record_id) FROM records").await?,
        published as i64
    );
    assert_eq!(
        count(&db, "SELECT records_written FROM source_checkpoints").await?,
        published as i64
    );
    stop(running).await
}

#[tokio::test]
async fn a_message_postgres_always_rejects_is_dead_lettered_without_blocking_the_rest() -> Result<()>
{
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let mut e = env(&t, &db.url);
    e.insert("WRITER_MAX_DELIVER".into(), "2".into());
    migrate(&e).await?;
    Topology::new(t.names(), Default::default())
        .provision(&t.jetstream(), &[StreamKind::DeadLetters], &[], false)
        .await?;
    publish(&t, &chunk("s", &[("1", "2026-11-01T10:00:00Z", "fine")])).await?;
    // Valid JSON that Postgres's jsonb refuses: a NUL character. The chunk also carries a
    // record the enricher gave up on, which must not vanish with it.
    let mut refused = chunk("s", &[("2", "2026-11-01T10:00:01Z", "bad \u{0000} byte")]);
    refused.dead.push(messages::DeadRecord {
        record: SourceRecord {
            id: "2b".into(),
            updated_at: None,
            payload: serde_json::value::RawValue::from_string(r#"{"id":"2b"}"#.into())?,
            content_key: None,
            prior: None,
        },
        reason: "no valid enrichment after 3 attempts".into(),
        attempts: 3,
        last_error: None,
        failed_at: Utc::now(),
    });
    publish(&t, &refused).await?;
    publish(
        &t,
        &chunk("s", &[("3", "2026-11-01T10:00:02Z", "fine too")]),
    )
    .await?;
    let running = start(&e)?;
    wait_rows(&db, 2, Duration::from_secs(30)).await?;
    // The writer dead-letters it on the DLQ stream, and persists its own dead letters too.
    wait_for(
        "the dead letter in Postgres",
        Duration::from_secs(60),
        || async {
            Ok((count(
                &db,
                "SELECT count(*) FROM dead_letters WHERE stage = 'write' AND record_id = '2'",
            )
            .await?
                == 1)
                .then_some(()))
        },
    )
    .await?;
    let reason: String = db
        .connect()
        .await?
        .query_one("SELECT reason FROM dead_letters WHERE record_id = '2'", &[])
        .await?
        .get(0);
    assert!(reason.contains("Postgres rejected it 2 times"), "{reason}");
    wait_for(
        "the chunk's dead record in dead_letters",
        Duration::from_secs(30),
        || async {
            Ok((count(
                &db,
                "SELECT count(*) FROM dead_letters WHERE record_id = '2b'",
            )
            .await?
                == 1)
                .then_some(()))
        },
    )
    .await?;
    let ids: Vec<String> = db
        .connect()
        .await?
        .query("SELECT record_id FROM records ORDER BY record_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec!["1", "3"], "the bad message blocked nothing");
    stop(running).await
}

/// Enriched chunk of `n` records without `updated_at`, with `text` in each, fetched at `at`.
fn untimed_chunk(n: u64, text: &str, fetched_at: DateTime<Utc>) -> EnrichedChunk {
    let mut c = chunk(
        "untimed",
        &(1..=n)
            .map(|i| (i.to_string(), "2026-11-01T10:00:00Z", format!("{text} {i}")))
            .collect::<Vec<_>>()
            .iter()
            .map(|(i, t, x)| (i.as_str(), *t, x.as_str()))
            .collect::<Vec<_>>(),
    );
    for r in &mut c.records {
        r.updated_at = None;
    }
    c.cursor_after = None;
    c.fetched_at = fetched_at;
    c
}

/// Waits until the writer consumed everything in the enriched stream.
pub(super) async fn drained(t: &TestNats) -> Result<()> {
    wait_for(
        "the enriched stream to drain",
        Duration::from_secs(30),
        || async {
            let left = stream_messages_left(t, StreamKind::Enriched).await?;
            Ok((left == 0).then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn records_without_updated_at_keep_the_version_fetched_last() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let e = env(&t, &db.url);
    migrate(&e).await?;
    let running = start(&e)?;
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let first = untimed_chunk(20, "first version", t0);
    let second = untimed_chunk(
        20,
        "changed at the source",
        t0 + chrono::Duration::minutes(1),
    );
    publish(&t, &first).await?;
    drained(&t).await?;
    publish(&t, &second).await?;
    drained(&t).await?;
    let client = db.connect().await?;
    let texts = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    let q = "SELECT payload->>'text' FROM records WHERE source = 'untimed' ORDER BY record_id::int";
    let got = texts(client.query(q, &[]).await?);
    let stale: Vec<&String> = got.iter().filter(|t| t.starts_with("first")).collect();
    assert!(
        stale.is_empty(),
        "{} of 20 kept an older version: {stale:?}",
        stale.len()
    );
    // The older fetch arriving late changes nothing; neither does re-fetching the same
    // content later.
    let xmins = |rows: Vec<tokio_postgres::Row>| -> Vec<i64> {
        rows.iter().map(|r| r.get::<_, i64>(0)).collect()
    };
    let xq =
        "SELECT xmin::text::bigint FROM records WHERE source = 'untimed' ORDER BY record_id::int";
    let before = xmins(client.query(xq, &[]).await?);
    publish(&t, &first).await?;
    let mut again = second.clone();
    again.fetched_at = t0 + chrono::Duration::minutes(2);
    publish(&t, &again).await?;
    drained(&t).await?;
    assert_eq!(texts(client.query(q, &[]).await?), got);
    assert_eq!(
        xmins(client.query(xq, &[]).await?),
        before,
        "an unchanged record fetched again is not rewritten"
    );
    stop(running).await
}

/// Publishes raw bytes on `subject` (a message no build of ours would write).
async fn publish_raw(t: &TestNats, subject: &str, bytes: Vec<u8>) -> Result<()> {
    Topology::new(t.names(), Default::default())
        .provision(
            &t.jetstream(),
            &[
                StreamKind::Enriched,
                StreamKind::DeadLetters,
                StreamKind::Runs,
            ],
            &[],
            false,
        )
        .await?;
    publish_durably(
        &t.jetstream(),
        subject,
        &format!("raw-{}", crate::harness::unique_suffix()),
        bytes.into(),
        Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await?;
    Ok(())
}

async fn stream_messages_left(t: &TestNats, kind: StreamKind) -> Result<u64> {
    Ok(t.jetstream()
        .get_stream(t.names().stream(kind))
        .await?
        .info()
        .await?
        .state
        .messages)
}

#[tokio::test]
async fn nothing_the_writer_cannot_read_is_dropped() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let mut e = env(&t, &db.url);
    let port = free_port()?;
    e.insert("OPS_ADDR".into(), format!("127.0.0.1:{port}"));
    migrate(&e).await?;
    // A run report from a newer build (a rolling upgrade in the wrong order).
    let newer = json!({"schema_version": 99, "run_id": "r", "source": "s", "what": "future"});
    publish_raw(
        &t,
        &t.names().runs_subject("s"),
        newer.to_string().into_bytes(),
    )
    .await?;
    // Bytes that are not JSON on the dead-letter subject.
    let garbage: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    publish_raw(
        &t,
        &t.names().dlq_subject(Stage::Enrich, "s"),
        garbage.clone(),
    )
    .await?;
    // A large enriched chunk of an unknown shape: kept whole, not cut to 64 KiB.
    let odd = json!({"schema_version": 2, "shape": "unknown", "blob": "y".repeat(200_000)});
    publish_raw(
        &t,
        &t.names().enriched_subject("s"),
        odd.to_string().into_bytes(),
    )
    .await?;
    let running = start(&e)?;
    let client = db.connect().await?;
    let rows = wait_for(
        "the unreadable messages in dead_letters",
        Duration::from_secs(30),
        || async {
            let rows = client
                .query(
                    "SELECT stage, payload::text, raw, reason FROM dead_letters ORDER BY length(reason)",
                    &[],
                )
                .await?;
            Ok((rows.len() == 2).then_some(rows))
        },
    )
    .await?;
    let raw: Vec<Option<Vec<u8>>> = rows.iter().map(|r| r.get(2)).collect();
    assert!(
        raw.contains(&Some(garbage)),
        "the bytes that are not JSON are kept whole"
    );
    let payloads: Vec<Option<String>> = rows.iter().map(|r| r.get(1)).collect();
    assert!(
        payloads
            .iter()
            .flatten()
            .any(|p| p.contains(&"y".repeat(200_000))),
        "the unreadable JSON is kept whole"
    );
    // The newer run report is handed back, again and again, and counted: never dropped.
    assert_eq!(stream_messages_left(&t, StreamKind::Runs).await?, 1);
    wait_metric(port, "tardis_writer_unreadable_total{", "newer_version").await?;
    assert_eq!(count(&db, "SELECT count(*) FROM fetch_runs").await?, 0);
    stop(running).await
}

#[tokio::test]
async fn a_stuck_lock_cannot_hold_a_batch_forever() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let mut e = env(&t, &db.url);
    let port = free_port()?;
    e.insert("OPS_ADDR".into(), format!("127.0.0.1:{port}"));
    e.insert("WRITER_STATEMENT_TIMEOUT".into(), "1s".into());
    migrate(&e).await?;
    // Another session holds the table for as long as it likes.
    let blocker = db.connect().await?;
    blocker
        .batch_execute("BEGIN; LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
        .await?;
    let running = start(&e)?;
    publish(
        &t,
        &chunk("s", &[("1", "2026-11-01T10:00:00Z", "behind a lock")]),
    )
    .await?;
    // The writer gives up on the blocked statement and says so.
    wait_metric(port, "tardis_writer_failures_total{", "kind=\"timeout\"").await?;
    blocker.batch_execute("ROLLBACK").await?;
    wait_rows(&db, 1, Duration::from_secs(30)).await?;
    stop(running).await
}

/// Waits until the worker on `port` exports a `metric` series whose labels contain `label`.
async fn wait_metric(port: u16, metric: &str, label: &str) -> Result<()> {
    wait_for(
        &format!("{metric}…{label} in /metrics"),
        Duration::from_secs(30),
        || async {
            let (_, metrics) =
                crate::harness::http_get(&format!("http://127.0.0.1:{port}/metrics")).await?;
            Ok(metrics
                .lines()
                .any(|l| l.starts_with(metric) && l.contains(label))
                .then_some(()))
        },
    )
    .await
}

/// `db_url` with another user and password.
fn as_user(db_url: &str, user: &str, password: &str) -> Result<String> {
    let mut url = url::Url::parse(db_url)?;
    url.set_username(user)
        .map_err(|()| anyhow::anyhow!("setting the user"))?;
    url.set_password(Some(password))
        .map_err(|()| anyhow::anyhow!("setting the password"))?;
    Ok(url.to_string())
}

#[tokio::test]
async fn the_optional_roles_get_their_privileges_only_and_log_in_with_the_secrets_passwords()
-> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let mut e = env(&t, &db.url);
    let writer_pw = format!("w-{}", crate::harness::unique_suffix());
    let fetcher_pw = format!("f-{}", crate::harness::unique_suffix());
    e.insert("TARDIS_DB_ROLES".into(), "true".into());
    e.insert("TARDIS_WRITER_DB_PASSWORD".into(), writer_pw.clone());
    e.insert("TARDIS_FETCHER_DB_PASSWORD".into(), fetcher_pw.clone());
    let out = migrate(&e).await?;
    assert!(
        out.contains("role tardis_writer may log in (password from TARDIS_WRITER_DB_PASSWORD)"),
        "{out}"
    );
    assert!(
        !out.contains(&writer_pw) && !out.contains(&fetcher_pw),
        "{out}"
    );
    // Idempotent: a second run (a rotation) works too.
    migrate(&e).await?;
    // Postgres holds a SCRAM verifier, never the password.
    let admin = db.connect().await?;
    let stored: Option<String> = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'tardis_writer'",
            &[],
        )
        .await?
        .get(0);
    let stored = stored.unwrap_or_default();
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    // The reader got no password: it cannot log in.
    let reader_login: bool = admin
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'tardis_reader'",
            &[],
        )
        .await?
        .get(0);
    assert!(!reader_login);

    // The writer, as tardis_writer, writes.
    let mut as_writer = env(&t, &as_user(&db.url, "tardis_writer", &writer_pw)?);
    as_writer.insert("WRITER_BATCH_WAIT".into(), "50ms".into());
    let w = start(&as_writer)?;
    publish(
        &t,
        &chunk("s", &[("1", "2026-11-01T10:00:00Z", "as tardis_writer")]),
    )
    .await?;
    wait_rows(&db, 1, Duration::from_secs(30)).await?;
    stop(w).await?;
    // ... and may not delete or change the schema.
    let writer =
        crate::harness::postgres::connect(&as_user(&db.url, "tardis_writer", &writer_pw)?).await?;
    for sql in [
        "DELETE FROM records",
        "TRUNCATE records",
        "DROP TABLE fetch_runs",
    ] {
        let e = writer.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }
    // The fetcher reads the checkpoint and what a stored enrichment is made of, nothing else
    // (not the payloads).
    let fetcher =
        crate::harness::postgres::connect(&as_user(&db.url, "tardis_fetcher", &fetcher_pw)?)
            .await?;
    let n: i64 = fetcher
        .query_one("SELECT count(*) FROM source_checkpoints", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    fetcher
        .batch_execute("SELECT record_id, content_key, enrichment, model, prompt_version, enriched_at, cost_usd + saved_usd FROM records WHERE source = 's'")
        .await?;
    for sql in [
        "SELECT payload FROM records",
        "SELECT * FROM records",
        "SELECT count(*) FROM dead_letters",
        "UPDATE source_checkpoints SET records_written = 0",
    ] {
        let e = fetcher.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }
    // A wrong password is refused.
    assert!(
        crate::harness::postgres::connect(&as_user(&db.url, "tardis_fetcher", "wrong")?)
            .await
            .is_err()
    );

    // Without TEMPORARY (a DBA's own roles, a database that revoked it from PUBLIC) the
    // writer cannot stage a batch: it refuses to start and names the GRANT, rather than
    // failing every batch.
    let dbname: String = admin
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    admin
        .batch_execute(&format!(
            "REVOKE TEMPORARY ON DATABASE \"{dbname}\" FROM PUBLIC, tardis_writer"
        ))
        .await?;
    let out = run_writer(&as_writer).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("GRANT TEMPORARY ON DATABASE <db> TO <user>"),
        "{stderr}"
    );
    assert!(!stderr.contains(&writer_pw), "{stderr}");
    // `writer migrate` with TARDIS_DB_ROLES grants it again, and the writer starts.
    migrate(&e).await?;
    let w = start(&as_writer)?;
    publish(
        &t,
        &chunk("s", &[("2", "2026-11-01T11:00:00Z", "after the grant")]),
    )
    .await?;
    wait_rows(&db, 2, Duration::from_secs(30)).await?;
    stop(w).await?;
    Ok(())
}
