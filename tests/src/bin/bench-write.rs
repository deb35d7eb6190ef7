//! Benchmark: the writer's rows/s for N enriched records, beside a plain `COPY` of the same
//! rows into the same Postgres in the same run.
//!
//! `cargo run --release -p tardis-tests --bin bench-write -- [N]` (default 100000)
//!
//! Publishes N enriched records (chunks of 1000) to a fresh enriched stream, migrates a fresh
//! database, runs one `writer` (release build, a real process) and times it until every row
//! is in `records`. Then COPYs the same rows (binary format) into a table of the same shape
//! and indexes, and prints both rates and their ratio.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::json;
use tardis_common::messages::{self, Cursor, EnrichedChunk, EnrichedRecord, SCHEMA_VERSION, Usage};
use tardis_common::nats::{Names, StreamKind, StreamSettings, Topology, publish_durably};
use tardis_tests::harness::{Captured, NatsServer, PostgresServer, TestDb, bins, free_port};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;

fn record(i: u64, now: chrono::DateTime<chrono::Utc>) -> EnrichedRecord {
    EnrichedRecord {
        id: i.to_string(),
        updated_at: Some(now + chrono::Duration::milliseconds(i as i64)),
        payload: serde_json::value::RawValue::from_string(
            json!({"id": i, "symbol": "ACME", "price": 12.5 + i as f64 / 100.0, "headline": format!("ACME trades flat, tick {i}")}).to_string(),
        )
        .expect("valid JSON"),
        enrichment: json!({"sentiment": "neutral", "category": "market", "summary": "ACME trades flat."}),
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
    let nats = NatsServer::start().await?;
    let pg = PostgresServer::start().await?;
    let db = TestDb::on(&pg.admin_url()).await?;
    let names = Names::with_prefix("benchwrite");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    Topology::new(names.clone(), StreamSettings::default())
        .provision(&js, &[StreamKind::Enriched], &[], false)
        .await?;
    let now = chrono::Utc::now();
    let mut chunks = Vec::new();
    for (seq, start) in (1..=n).step_by(1000).enumerate() {
        let records: Vec<EnrichedRecord> = (start..=(start + 999).min(n))
            .map(|i| record(i, now))
            .collect();
        let last = records.last().expect("non-empty");
        let chunk = EnrichedChunk {
            schema_version: SCHEMA_VERSION,
            source: "bench".into(),
            chunk_id: format!("bench-{seq}"),
            run_id: "bench".into(),
            chunk_seq: seq as u64,
            cursor_after: Some(Cursor::Position {
                updated_at: last.updated_at.expect("set"),
                id: last.id.clone(),
                since: None,
            }),
            records,
            dead: vec![],
            fetched_at: now,
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
        chunks.push(chunk);
    }
    let env = [
        ("NATS_URL", nats.url()),
        ("TARDIS_PREFIX", "benchwrite".to_string()),
        ("DATABASE_URL", db.url.clone()),
        ("PGSSLMODE", "disable".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let out = Command::new(bins::bin("writer")?)
        .arg("migrate")
        .env_clear()
        .envs(env.clone())
        .output()?;
    if !out.status.success() {
        bail!("migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let client = db.connect().await?;
    let mut cmd = Command::new(bins::bin("writer")?);
    cmd.env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
    let started = tokio::time::Instant::now();
    let writer = Captured::spawn(cmd)?;
    loop {
        let rows: i64 = client
            .query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0);
        if rows as u64 >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("writer not done after 10 minutes:\n{}", writer.output());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writer_secs = started.elapsed().as_secs_f64();
    tokio::task::spawn_blocking(move || writer.terminate()).await??;

    // The same rows with a bare COPY into a table of the same shape and indexes.
    client
        // cost_usd as float8 (the writer's own parameter type; COPY BINARY of numeric needs a
        // decimal type this bench does not have): the baseline is, if anything, generous.
        .batch_execute(
            "CREATE TABLE records_copy (LIKE records INCLUDING ALL);
             ALTER TABLE records_copy ALTER COLUMN cost_usd TYPE double precision",
        )
        .await?;
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::JSONB,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
        Type::FLOAT8,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
    ];
    let started = tokio::time::Instant::now();
    let sink = client
        .copy_in("COPY records_copy (source, record_id, payload, enrichment, model, prompt_version, content_hash, source_updated_at, prompt_tokens, completion_tokens, cost_usd, fetched_at, enriched_at, written_at) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for c in &chunks {
        for r in &c.records {
            let payload: serde_json::Value = serde_json::from_str(r.payload.get())?;
            let hash = writer::store::content_hash(r.payload.get());
            let (pt, ct) = (
                r.usage.prompt_tokens as i64,
                r.usage.completion_tokens as i64,
            );
            let row: [&(dyn ToSql + Sync); 14] = [
                &c.source,
                &r.id,
                &payload,
                &r.enrichment,
                &r.model,
                &r.prompt_version,
                &hash,
                &r.updated_at,
                &pt,
                &ct,
                &r.usage.cost_usd,
                &c.fetched_at,
                &r.enriched_at,
                &now,
            ];
            writer.as_mut().write(&row).await?;
        }
    }
    writer.finish().await?;
    let copy_secs = started.elapsed().as_secs_f64();
    let (w, c) = (n as f64 / writer_secs, n as f64 / copy_secs);
    println!("{:>10}  {:>9}  {:>10}", "rows", "seconds", "rows/s");
    println!(
        "writer     {n:>10}  {writer_secs:>9.2}  {w:>10.0}   (NATS → upsert → checkpoint → ack, end to end)"
    );
    println!("plain COPY {n:>10}  {copy_secs:>9.2}  {c:>10.0}");
    println!("ratio: writer / COPY = {:.0} %", w / c * 100.0);
    Ok(())
}
