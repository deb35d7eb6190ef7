//! The SQL of the writer: bulk upserts with UNNEST (one statement per table per batch),
//! newest version wins, checkpoint advanced monotonically — all inside the caller's
//! transaction.
//!
//! Versions of a record are ordered by `(updated_at, fetched_at)`: a newer one replaces the
//! row only when its content or its `updated_at` differs, so a replay, or the same record
//! fetched again unchanged, leaves the row untouched (its `xmin` does not change), and for a
//! source without `updated_at` the version fetched last wins — never one chosen by a hash.
//! The same version (the same payload, byte for byte or as JSON: a re-enrichment reads it back
//! from `jsonb`, and the same `updated_at`) enriched again replaces the row when the new
//! enrichment is newer and differs (a new prompt version or model, a re-enrichment), never
//! with a reused one.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tardis_common::messages::{Cursor, DeadLetter, EnrichedChunk, FetchRun};
use tokio_postgres::Transaction;

/// One row of `records`.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordRow {
    pub source: String,
    pub record_id: String,
    pub payload: String,
    pub enrichment: serde_json::Value,
    pub model: String,
    pub prompt_version: String,
    pub content_hash: String,
    pub updated_at: Option<DateTime<Utc>>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    pub fetched_at: DateTime<Utc>,
    pub enriched_at: DateTime<Utc>,
    pub content_key: Option<String>,
    pub reused: bool,
    pub saved_usd: f64,
}

impl RecordRow {
    /// The order of versions: the source's `updated_at`, then when it was fetched (so for a
    /// source without `updated_at`, or one that changed a record without moving it, the
    /// version fetched last wins), then the hash (only to break exact ties deterministically),
    /// then the enrichment made last.
    fn version(&self) -> (Option<DateTime<Utc>>, DateTime<Utc>, &str, DateTime<Utc>) {
        (
            self.updated_at,
            self.fetched_at,
            &self.content_hash,
            self.enriched_at,
        )
    }
}

/// The version key of a record: a hash of its payload as the source sent it.
pub fn content_hash(payload: &str) -> String {
    hex::encode(&Sha256::digest(payload.as_bytes())[..16])
}

/// The rows of `chunks`, one per `(source, record_id)`: the newest by [`RecordRow::version`].
pub fn rows(chunks: &[EnrichedChunk]) -> Vec<RecordRow> {
    let mut by_key: HashMap<(String, String), RecordRow> = HashMap::new();
    for c in chunks {
        for r in &c.records {
            let row = RecordRow {
                source: c.source.clone(),
                record_id: r.id.clone(),
                payload: r.payload.get().to_string(),
                enrichment: r.enrichment.clone(),
                model: r.model.clone(),
                prompt_version: r.prompt_version.clone(),
                content_hash: content_hash(r.payload.get()),
                updated_at: r.updated_at,
                prompt_tokens: r.usage.prompt_tokens as i64,
                completion_tokens: r.usage.completion_tokens as i64,
                cost_usd: r.usage.cost_usd,
                fetched_at: c.fetched_at,
                enriched_at: r.enriched_at,
                content_key: r.content_key.clone(),
                reused: r.reused,
                saved_usd: r.saved_usd,
            };
            let key = (row.source.clone(), row.record_id.clone());
            match by_key.get(&key) {
                Some(existing) if existing.version() >= row.version() => {}
                _ => {
                    by_key.insert(key, row);
                }
            }
        }
    }
    let mut rows: Vec<RecordRow> = by_key.into_values().collect();
    rows.sort_by(|a, b| (&a.source, &a.record_id).cmp(&(&b.source, &b.record_id)));
    rows
}

/// The sort key of a cursor: `(updated_at, id)` with numeric ids zero-padded so text order
/// is numeric order; token cursors are ordered by when their chunk was fetched.
pub fn cursor_key(cursor: &Cursor, fetched_at: DateTime<Utc>) -> (DateTime<Utc>, String) {
    match cursor {
        Cursor::Position { updated_at, id, .. } => {
            let key = if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
                format!("0{:0>39}", id.trim_start_matches('0'))
            } else {
                format!("1{id}")
            };
            (*updated_at, key)
        }
        Cursor::Token { .. } => (fetched_at, String::new()),
    }
}

/// Per source: the latest cursor among `chunks`.
pub fn checkpoints(chunks: &[EnrichedChunk]) -> HashMap<String, (Cursor, (DateTime<Utc>, String))> {
    let mut out: HashMap<String, (Cursor, (DateTime<Utc>, String))> = HashMap::new();
    for c in chunks {
        let Some(cursor) = &c.cursor_after else {
            continue;
        };
        let key = cursor_key(cursor, c.fetched_at);
        match out.get(&c.source) {
            Some((_, existing)) if *existing >= key => {}
            _ => {
                out.insert(c.source.clone(), (cursor.clone(), key));
            }
        }
    }
    out
}

/// Upserts `rows` and advances the checkpoints; returns rows changed per source.
pub async fn write_records(
    tx: &Transaction<'_>,
    rows: &[RecordRow],
    cursors: &HashMap<String, (Cursor, (DateTime<Utc>, String))>,
    sources: &[String],
) -> Result<HashMap<String, u64>, tokio_postgres::Error> {
    let mut changed: HashMap<String, u64> = sources.iter().map(|s| (s.clone(), 0)).collect();
    if !rows.is_empty() {
        let col = |f: fn(&RecordRow) -> String| rows.iter().map(f).collect::<Vec<String>>();
        let sources_col = col(|r| r.source.clone());
        let ids = col(|r| r.record_id.clone());
        let payloads = col(|r| r.payload.clone());
        let enrichments: Vec<serde_json::Value> =
            rows.iter().map(|r| r.enrichment.clone()).collect();
        let models = col(|r| r.model.clone());
        let versions = col(|r| r.prompt_version.clone());
        let hashes = col(|r| r.content_hash.clone());
        let updated: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.updated_at).collect();
        let pt: Vec<i64> = rows.iter().map(|r| r.prompt_tokens).collect();
        let ct: Vec<i64> = rows.iter().map(|r| r.completion_tokens).collect();
        let cost: Vec<f64> = rows.iter().map(|r| r.cost_usd).collect();
        let fetched: Vec<DateTime<Utc>> = rows.iter().map(|r| r.fetched_at).collect();
        let enriched: Vec<DateTime<Utc>> = rows.iter().map(|r| r.enriched_at).collect();
        let keys: Vec<Option<String>> = rows.iter().map(|r| r.content_key.clone()).collect();
        let reused: Vec<bool> = rows.iter().map(|r| r.reused).collect();
        let saved: Vec<f64> = rows.iter().map(|r| r.saved_usd).collect();
        let written = tx
            .query(
                "WITH written AS (INSERT INTO records AS r (source, record_id, payload, enrichment, model, prompt_version, content_hash,
                    source_updated_at, prompt_tokens, completion_tokens, cost_usd, fetched_at, enriched_at, written_at,
                    content_key, reused, saved_usd)
                 SELECT s, i, p::jsonb, e, m, pv, h, u, pt, ct, c, f, en, now(), k, ru, sv
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[], $6::text[], $7::text[],
                             $8::timestamptz[], $9::int8[], $10::int8[], $11::float8[], $12::timestamptz[], $13::timestamptz[],
                             $14::text[], $15::bool[], $16::float8[])
                      AS t(s, i, p, e, m, pv, h, u, pt, ct, c, f, en, k, ru, sv)
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
                 RETURNING source)
                 SELECT source, count(*) FROM written GROUP BY source",
                &[&sources_col, &ids, &payloads, &enrichments, &models, &versions, &hashes, &updated, &pt, &ct, &cost, &fetched, &enriched, &keys, &reused, &saved],
            )
            .await?;
        for row in written {
            *changed.entry(row.get::<_, String>(0)).or_default() += row.get::<_, i64>(1) as u64;
        }
    }
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
    Ok(changed)
}

/// Upserts dead letters (one row per stage, source and record; a replay changes nothing).
pub async fn write_dead_letters(
    tx: &Transaction<'_>,
    letters: &[DeadLetter],
) -> Result<u64, tokio_postgres::Error> {
    let mut by_key: HashMap<(String, String, String), &DeadLetter> = HashMap::new();
    for l in letters {
        let key = (
            l.stage.as_str().to_string(),
            l.source.clone(),
            l.record.id.clone(),
        );
        match by_key.get(&key) {
            Some(existing) if existing.failed_at >= l.failed_at => {}
            _ => {
                by_key.insert(key, l);
            }
        }
    }
    let list: Vec<&DeadLetter> = by_key.into_values().collect();
    if list.is_empty() {
        return Ok(0);
    }
    let stages: Vec<String> = list.iter().map(|l| l.stage.as_str().to_string()).collect();
    let sources: Vec<String> = list.iter().map(|l| l.source.clone()).collect();
    let ids: Vec<String> = list.iter().map(|l| l.record.id.clone()).collect();
    // A dead letter must always be storable, even when its record is why Postgres refused it:
    // jsonb and text reject NUL, so it is stored as U+FFFD.
    let payloads: Vec<String> = list
        .iter()
        .map(|l| l.record.payload.get().replace("\\u0000", "\\ufffd"))
        .collect();
    let clean = |t: &str| t.replace('\0', "\u{fffd}");
    let reasons: Vec<String> = list.iter().map(|l| clean(&l.reason)).collect();
    let errors: Vec<Option<String>> = list
        .iter()
        .map(|l| l.last_error.as_deref().map(clean))
        .collect();
    let attempts: Vec<i32> = list.iter().map(|l| l.attempts as i32).collect();
    let chunks: Vec<String> = list.iter().map(|l| l.chunk_id.clone()).collect();
    let runs: Vec<String> = list.iter().map(|l| l.run_id.clone()).collect();
    let at: Vec<DateTime<Utc>> = list.iter().map(|l| l.failed_at).collect();
    let updated: Vec<Option<DateTime<Utc>>> = list.iter().map(|l| l.record.updated_at).collect();
    // A later failure reopens a resolved letter.
    tx.execute(
        "INSERT INTO dead_letters AS d (stage, source, record_id, payload, reason, last_error, attempts, chunk_id, run_id, occurrences, first_seen, last_seen, source_updated_at)
         SELECT st, so, i, p::jsonb, r, e, a, c, ru, 1, t, t, u
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int4[], $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[])
              AS x(st, so, i, p, r, e, a, c, ru, t, u)
         ON CONFLICT (stage, source, record_id) DO UPDATE SET
            payload = EXCLUDED.payload, reason = EXCLUDED.reason, last_error = EXCLUDED.last_error,
            attempts = EXCLUDED.attempts, chunk_id = EXCLUDED.chunk_id, run_id = EXCLUDED.run_id,
            occurrences = d.occurrences + 1, last_seen = EXCLUDED.last_seen,
            source_updated_at = EXCLUDED.source_updated_at, resolved_at = NULL, resolution = NULL
         WHERE EXCLUDED.last_seen > d.last_seen",
        &[&stages, &sources, &ids, &payloads, &reasons, &errors, &attempts, &chunks, &runs, &at, &updated],
    )
    .await
}

/// The `run_id` prefix of the record chunks `writer dlq replay` publishes.
pub const REPLAY_RUN_PREFIX: &str = "replay-";

/// Resolves the replayed dead letters (stages `enrich` and `write`) of the records that
/// replayed chunks (`run_id` starting with [`REPLAY_RUN_PREFIX`]) brought back enriched.
/// Ordinary chunks cost nothing here.
pub async fn resolve_replayed(
    tx: &Transaction<'_>,
    chunks: &[EnrichedChunk],
) -> Result<u64, tokio_postgres::Error> {
    let (sources, ids): (Vec<String>, Vec<String>) = chunks
        .iter()
        .filter(|c| c.run_id.starts_with(REPLAY_RUN_PREFIX))
        .flat_map(|c| c.records.iter().map(|r| (c.source.clone(), r.id.clone())))
        .unzip();
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute(
        "UPDATE dead_letters d SET resolved_at = now(), resolution = 'replayed and written'
           FROM unnest($1::text[], $2::text[]) AS k(source, record_id)
          WHERE d.stage IN ('enrich', 'write') AND d.source = k.source AND d.record_id = k.record_id
            AND d.replayed_at IS NOT NULL AND d.resolved_at IS NULL",
        &[&sources, &ids],
    )
    .await
}

/// A message the writer cannot read, kept whole: `payload` when it is JSON, `raw` otherwise.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub stage: &'static str,
    pub source: String,
    /// `message-<stream>-<sequence>`: one row per message.
    pub record_id: String,
    pub bytes: Vec<u8>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// Stores an unreadable message in `dead_letters` (a replay counts another occurrence).
pub async fn write_unreadable(
    tx: &Transaction<'_>,
    u: &Unreadable,
) -> Result<u64, tokio_postgres::Error> {
    let json = serde_json::from_slice::<serde_json::Value>(&u.bytes)
        .ok()
        .map(|_| String::from_utf8_lossy(&u.bytes).replace("\\u0000", "\\ufffd"));
    let raw: Option<&[u8]> = if json.is_some() { None } else { Some(&u.bytes) };
    let reason = u.reason.replace('\0', "\u{fffd}");
    tx.execute(
        "INSERT INTO dead_letters AS d (stage, source, record_id, payload, raw, reason, last_error, attempts, chunk_id, run_id, occurrences, first_seen, last_seen)
         VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $6, 1, NULL, NULL, 1, $7, $7)
         ON CONFLICT (stage, source, record_id) DO UPDATE SET
            occurrences = d.occurrences + 1, last_seen = EXCLUDED.last_seen",
        &[&u.stage, &u.source, &u.record_id, &json, &raw, &reason, &u.at],
    )
    .await
}

/// Inserts fetch runs (a replay changes nothing).
pub async fn write_runs(
    tx: &Transaction<'_>,
    runs: &[FetchRun],
) -> Result<u64, tokio_postgres::Error> {
    let mut n = 0;
    for r in runs {
        n += tx
            .execute(
                "INSERT INTO fetch_runs (source, run_id, started_at, finished_at, records, pages, chunks, bytes, outcome, error, cursor_after, cursor_before, note)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (source, run_id) DO NOTHING",
                &[
                    &r.source,
                    &r.run_id,
                    &r.started_at,
                    &r.finished_at,
                    &(r.records as i64),
                    &(r.pages as i64),
                    &(r.chunks as i64),
                    &(r.bytes as i64),
                    &r.outcome.as_str(),
                    &run_error(r),
                    &r.cursor_after.as_ref().and_then(|c| serde_json::to_value(c).ok()),
                    &r.cursor_before.as_ref().and_then(|c| serde_json::to_value(c).ok()),
                    &r.note,
                ],
            )
            .await?;
    }
    Ok(n)
}

/// `fetch_runs.error`: what went wrong, then what the run warned about.
fn run_error(r: &tardis_common::messages::FetchRun) -> Option<String> {
    let mut parts: Vec<String> = r.error.iter().cloned().collect();
    parts.extend(r.warnings.iter().map(|w| format!("warning: {w}")));
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Every source's written checkpoint: when a batch of it was last committed, and the
/// `updated_at` of the newest record written through (when it has one), as Unix seconds.
pub async fn checkpoint_times(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, f64, Option<f64>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT source, extract(epoch FROM updated_at)::float8,
                    extract(epoch FROM cursor_updated_at)::float8
               FROM source_checkpoints",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_sort_numerically_in_cursor_keys() {
        let t = Utc::now();
        let k = |id: &str| {
            cursor_key(
                &Cursor::Position {
                    updated_at: t,
                    id: id.into(),
                    since: None,
                },
                t,
            )
            .1
        };
        assert!(k("9") < k("10"));
        assert!(k("10") < k("abc"));
        assert!(k("007") == k("7"));
    }

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
                    enrichment: serde_json::json!({}),
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
            for order in [vec![earlier.clone(), later.clone()], vec![later, earlier]] {
                let rows = rows(&order);
                assert_eq!(rows.len(), 1);
                assert!(
                    rows[0].payload.contains(new),
                    "{old} -> {new}: {:?}",
                    rows[0]
                );
            }
        }
    }
}
