//! The report of a run: one line for people, metrics, and a `FetchRun` on `tardis.runs.<source>`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tardis_common::messages::{self, Cursor, FetchRun, RunOutcome, SCHEMA_VERSION};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::collect::Collector;

/// How a run went.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub source: String,
    pub run_id: String,
    pub outcome: RunOutcome,
    pub records: u64,
    pub pages: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// What went wrong, or (for `incomplete`) what is missing and what the next run does.
    pub error: Option<String>,
    pub cursor_after: Option<Cursor>,
    /// What the run noticed without failing.
    pub warnings: Vec<String>,
    /// Records seen after a record with a later `(updated_at, id)`.
    pub out_of_order: u64,
}

impl RunReport {
    pub fn new(source: String, run_id: String, started_at: DateTime<Utc>) -> Self {
        Self {
            source,
            run_id,
            outcome: RunOutcome::Succeeded,
            records: 0,
            pages: 0,
            chunks: 0,
            bytes: 0,
            started_at,
            finished_at: started_at,
            error: None,
            cursor_after: None,
            warnings: Vec::new(),
            out_of_order: 0,
        }
    }

    /// One line for humans: `market_data: succeeded, 1200 records in 3 pages (2.1 s)`.
    pub fn summary(&self) -> String {
        let secs = (self.finished_at - self.started_at).num_milliseconds() as f64 / 1000.0;
        let mut line = format!(
            "{}: {}, {} records in {} pages, {} chunks ({secs:.1} s)",
            self.source,
            self.outcome.as_str(),
            self.records,
            self.pages,
            self.chunks
        );
        if let Some(e) = &self.error {
            line.push_str(": ");
            line.push_str(e);
        }
        for w in &self.warnings {
            line.push_str("; warning: ");
            line.push_str(w);
        }
        line
    }
}

impl Collector {
    /// Records the run in metrics and on the runs subject.
    pub(crate) async fn finish(
        &self,
        mut report: RunReport,
        shutdown: &CancellationToken,
    ) -> RunReport {
        report.finished_at = Utc::now();
        let outcome = report.outcome.as_str();
        let name = report.source.clone();
        self.metrics.runs.with_label_values(&[&name, outcome]).inc();
        let secs = (report.finished_at - report.started_at)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0;
        self.metrics
            .run_duration
            .with_label_values(&[&name, outcome])
            .observe(secs);
        if report.outcome == RunOutcome::Succeeded {
            self.metrics
                .last_success
                .with_label_values(&[&name])
                .set(report.finished_at.timestamp());
        }
        let run = FetchRun {
            schema_version: SCHEMA_VERSION,
            run_id: report.run_id.clone(),
            source: name.clone(),
            started_at: report.started_at,
            finished_at: report.finished_at,
            records: report.records,
            pages: report.pages,
            chunks: report.chunks,
            bytes: report.bytes,
            outcome: report.outcome,
            error: report.error.clone(),
            cursor_after: report.cursor_after.clone(),
            warnings: report.warnings.clone(),
            out_of_order: report.out_of_order,
            cursor_before: None,
            note: None,
        };
        // The report goes out even when the run was interrupted, within a short grace.
        let grace = CancellationToken::new();
        let stop = {
            let grace = grace.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                grace.cancel();
            })
        };
        match messages::encode(&run) {
            Ok(bytes) => {
                let subject = self.names.runs_subject(&name);
                if let Err(error) = publish_durably(
                    &self.js,
                    &subject,
                    &run.msg_id(),
                    bytes.into(),
                    Duration::from_secs(30),
                    &grace,
                )
                .await
                {
                    warn!(%error, "publishing the run report failed");
                }
            }
            Err(error) => warn!(%error, "encoding the run report failed"),
        }
        stop.abort();
        let note = report.error.as_deref().unwrap_or("");
        match report.outcome {
            RunOutcome::Failed => {
                tracing::error!(source = %name, outcome, records = report.records, pages = report.pages, error = note, "fetch run finished");
            }
            RunOutcome::Incomplete | RunOutcome::Interrupted => {
                warn!(source = %name, outcome, records = report.records, pages = report.pages, chunks = report.chunks, note, "fetch run finished");
            }
            _ => {
                info!(source = %name, outcome, records = report.records, pages = report.pages, chunks = report.chunks, note, "fetch run finished");
            }
        }
        report
    }
}
