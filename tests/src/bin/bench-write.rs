//! Benchmark: the writer's rows/s for N enriched records, beside a plain `COPY` of the same
//! rows into the same Postgres in the same run.
//!
//! `cargo run --release -p tardis-tests --bin bench-write -- [N] [RUNS] [KEYS]` (default
//! 100000, 3, `new`)
//!
//! Publishes N enriched records (chunks of 1000) to a fresh enriched stream, migrates a fresh
//! database, runs one `writer` (release build, a real process) and times it until every row
//! is in `records`. KEYS says what the timed pass meets: `new` keys (a first load: batches go
//! straight in with a `COPY` after the first), or rows already written by an untimed first
//! pass — `updated` (every record newer and changed: the merge updates every row) or
//! `unchanged` (the same records again, a re-fetch: the merge changes nothing); for those the
//! writer is timed until the stream is empty. Then COPYs the same rows (binary format) into a table of the same shape
//! and indexes, and prints both rates and their ratio; RUNS times, then the median ratio
//! (on a shared machine one run's COPY varies by half). `WRITER_*` variables in the
//! environment reach the writer (`WRITER_CONCURRENCY=1 bench-write` measures one loop).

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::json;
use tardis_common::messages::{self, Cursor, EnrichedChunk, EnrichedRecord, SCHEMA_VERSION, Usage};
use tardis_common::nats::{Names, StreamKind, StreamSettings, Topology, publish_durably};
use tardis_tests::bench::{conditions, copy_baseline, rows_written};
use tardis_tests::harness::{Captured, NatsServer, PostgresServer, TestDb, bins, free_port};
use tokio_util::sync::CancellationToken;

/// What the timed pass meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    New,
    Updated,
    Unchanged,
}

/// Record `i` as fetched in `version` (a later version is an hour newer and says so).
fn record(i: u64, now: chrono::DateTime<chrono::Utc>, version: i64) -> EnrichedRecord {
    let now = now + chrono::Duration::hours(version);
    EnrichedRecord {
        id: i.to_string(),
        updated_at: Some(now + chrono::Duration::milliseconds(i as i64)),
        payload: serde_json::value::RawValue::from_string(
            json!({"id": i, "symbol": "ACME", "price": 12.5 + i as f64 / 100.0, "headline": format!("ACME trades flat, tick {i}, version {version}")}).to_string(),
        )
        .expect("valid JSON"),
        enrichment: serde_json::value::to_raw_value(
            &json!({"sentiment": "neutral", "category": "market", "summary": "ACME trades flat."}),
        )
        .expect("a Value serializes"),
        model: "deepseek-v3.2".into(),
        prompt_version: "v1-bench".into(),
        usage: Usage { prompt_tokens: 40, completion_tokens: 20, cost_usd: 0.000_025 },
        enriched_at: now,
        content_key: None,
        reused: false,
        saved_usd: 0.0,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.replace('_', "").parse())
        .transpose()?
        .unwrap_or(100_000);
    let repeat: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    let keys = match std::env::args().nth(3).as_deref() {
        None | Some("new") => Keys::New,
        Some("updated") => Keys::Updated,
        Some("unchanged") => Keys::Unchanged,
        Some(other) => bail!("KEYS is new, updated or unchanged, not {other:?}"),
    };
    let nats = NatsServer::start().await?;
    let pg = PostgresServer::start().await?;
    println!("{}", conditions());
    println!("keys: {keys:?}");
    println!(
        "writer: WRITER_CONCURRENCY {}, WRITER_BATCH_BYTES {}; each run a fresh stream and database",
        std::env::var("WRITER_CONCURRENCY").unwrap_or_else(|_| "default".into()),
        std::env::var("WRITER_BATCH_BYTES").unwrap_or_else(|_| "default".into())
    );
    println!(
        "{:>4}  {:>10}  {:>12}  {:>10}  {:>12}  {:>6}",
        "run", "rows", "writer s", "writer/s", "COPY s", "ratio"
    );
    let mut ratios = Vec::new();
    for run in 1..=repeat.max(1) {
        let (writer_secs, copied, copy_secs) = once(&nats, &pg, n, run, keys).await?;
        let (w, c) = (n as f64 / writer_secs, copied as f64 / copy_secs);
        println!(
            "{run:>4}  {n:>10}  {writer_secs:>12.2}  {w:>10.0}  {copy_secs:>12.2}  {:>5.0} %",
            w / c * 100.0
        );
        ratios.push(w / c);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio: writer / COPY = {:.0} % (median of {} runs; NATS → COPY, or stage and merge → checkpoint → commit → ack, end to end, against a bare binary COPY of the same rows)",
        ratios[ratios.len() / 2] * 100.0,
        ratios.len()
    );
    Ok(())
}

/// One run: publishes, writes, COPYs; returns the writer's seconds, the rows COPYed and the
/// COPY's seconds.
async fn once(
    nats: &NatsServer,
    pg: &PostgresServer,
    n: u64,
    run: usize,
    keys: Keys,
) -> Result<(f64, u64, f64)> {
    let db = TestDb::on(&pg.admin_url()).await?;
    let prefix = format!("benchwrite{run}");
    let names = Names::with_prefix(&prefix);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    Topology::new(names.clone(), StreamSettings::default())
        .provision(&js, &[StreamKind::Enriched], &[], false)
        .await?;
    let now = chrono::Utc::now();
    let publish = |pass: usize, version: i64| {
        let (js, names) = (js.clone(), names.clone());
        async move {
            for (seq, start) in (1..=n).step_by(1000).enumerate() {
                let records: Vec<EnrichedRecord> = (start..=(start + 999).min(n))
                    .map(|i| record(i, now, version))
                    .collect();
                let last = records.last().expect("non-empty");
                let chunk = EnrichedChunk {
                    schema_version: SCHEMA_VERSION,
                    source: "bench".into(),
                    chunk_id: format!("bench-{pass}-{seq}"),
                    run_id: "bench".into(),
                    chunk_seq: seq as u64,
                    cursor_after: Some(Cursor::Position {
                        updated_at: last.updated_at.expect("set"),
                        id: last.id.clone(),
                        since: None,
                    }),
                    records,
                    dead: vec![],
                    fetched_at: now + chrono::Duration::hours(version),
                    part: None,
                };
                publish_durably(
                    &js,
                    &names.enriched_subject("bench"),
                    &chunk.msg_id(),
                    messages::encode(&chunk)?.into(),
                    Duration::from_secs(10),
                    &CancellationToken::new(),
                )
                .await?;
            }
            anyhow::Ok(())
        }
    };
    let env = [
        ("NATS_URL", nats.url()),
        ("TARDIS_PREFIX", prefix.clone()),
        ("DATABASE_URL", db.url.clone()),
        ("PGSSLMODE", "disable".into()),
        ("RUST_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(std::env::vars().filter(|(k, _)| k.starts_with("WRITER_")))
    .collect::<Vec<(String, String)>>();
    let out = Command::new(bins::bin("writer")?)
        .arg("migrate")
        .env_clear()
        .envs(env.iter().cloned())
        .output()?;
    if !out.status.success() {
        bail!("migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let client = db.connect().await?;
    let spawn = || -> Result<Captured> {
        let mut cmd = Command::new(bins::bin("writer")?);
        cmd.env_clear()
            .envs(env.iter().cloned())
            .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
        Captured::spawn(cmd)
    };
    let stream = names.stream(StreamKind::Enriched);
    let left = || {
        let (js, stream) = (js.clone(), stream.clone());
        async move { anyhow::Ok(js.get_stream(&stream).await?.info().await?.state.messages) }
    };
    if keys != Keys::New {
        // The untimed first pass: the rows the timed one meets.
        publish(0, 0).await?;
        let writer = spawn()?;
        let started = tokio::time::Instant::now();
        while rows_written(&client).await? < n as i64 || left().await? > 0 {
            if started.elapsed() > Duration::from_secs(600) {
                bail!(
                    "the first pass not written after 10 minutes:\n{}",
                    writer.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::spawn_blocking(move || writer.terminate()).await??;
    }
    publish(1, if keys == Keys::Updated { 1 } else { 0 }).await?;
    let expected = match keys {
        Keys::New | Keys::Unchanged => n,
        Keys::Updated => 2 * n,
    };
    let started = tokio::time::Instant::now();
    let writer = spawn()?;
    loop {
        if rows_written(&client).await? as u64 >= expected && left().await? == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("writer not done after 10 minutes:\n{}", writer.output());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writer_secs = started.elapsed().as_secs_f64();
    tokio::task::spawn_blocking(move || writer.terminate()).await??;
    let written = rows_written(&client).await? as u64;
    if written != expected {
        bail!("{written} rows written (checkpoint), {expected} expected");
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM records", &[])
        .await?
        .get(0);
    if rows as u64 != n {
        bail!("{rows} rows in records, {n} expected");
    }
    // The same rows with a bare binary COPY into a table of the same shape and indexes.
    let (copied, copy_secs) = copy_baseline(&client).await?;
    Ok((writer_secs, copied, copy_secs))
}
