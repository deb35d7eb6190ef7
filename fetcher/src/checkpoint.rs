//! What the fetcher reads of the writer's tables in Postgres: the written checkpoint, and the
//! stored enrichments of records whose content it fetches again ([`Checkpoints::priors`]).
//!
//! Used as the starting cursor when the fetch state is lost, and for the in-flight gauge
//! (records published minus records written). The gauge is best effort. The starting cursor
//! is not: when Postgres is configured but the checkpoint cannot be read, the run fails
//! rather than start from `initial_lookback`, which could skip what lies between the
//! checkpoint and the lookback. Without Postgres configured, the lookback is the start.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use tardis_common::messages::{Cursor, Prior};
use tracing::debug;

use crate::metrics::FetchMetrics;

#[derive(Debug, Clone)]
pub struct Checkpoints {
    pool: Pool,
}

impl Checkpoints {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        self.pool
            .get()
            .await
            .map_err(|e| tardis_common::error::chain(&e))
    }

    async fn row(&self, source: &str) -> Result<Option<(Option<serde_json::Value>, i64)>, String> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT cursor, records_written FROM source_checkpoints WHERE source = $1",
                &[&source],
            )
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        Ok(row.map(|r| (r.get::<_, Option<serde_json::Value>>(0), r.get::<_, i64>(1))))
    }

    /// The source's written checkpoint, when there is one; an error when it cannot be read
    /// (Postgres unreachable, refused, or a cursor this build cannot parse).
    pub async fn cursor(&self, source: &str) -> Result<Option<Cursor>, String> {
        let Some((Some(cursor), _)) = self.row(source).await? else {
            return Ok(None);
        };
        serde_json::from_value(cursor)
            .map(Some)
            .map_err(|e| format!("the stored cursor is not one this fetcher reads: {e}"))
    }

    /// Whether any record of `source` is stored. `false` at a run's start means a first load:
    /// no enrichment of it can be looked up, so the run does not try ([`Self::priors`]).
    pub async fn has_records(&self, source: &str) -> Result<bool, String> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM records WHERE source = $1)",
                &[&source],
            )
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        Ok(row.get(0))
    }

    /// The stored enrichments of `records` (ids with their content keys) whose stored content
    /// key is the same: one query by the primary key for the whole chunk, so what is unchanged
    /// is not sent to the LLM again. An error means "unknown": the records go at full price.
    pub async fn priors(
        &self,
        source: &str,
        records: &[(&str, &str)],
    ) -> Result<HashMap<String, Prior>, String> {
        if records.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<&str> = records.iter().map(|(id, _)| *id).collect();
        let keys: Vec<&str> = records.iter().map(|(_, key)| *key).collect();
        let client = self.client().await?;
        let rows = client
            .query(PRIORS, &[&source, &ids, &keys])
            .await
            .map_err(|e| tardis_common::error::chain(&e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    Prior {
                        enrichment: row.get(1),
                        model: row.get(2),
                        prompt_version: row.get(3),
                        enriched_at: row.get(4),
                        cost_usd: row.get(5),
                    },
                )
            })
            .collect())
    }

    /// Sets `tardis_fetch_records_in_flight` from the count published and the count written.
    pub async fn update_in_flight(
        &self,
        source: &str,
        published_total: u64,
        metrics: &FetchMetrics,
    ) {
        let row = match self.row(source).await {
            Ok(row) => row,
            Err(error) => {
                debug!(%error, "checkpoint not readable; the in-flight gauge is not updated");
                None
            }
        };
        if let Some((_, written)) = row {
            let in_flight = (published_total as i64 - written).max(0);
            metrics
                .in_flight
                .with_label_values(&[source])
                .set(in_flight);
        }
    }
}

/// The stored enrichments of a chunk's records (`$2` ids, `$3` their content keys) in
/// `$1` whose content key is the same: one probe of the primary key per record. As a plain
/// join the planner's cost model chose a hash join over a scan of all of `records` while the
/// table was below some 150,000 rows — once per chunk, 20 ms at 50,000 rows and growing;
/// `LATERAL … LIMIT 1` (at most one row per key anyway) is never turned into that join.
pub const PRIORS: &str =
    "SELECT r.record_id, r.enrichment, r.model, r.prompt_version, r.enriched_at,
        (r.cost_usd + r.saved_usd)::float8
   FROM unnest($2::text[], $3::text[]) AS k(id, content_key)
   CROSS JOIN LATERAL (
       SELECT * FROM records r
        WHERE r.source = $1 AND r.record_id = k.id AND r.content_key = k.content_key
        LIMIT 1) r";
