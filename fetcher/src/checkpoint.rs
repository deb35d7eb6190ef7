//! The written checkpoint in Postgres (owned by the writer; the fetcher only reads it).
//!
//! Used as the starting cursor when the fetch state is lost, and for the in-flight gauge
//! (records published minus records written). Both are best effort: when Postgres is not
//! configured or not reachable, the fetcher carries on without them.

use deadpool_postgres::Pool;
use tardis_common::messages::Cursor;
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

    async fn row(&self, source: &str) -> Option<(Option<serde_json::Value>, i64)> {
        let client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %tardis_common::error::chain(&e), "checkpoint not readable");
                return None;
            }
        };
        match client
            .query_opt(
                "SELECT cursor, records_written FROM source_checkpoints WHERE source = $1",
                &[&source],
            )
            .await
        {
            Ok(row) => row.map(|r| (r.get::<_, Option<serde_json::Value>>(0), r.get::<_, i64>(1))),
            Err(e) => {
                debug!(error = %tardis_common::error::chain(&e), "checkpoint not readable");
                None
            }
        }
    }

    /// The source's written checkpoint, when there is one.
    pub async fn cursor(&self, source: &str) -> Option<Cursor> {
        let (cursor, _) = self.row(source).await?;
        serde_json::from_value(cursor?).ok()
    }

    /// Sets `tardis_fetch_records_in_flight` from the count published and the count written.
    pub async fn update_in_flight(
        &self,
        source: &str,
        published_total: u64,
        metrics: &FetchMetrics,
    ) {
        if let Some((_, written)) = self.row(source).await {
            let in_flight = (published_total as i64 - written).max(0);
            metrics
                .in_flight
                .with_label_values(&[source])
                .set(in_flight);
        }
    }
}
