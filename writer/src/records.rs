//! The records' SQL: staged with a binary `COPY` into a temporary table and
//! merged into `records` with one `INSERT … SELECT … ON CONFLICT` per batch (newest version
//! wins), or, when every key of the batch is new, `COPY`ed straight into `records`;
//! checkpoint advanced monotonically — all inside the caller's transaction.
//!
//! Versions of a record are ordered by `(updated_at, fetched_at)`: a newer one replaces the
//! row only when its content or its `updated_at` differs, so a replay, or the same record
//! fetched again unchanged, leaves the row untouched (its `xmin` does not change), and for a
//! source without `updated_at` the version fetched last wins — never one chosen by a hash.
//! The same version (the same payload, byte for byte or as JSON: a re-enrichment reads it back
//! from `jsonb`, and the same `updated_at`) enriched again replaces the row when the new
//! enrichment is newer and differs (a new prompt version or model, a re-enrichment), never
//! with a reused one.
//!
//! Why staging: a binary `COPY` is the cheapest way into Postgres (no per-row statement, no
//! text arrays to parse), but it cannot resolve a conflict; the merge from a temporary table
//! adds the conflict check and an `INSERT … SELECT` to the index updates a `COPY` into
//! `records` pays anyway (with the staging `COPY`, ≈ 1.2–1.5 × a `COPY` into `records`). The staging table is
//! `pg_temp.tardis_records_stage_v1`, created on a connection's first batch (`IF NOT EXISTS`,
//! in the batch's own transaction, so it works behind a transaction-pooling proxy as well) and
//! emptied at every commit (`ON COMMIT DELETE ROWS`): never used by two transactions at once,
//! never logged, and a rolled-back batch leaves nothing in it. Its name carries the version of
//! its columns ([`STAGE_COLUMNS`]): change them, change the name, so a session a pooler keeps
//! across an upgrade never offers a writer a table of another shape. The writer needs the `TEMPORARY` privilege on the
//! database (PUBLIC has it unless revoked; `writer migrate` with `TARDIS_DB_ROLES` grants it).
//!
//! The `COPY` path ([`Path::Copy`]): a batch of keys `records` does not hold yet (a first
//! load, a backfill) needs no merge — every row is an insert — so it is `COPY`ed straight in,
//! which saves the staging and costs what the `COPY` it is measured against costs. Whether the
//! keys are new is not asked (that would be a probe per row): a loop tries the `COPY` after a
//! batch whose keys were all new ([`Path::after`]; the merge counts its inserts), inside a
//! savepoint, and when a key is there (`23505`, also one another loop or writer committed
//! meanwhile: the `COPY` waits for it like the merge would) the `COPY` is rolled back to the
//! savepoint and the batch merged. Correctness rests on the primary key, not on the guess; a
//! wrong guess costs one batch's `COPY` (the rows sent until the conflict, left dead in the
//! heap and the indexes for autovacuum). The path is only taken when `records` has the column
//! types this writer sends ([`copy_fits`], checked at start). Both paths store the same values: the money columns
//! are `numeric`, sent as Postgres's own `float8 → numeric` cast makes them
//! (the `numeric` module), and `written_at` is the transaction's `now()` either way.

use std::collections::HashMap;
use std::error::Error;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tardis_common::messages::{Cursor, EnrichedChunk, EnrichedRecord};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::numeric::Numeric;

/// One row of `records`, borrowed from the chunk that brought it.
#[derive(Debug, Clone)]
pub struct RecordRow<'a> {
    pub chunk: &'a EnrichedChunk,
    pub record: &'a EnrichedRecord,
    pub content_hash: String,
}

impl RecordRow<'_> {
    pub fn source(&self) -> &str {
        &self.chunk.source
    }

    pub fn record_id(&self) -> &str {
        &self.record.id
    }

    pub fn payload(&self) -> &str {
        self.record.payload.get()
    }

    /// The order of versions: the source's `updated_at`, then when it was fetched (so for a
    /// source without `updated_at`, or one that changed a record without moving it, the
    /// version fetched last wins), then the hash (only to break exact ties deterministically),
    /// then the enrichment made last.
    fn version(&self) -> (Option<DateTime<Utc>>, DateTime<Utc>, &str, DateTime<Utc>) {
        (
            self.record.updated_at,
            self.chunk.fetched_at,
            &self.content_hash,
            self.record.enriched_at,
        )
    }
}

/// The version key of a record: a hash of its payload as the source sent it.
pub fn content_hash(payload: &str) -> String {
    hex::encode(&Sha256::digest(payload.as_bytes())[..16])
}

/// The rows of `chunks`, one per `(source, record_id)`: the newest by [`RecordRow::version`],
/// sorted by key (so concurrent batches lock rows in the same order).
pub fn rows<'a>(chunks: &[&'a EnrichedChunk]) -> Vec<RecordRow<'a>> {
    let mut by_key: HashMap<(&'a str, &'a str), RecordRow<'a>> = HashMap::new();
    for &c in chunks {
        for r in &c.records {
            let row = RecordRow {
                chunk: c,
                record: r,
                content_hash: content_hash(r.payload.get()),
            };
            match by_key.get(&(c.source.as_str(), r.id.as_str())) {
                Some(existing) if existing.version() >= row.version() => {}
                _ => {
                    by_key.insert((c.source.as_str(), r.id.as_str()), row);
                }
            }
        }
    }
    let mut rows: Vec<RecordRow<'a>> = by_key.into_values().collect();
    rows.sort_by(|a, b| (a.source(), a.record_id()).cmp(&(b.source(), b.record_id())));
    rows
}

/// JSON text sent as `jsonb` without parsing it here: the binary `jsonb` format is a version
/// byte (1) and the text; Postgres parses and validates it.
#[derive(Debug)]
struct RawJsonb<'a>(&'a str);

impl ToSql for RawJsonb<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// The staging table's columns, in `COPY` order, with their types.
const STAGE_COLUMNS: [(&str, Type); 16] = [
    ("source", Type::TEXT),
    ("record_id", Type::TEXT),
    ("payload", Type::JSONB),
    ("enrichment", Type::JSONB),
    ("model", Type::TEXT),
    ("prompt_version", Type::TEXT),
    ("content_hash", Type::TEXT),
    ("source_updated_at", Type::TIMESTAMPTZ),
    ("prompt_tokens", Type::INT8),
    ("completion_tokens", Type::INT8),
    ("cost_usd", Type::FLOAT8),
    ("fetched_at", Type::TIMESTAMPTZ),
    ("enriched_at", Type::TIMESTAMPTZ),
    ("content_key", Type::TEXT),
    ("reused", Type::BOOL),
    ("saved_usd", Type::FLOAT8),
];

/// Creates the connection's staging table if this session has none yet (no notice when it
/// has: the check is silenced for this transaction only).
const CREATE_STAGE: &str = "SET LOCAL client_min_messages = warning;
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.tardis_records_stage_v1 (
        source text NOT NULL, record_id text NOT NULL, payload jsonb NOT NULL,
        enrichment jsonb NOT NULL, model text NOT NULL, prompt_version text NOT NULL,
        content_hash text NOT NULL, source_updated_at timestamptz, prompt_tokens int8 NOT NULL,
        completion_tokens int8 NOT NULL, cost_usd float8 NOT NULL, fetched_at timestamptz NOT NULL,
        enriched_at timestamptz NOT NULL, content_key text, reused bool NOT NULL,
        saved_usd float8 NOT NULL
    ) ON COMMIT DELETE ROWS";

/// The merge: the staged rows into `records`, newest version wins; the rows changed, per
/// source. The rows are staged in key order and a temporary table is usually read back in
/// that order, so concurrent batches mostly lock rows in the same order; there is no
/// `ORDER BY` (its sort of wide rows spills to disk and cost a tenth of the merge): when two
/// batches do deadlock, Postgres aborts one (40P01, "busy") and it is retried whole.
const MERGE: &str = "WITH written AS (
    INSERT INTO records AS r (source, record_id, payload, enrichment, model, prompt_version, content_hash,
        source_updated_at, prompt_tokens, completion_tokens, cost_usd, fetched_at, enriched_at, written_at,
        content_key, reused, saved_usd)
    SELECT source, record_id, payload, enrichment, model, prompt_version, content_hash,
        source_updated_at, prompt_tokens, completion_tokens, cost_usd, fetched_at, enriched_at, now(),
        content_key, reused, saved_usd
    FROM pg_temp.tardis_records_stage_v1
    ON CONFLICT (source, record_id) DO UPDATE SET
       payload = EXCLUDED.payload, enrichment = EXCLUDED.enrichment, model = EXCLUDED.model,
       prompt_version = EXCLUDED.prompt_version, content_hash = EXCLUDED.content_hash,
       source_updated_at = EXCLUDED.source_updated_at, prompt_tokens = EXCLUDED.prompt_tokens,
       completion_tokens = EXCLUDED.completion_tokens, cost_usd = EXCLUDED.cost_usd,
       fetched_at = GREATEST(r.fetched_at, EXCLUDED.fetched_at), enriched_at = EXCLUDED.enriched_at, written_at = now(),
       content_key = EXCLUDED.content_key, reused = EXCLUDED.reused, saved_usd = EXCLUDED.saved_usd
    WHERE ((coalesce(EXCLUDED.source_updated_at, '-infinity'), EXCLUDED.fetched_at)
            > (coalesce(r.source_updated_at, '-infinity'), r.fetched_at)
          AND (EXCLUDED.content_hash <> r.content_hash
            OR EXCLUDED.source_updated_at IS DISTINCT FROM r.source_updated_at))
       OR ((EXCLUDED.content_hash = r.content_hash OR EXCLUDED.payload = r.payload)
          AND EXCLUDED.source_updated_at IS NOT DISTINCT FROM r.source_updated_at
          AND NOT EXCLUDED.reused
          AND EXCLUDED.enriched_at > r.enriched_at
          AND (EXCLUDED.enrichment IS DISTINCT FROM r.enrichment
            OR EXCLUDED.prompt_version IS DISTINCT FROM r.prompt_version
            OR EXCLUDED.model IS DISTINCT FROM r.model))
    RETURNING source, r.xmax = 0 AS inserted)
    SELECT source, count(*), count(*) FILTER (WHERE inserted) FROM written GROUP BY source";

/// Whether `records` has the column types the `COPY` path sends. A binary `COPY` carries no
/// types: a column whose type a later migration changed would be refused row by row or, worse,
/// misread, so a writer that finds other types merges every batch (the merge casts).
pub async fn copy_fits(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let found: HashMap<String, String> = client
        .query(
            "SELECT a.attname::text, t.typname::text
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = 'records'::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(STAGE_COLUMNS.iter().all(|(column, staged)| {
        let sent = if *staged == Type::FLOAT8 {
            Type::NUMERIC
        } else {
            staged.clone()
        };
        found.get(*column).map(String::as_str) == Some(sent.name())
    }))
}

/// How a batch's records went into `records`, and how the next batch should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A binary `COPY` straight into `records`: only for keys not there yet.
    Copy,
    /// Staged, then merged (newest version wins).
    Merge,
}

impl Path {
    /// The `path` label of `tardis_writer_record_batches_total`.
    pub fn label(self) -> &'static str {
        match self {
            Path::Copy => "copy",
            Path::Merge => "merge",
        }
    }

    /// The path for the batch after one whose keys were all new (`true`) or not: a batch of
    /// new keys is most likely followed by more (a backfill, a first load), a batch that met
    /// existing rows by more of those (a re-fetch, updates). Only a cost: a `COPY` that meets
    /// an existing key is rolled back and the batch merged.
    pub fn after(all_new: bool) -> Path {
        if all_new { Path::Copy } else { Path::Merge }
    }
}

/// What [`write_records`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Rows inserted or changed, per source (every source of the batch, 0 when none).
    pub changed: HashMap<String, u64>,
    /// Whether every row's key was new to `records` (and so the next batch may try a `COPY`).
    pub all_new: bool,
    /// The path that wrote the rows: [`Path::Merge`] also when a `COPY` met an existing key.
    pub path: Path,
}

/// The columns of the rows in `COPY` order, for the staging table and for `records` alike.
fn copy_statement(table: &str) -> String {
    let columns: Vec<&str> = STAGE_COLUMNS.iter().map(|(c, _)| *c).collect();
    format!("COPY {table} ({}) FROM STDIN BINARY", columns.join(", "))
}

/// Sends `rows` with a binary `COPY` into `table`; `money` is the type of `cost_usd` and
/// `saved_usd` there (`float8` in the staging table, `numeric` in `records`).
async fn copy_rows(
    tx: &Transaction<'_>,
    table: &str,
    money: Type,
    rows: &[RecordRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    let types: Vec<Type> = STAGE_COLUMNS
        .iter()
        .map(|(_, t)| {
            if *t == Type::FLOAT8 {
                money.clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let numeric = money == Type::NUMERIC;
    let sink = tx.copy_in(&copy_statement(table)).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for row in rows {
        let (c, r) = (row.chunk, row.record);
        let (pt, ct) = (
            r.usage.prompt_tokens as i64,
            r.usage.completion_tokens as i64,
        );
        let (cost, saved) = (Numeric(r.usage.cost_usd), Numeric(r.saved_usd));
        let values: [&(dyn ToSql + Sync); 16] = [
            &c.source,
            &r.id,
            &RawJsonb(r.payload.get()),
            &RawJsonb(r.enrichment.get()),
            &r.model,
            &r.prompt_version,
            &row.content_hash,
            &r.updated_at,
            &pt,
            &ct,
            if numeric { &cost } else { &r.usage.cost_usd },
            &c.fetched_at,
            &r.enriched_at,
            &r.content_key,
            &r.reused,
            if numeric { &saved } else { &r.saved_usd },
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Stages `rows` with a binary `COPY` and merges them into `records`.
async fn merge_records(
    tx: &Transaction<'_>,
    rows: &[RecordRow<'_>],
) -> Result<Written, tokio_postgres::Error> {
    tx.batch_execute(CREATE_STAGE).await?;
    copy_rows(tx, "pg_temp.tardis_records_stage_v1", Type::FLOAT8, rows).await?;
    let mut changed = HashMap::new();
    let mut inserted = 0u64;
    for row in tx.query(MERGE, &[]).await? {
        *changed.entry(row.get::<_, String>(0)).or_default() += row.get::<_, i64>(1) as u64;
        inserted += row.get::<_, i64>(2) as u64;
    }
    Ok(Written {
        changed,
        all_new: inserted == rows.len() as u64,
        path: Path::Merge,
    })
}

/// `COPY`s `rows` straight into `records`, inside a savepoint: when one of their keys is
/// there already (a unique violation, also one committed meanwhile by another loop) the
/// `COPY` is rolled back and `Ok(None)` says to merge them instead.
async fn copy_records(
    tx: &Transaction<'_>,
    rows: &[RecordRow<'_>],
) -> Result<Option<Written>, tokio_postgres::Error> {
    tx.batch_execute("SAVEPOINT tardis_copy").await?;
    match copy_rows(tx, "records", Type::NUMERIC, rows).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT tardis_copy").await?;
            let mut changed: HashMap<String, u64> = HashMap::new();
            for row in rows {
                *changed.entry(row.source().to_string()).or_default() += 1;
            }
            Ok(Some(Written {
                changed,
                all_new: true,
                path: Path::Copy,
            }))
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT tardis_copy")
                .await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Writes `rows` by `path` and advances the checkpoints; says what changed and how.
pub async fn write_records(
    tx: &Transaction<'_>,
    rows: &[RecordRow<'_>],
    cursors: &HashMap<String, (Cursor, (DateTime<Utc>, String))>,
    sources: &[String],
    path: Path,
) -> Result<Written, tokio_postgres::Error> {
    let mut written = if rows.is_empty() {
        Written {
            changed: HashMap::new(),
            all_new: true,
            path,
        }
    } else {
        let copied = match path {
            Path::Copy => copy_records(tx, rows).await?,
            Path::Merge => None,
        };
        match copied {
            Some(w) => w,
            None => merge_records(tx, rows).await?,
        }
    };
    for source in sources {
        written.changed.entry(source.clone()).or_default();
    }
    let changed = &written.changed;
    for source in sources {
        let n = changed.get(source).copied().unwrap_or(0) as i64;
        let (cursor, at, key) = match cursors.get(source) {
            Some((c, (at, key))) => (serde_json::to_value(c).ok(), Some(*at), Some(key.clone())),
            None => (None, None, None),
        };
        tx.execute(
            "INSERT INTO source_checkpoints AS c (source, cursor, cursor_updated_at, cursor_id_key, records_written, updated_at)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (source) DO UPDATE SET
                records_written = c.records_written + EXCLUDED.records_written,
                updated_at = now(),
                cursor = CASE WHEN c.cursor_updated_at IS NULL
                                OR (EXCLUDED.cursor_updated_at, EXCLUDED.cursor_id_key) > (c.cursor_updated_at, c.cursor_id_key)
                              THEN coalesce(EXCLUDED.cursor, c.cursor) ELSE c.cursor END,
                cursor_id_key = CASE WHEN c.cursor_updated_at IS NULL
                                OR (EXCLUDED.cursor_updated_at, EXCLUDED.cursor_id_key) > (c.cursor_updated_at, c.cursor_id_key)
                              THEN coalesce(EXCLUDED.cursor_id_key, c.cursor_id_key) ELSE c.cursor_id_key END,
                cursor_updated_at = CASE WHEN c.cursor_updated_at IS NULL
                                OR (EXCLUDED.cursor_updated_at, EXCLUDED.cursor_id_key) > (c.cursor_updated_at, c.cursor_id_key)
                              THEN coalesce(EXCLUDED.cursor_updated_at, c.cursor_updated_at) ELSE c.cursor_updated_at END",
            &[source, &cursor, &at, &key, &n],
        )
        .await?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(texts: &[&str], fetched_at: DateTime<Utc>) -> EnrichedChunk {
        use tardis_common::messages::{ENRICHED_CHUNK_VERSION, EnrichedRecord, Usage};
        EnrichedChunk {
            schema_version: ENRICHED_CHUNK_VERSION,
            source: "s".into(),
            chunk_id: "c".into(),
            run_id: "r".into(),
            chunk_seq: 0,
            records: texts
                .iter()
                .map(|t| EnrichedRecord {
                    id: "1".into(),
                    updated_at: None,
                    payload: serde_json::value::RawValue::from_string(
                        serde_json::json!({ "t": t }).to_string(),
                    )
                    .unwrap(),
                    enrichment: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                    model: "m".into(),
                    prompt_version: "p".into(),
                    usage: Usage::default(),
                    enriched_at: fetched_at,
                    content_key: None,
                    reused: false,
                    saved_usd: 0.0,
                })
                .collect(),
            dead: vec![],
            cursor_after: None,
            fetched_at,
            part: None,
        }
    }

    #[test]
    fn within_a_batch_the_version_fetched_last_wins_whatever_its_hash() {
        let t0 = Utc::now();
        for (old, new) in [("a", "b"), ("b", "a"), ("zzz", "000")] {
            let later = outcome(&[new], t0 + chrono::Duration::seconds(1));
            let earlier = outcome(&[old], t0);
            for order in [vec![&earlier, &later], vec![&later, &earlier]] {
                let rows = rows(&order);
                assert_eq!(rows.len(), 1);
                assert!(
                    rows[0].payload().contains(new),
                    "{old} -> {new}: {:?}",
                    rows[0]
                );
            }
        }
    }
}
