//! The writer's SQL besides the records' own (those are [`crate::records`], re-exported
//! here): the checkpoints' order, dead letters, replayed dead letters resolved, unreadable
//! messages and fetch runs — all inside the caller's transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tardis_common::messages::{Cursor, DeadLetter, EnrichedChunk, FetchRun};
use tokio_postgres::Transaction;

pub use crate::records::{Path, RecordRow, Written, content_hash, copy_fits, rows, write_records};

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
pub fn checkpoints(
    chunks: &[&EnrichedChunk],
) -> HashMap<String, (Cursor, (DateTime<Utc>, String))> {
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
    // In key order, like the records: concurrent batches then lock rows in the same order.
    let mut list: Vec<(&(String, String, String), &DeadLetter)> =
        by_key.iter().map(|(k, l)| (k, *l)).collect();
    list.sort_by(|a, b| a.0.cmp(b.0));
    let list: Vec<&DeadLetter> = list.into_iter().map(|(_, l)| l).collect();
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
    chunks: &[&EnrichedChunk],
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
}
