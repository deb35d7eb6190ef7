//! The writer's two ways into `records` against real Postgres: a binary `COPY` straight into
//! the table for batches of new keys, the staging merge otherwise. They must store the same
//! values, and a `COPY` that meets an existing key must fall back to the merge, leaving
//! nothing of itself behind.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::json;
use tardis_common::messages::{Cursor, EnrichedChunk, EnrichedRecord, SCHEMA_VERSION, Usage};
use tokio_postgres::error::SqlState;
use writer::store::{self, Path, Written};

use super::writer::{self as w, env, migrate};
use crate::harness::{TestDb, TestNats};

/// Costs whose `numeric(20, 12)` values the two paths must agree on: binary fractions that
/// are not decimals, 15-digit rounding, ties at the 12th decimal, tiny and large values.
const COSTS: [f64; 18] = [
    0.0,
    -0.0,
    // A tie at the 16th significant digit: `%.15g` rounds it half to even (…240620).
    1_000.000_244_140_625,
    -5e-13,
    5e-324,
    0.000_025,
    0.1 + 0.2,
    1.0 / 3.0,
    2.0 / 3.0,
    5e-13,
    1.5e-12,
    2.5e-12,
    4.999_999_999_999_5e-7,
    1e-13,
    12_345.678_901_234_567,
    99_999_999.999_999_9,
    -0.5,
    7e-300,
];

/// A chunk of `source` with a record per id, the i-th costing `COSTS[i % COSTS.len()]`.
fn chunk(source: &str, ids: &[u32], text: &str, updated_at: DateTime<Utc>) -> EnrichedChunk {
    let records: Vec<EnrichedRecord> = ids
        .iter()
        .map(|&i| EnrichedRecord {
            id: i.to_string(),
            updated_at: (i % 3 != 0).then_some(updated_at),
            payload: serde_json::value::RawValue::from_string(
                json!({"id": i, "text": text, "nested": {"a": [1, 2.50, "ü\u{1F600}"]}})
                    .to_string(),
            )
            .unwrap(),
            enrichment: serde_json::value::to_raw_value(
                &json!({"sentiment": "neutral", "category": "test", "summary": text}),
            )
            .unwrap(),
            model: "m".into(),
            prompt_version: "v1-test".into(),
            usage: Usage {
                prompt_tokens: u64::from(i) * 7,
                completion_tokens: 5,
                cost_usd: COSTS[i as usize % COSTS.len()],
            },
            enriched_at: updated_at,
            content_key: (i % 2 == 0).then(|| format!("k{i}")),
            reused: i % 4 == 0,
            saved_usd: COSTS[(i as usize + 5) % COSTS.len()],
        })
        .collect();
    EnrichedChunk {
        schema_version: SCHEMA_VERSION,
        source: source.into(),
        chunk_id: format!("{source}-{text}"),
        run_id: "r".into(),
        chunk_seq: 0,
        cursor_after: Some(Cursor::Position {
            updated_at,
            id: ids.iter().max().unwrap().to_string(),
            since: None,
        }),
        records,
        dead: vec![],
        fetched_at: updated_at,
        part: None,
    }
}

/// Writes `chunk` in one transaction by `path`.
async fn write(
    client: &mut tokio_postgres::Client,
    chunk: &EnrichedChunk,
    path: Path,
) -> Result<Written, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let chunks = [chunk];
    let rows = store::rows(&chunks);
    let cursors = store::checkpoints(&chunks);
    let written = store::write_records(
        &tx,
        &rows,
        &cursors,
        std::slice::from_ref(&chunk.source),
        path,
    )
    .await?;
    tx.commit().await?;
    Ok(written)
}

/// Every column of a source's rows but `source` and `written_at`, as text, by record id.
async fn stored(client: &tokio_postgres::Client, source: &str) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT (to_jsonb(r) - 'source' - 'written_at')::text FROM records r
             WHERE source = $1 ORDER BY record_id",
            &[&source],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[tokio::test]
async fn a_batch_of_new_keys_copied_straight_in_stores_exactly_what_the_merge_stores() -> Result<()>
{
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    migrate(&env(&t, &db.url)).await?;
    let mut client = db.connect().await?;
    let at = Utc::now();
    let ids: Vec<u32> = (0..42).collect();

    let copied = write(&mut client, &chunk("a", &ids, "one", at), Path::Copy).await?;
    let merged = write(&mut client, &chunk("b", &ids, "one", at), Path::Merge).await?;
    assert_eq!(copied.path, Path::Copy);
    assert_eq!(merged.path, Path::Merge);
    assert!(copied.all_new && merged.all_new);
    assert_eq!(copied.changed, HashMap::from([("a".to_string(), 42)]));
    assert_eq!(merged.changed, HashMap::from([("b".to_string(), 42)]));
    let (a, b) = (stored(&client, "a").await?, stored(&client, "b").await?);
    assert_eq!(a.len(), 42);
    assert_eq!(
        a, b,
        "the COPY stores what the merge stores, column by column"
    );
    // Spot checks against Postgres's own cast, so a bug shared by both paths shows too.
    for (i, cost) in COSTS.iter().enumerate() {
        let expected: String = client
            .query_one("SELECT ($1::float8)::numeric(20, 12)::text", &[cost])
            .await?
            .get(0);
        let got: String = client
            .query_one(
                "SELECT cost_usd::text FROM records WHERE source = 'a' AND record_id = $1",
                &[&i.to_string()],
            )
            .await?
            .get(0);
        assert_eq!(got, expected, "cost {cost:e}");
    }
    // `written_at` is the transaction's `now()`, as the checkpoint's `updated_at` is.
    let written_at_is_the_transactions: bool = client
        .query_one(
            "SELECT bool_and(r.written_at = c.updated_at)
               FROM records r JOIN source_checkpoints c USING (source)",
            &[],
        )
        .await?
        .get(0);
    assert!(written_at_is_the_transactions);
    assert!(store::copy_fits(&client).await?);

    // A value the column cannot hold is the same error either way.
    for (source, path) in [("c", Path::Copy), ("d", Path::Merge)] {
        let mut too_big = chunk(source, &[1], "big", at);
        too_big.records[0].usage.cost_usd = 1e9;
        let e = write(&mut client, &too_big, path)
            .await
            .expect_err("numeric(20, 12) holds less than 1e8");
        assert_eq!(
            e.code(),
            Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE),
            "{path:?}: {e}"
        );
    }
    // A column of another type than the COPY sends (a later migration's): no COPY path.
    client
        .batch_execute("ALTER TABLE records ALTER COLUMN completion_tokens TYPE numeric")
        .await?;
    assert!(!store::copy_fits(&client).await?);
    Ok(())
}

/// `(record_id, xmin, payload's text)` of every row.
async fn xmins(client: &tokio_postgres::Client) -> Result<Vec<(String, i64, String)>> {
    Ok(client
        .query(
            "SELECT record_id, xmin::text::bigint, payload->>'text' FROM records ORDER BY record_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

#[tokio::test]
async fn a_copy_that_meets_an_existing_key_is_rolled_back_and_the_batch_merged() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    migrate(&env(&t, &db.url)).await?;
    let mut client = db.connect().await?;
    let at = Utc::now();
    write(&mut client, &chunk("s", &[1, 2, 3], "old", at), Path::Copy).await?;
    let before = xmins(&client).await?;

    // The same batch again: every key exists, nothing changes.
    let replay = write(&mut client, &chunk("s", &[1, 2, 3], "old", at), Path::Copy).await?;
    assert_eq!(replay.path, Path::Merge);
    assert!(!replay.all_new);
    assert_eq!(replay.changed, HashMap::from([("s".to_string(), 0)]));
    assert_eq!(xmins(&client).await?, before, "a replay touches no row");

    // New keys and a newer version of an existing one: merged, the newer version wins, the
    // next batch is told to merge.
    let later = at + chrono::Duration::seconds(1);
    let mixed = write(
        &mut client,
        &chunk("s", &[3, 4, 5], "new", later),
        Path::Copy,
    )
    .await?;
    assert_eq!(mixed.path, Path::Merge);
    assert!(!mixed.all_new);
    assert_eq!(Path::after(mixed.all_new), Path::Merge);
    assert_eq!(mixed.changed, HashMap::from([("s".to_string(), 3)]));
    let texts: Vec<(String, String)> = xmins(&client)
        .await?
        .into_iter()
        .map(|(id, _, text)| (id, text))
        .collect();
    let expected: Vec<(String, String)> =
        [(1, "old"), (2, "old"), (3, "new"), (4, "new"), (5, "new")]
            .iter()
            .map(|(id, text)| (id.to_string(), text.to_string()))
            .collect();
    assert_eq!(texts, expected);
    // A larger batch (streamed in several frames) whose only existing key sorts last: the
    // rows COPYed before the conflict are rolled back with it, then merged once.
    let many: Vec<u32> = (1000..1600).chain([5]).collect();
    let large = write(
        &mut client,
        &chunk("s", &many, "newest", later + chrono::Duration::seconds(1)),
        Path::Copy,
    )
    .await?;
    assert_eq!(large.path, Path::Merge);
    assert_eq!(large.changed, HashMap::from([("s".to_string(), 601)]));
    let n: i64 = client
        .query_one("SELECT count(*) FROM records WHERE source = 's'", &[])
        .await?
        .get(0);
    assert_eq!(n, 5 + 600);
    // Keys all new again: the next batch may COPY.
    let fresh = write(&mut client, &chunk("s", &[6, 7], "new", later), Path::Merge).await?;
    assert!(fresh.all_new);
    assert_eq!(Path::after(fresh.all_new), Path::Copy);
    let checkpoint: i64 = client
        .query_one(
            "SELECT records_written FROM source_checkpoints WHERE source = 's'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        checkpoint,
        3 + 3 + 601 + 2,
        "the checkpoint counts what was written, once"
    );
    Ok(())
}

#[tokio::test]
async fn two_copies_of_one_new_key_at_once_land_it_once() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    migrate(&env(&t, &db.url)).await?;
    let mut first = db.connect().await?;
    let mut second = db.connect().await?;
    let at = Utc::now();
    // The first transaction COPYs keys 1 and 2 and holds its commit; the second COPYs 2 and
    // 3, waits on key 2, meets it once the first commits, and merges instead.
    let tx = first.transaction().await?;
    let one = chunk("s", &[1, 2], "first", at);
    let chunks = [&one];
    let rows = store::rows(&chunks);
    let written = store::write_records(
        &tx,
        &rows,
        &store::checkpoints(&chunks),
        &["s".to_string()],
        Path::Copy,
    )
    .await?;
    assert_eq!(written.path, Path::Copy);
    let later = at + chrono::Duration::seconds(1);
    let other = tokio::spawn(async move {
        write(
            &mut second,
            &chunk("s", &[2, 3], "second", later),
            Path::Copy,
        )
        .await
    });
    // The second session waits on the first's lock.
    let first_pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let watcher = db.connect().await?;
    crate::harness::wait_for(
        "the second COPY to wait on the first's key",
        Duration::from_secs(20),
        || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&first_pid],
                )
                .await?
                .get(0);
            Ok((waiting > 0).then_some(()))
        },
    )
    .await?;
    assert!(!other.is_finished());
    tx.commit().await?;
    let second = tokio::time::timeout(Duration::from_secs(10), other).await???;
    assert_eq!(second.path, Path::Merge);
    let rows: Vec<(String, String)> = first
        .query(
            "SELECT record_id, payload->>'text' FROM records ORDER BY record_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("1".to_string(), "first".to_string()),
            ("2".to_string(), "second".to_string()),
            ("3".to_string(), "second".to_string()),
        ]
    );
    Ok(())
}

/// The writer's `tardis_writer_record_batches_total{path}`.
async fn batches(port: u16, path: &str) -> Result<u64> {
    let (_, metrics) =
        crate::harness::http_get(&format!("http://127.0.0.1:{port}/metrics")).await?;
    Ok(metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "tardis_writer_record_batches_total{{path=\"{path}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0))
}

#[tokio::test]
async fn the_writer_copies_after_a_batch_of_new_keys_and_merges_after_one_that_met_rows()
-> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let port = crate::harness::free_port()?;
    let mut e = env(&t, &db.url);
    e.insert("OPS_ADDR".into(), format!("127.0.0.1:{port}"));
    e.insert("WRITER_BATCH_MESSAGES".into(), "1".into());
    e.insert("WRITER_CONCURRENCY".into(), "1".into());
    migrate(&e).await?;
    let first = w::chunk("s", &[("1", "2026-11-01T10:00:00Z", "one")]);
    let second = w::chunk("s", &[("2", "2026-11-01T10:00:00Z", "two")]);
    let third = w::chunk("s", &[("3", "2026-11-01T10:00:00Z", "three")]);
    for c in [&first, &second, &third] {
        w::publish(&t, c).await?;
    }
    let running = w::start(&e)?;
    w::wait_rows(&db, 3, Duration::from_secs(30)).await?;
    w::drained(&t).await?;
    // The first batch is merged (a loop starts there), the next two go straight in.
    assert_eq!(
        (batches(port, "merge").await?, batches(port, "copy").await?),
        (1, 2)
    );

    // A replay: the COPY meets the row, is rolled back, the batch merged; then a new key is
    // merged once more (the replay met a row) before the loop copies again.
    let fourth = w::chunk("s", &[("4", "2026-11-01T10:00:00Z", "four")]);
    let fifth = w::chunk("s", &[("5", "2026-11-01T10:00:00Z", "five")]);
    for c in [&first, &fourth, &fifth] {
        w::publish(&t, c).await?;
    }
    w::wait_rows(&db, 5, Duration::from_secs(30)).await?;
    w::drained(&t).await?;
    assert_eq!(
        (batches(port, "merge").await?, batches(port, "copy").await?),
        (3, 3)
    );
    let written: i64 = db
        .connect()
        .await?
        .query_one(
            "SELECT records_written FROM source_checkpoints WHERE source = 's'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        written, 5,
        "each record written once, the replay changed nothing"
    );
    w::stop(running).await
}
