//! What a run asks a source for: the incremental parameters of its first request, and what
//! an `incomplete` run tells about the next one. Pure.

use crate::sources::{Order, Pagination, SourceConfig};
use chrono::{DateTime, SecondsFormat, Utc};
use tardis_common::messages::Cursor;

use crate::collect::Mode;

/// The incremental query parameters and the starting token of a run.
pub fn incremental_params(
    source: &SourceConfig,
    mode: &Mode,
    cursor: Option<&Cursor>,
    now: DateTime<Utc>,
) -> (Vec<(String, String)>, Option<String>) {
    let mut params = Vec::new();
    let fmt = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let mut token = None;
    let mut since_text = None;
    let since = match (mode, cursor) {
        (Mode::Backfill { since, .. }, _) => Some(*since),
        (
            Mode::Incremental,
            Some(Cursor::Position {
                updated_at,
                id,
                since,
            }),
        ) => {
            // A cursor set by hand to a time alone has no id: every record at that time
            // follows it, and an empty `after_id` would be a bad request.
            if let Some(p) = &source.after_id_param
                && !id.is_empty()
            {
                params.push((p.clone(), id.clone()));
            }
            // Exactly as the source wrote it: a source comparing strings skips nothing.
            since_text = since.clone();
            Some(*updated_at)
        }
        (Mode::Incremental, Some(Cursor::Token { token: t })) => {
            if matches!(source.pagination, Pagination::Cursor { .. }) {
                token = Some(t.clone());
            }
            None
        }
        (Mode::Incremental, None) => chrono::Duration::from_std(source.initial_lookback)
            .ok()
            .map(|d| now - d),
    };
    if let (Some(p), Some(since)) = (&source.since_param, since) {
        params.insert(0, (p.clone(), since_text.unwrap_or_else(|| fmt(&since))));
    }
    (params, token)
}

/// Why a run stopped at `max_pages`, and what the next run does.
pub fn max_pages_note(source: &SourceConfig, mode: &Mode, unsorted: bool) -> String {
    let n = source.max_pages;
    match mode {
        Mode::Backfill { .. } => format!(
            "max_pages ({n}) reached before the last page; the window is not complete: run the backfill again from where it stopped, or raise max_pages"
        ),
        Mode::Incremental if unsorted || source.order == Order::Unsorted => {
            format!(
                "max_pages ({n}) reached before the last page of an unsorted source: the cursor stays where this run started and the next run reads from there again; raise max_pages so one run can read every page"
            )
        }
        Mode::Incremental => format!(
            "max_pages ({n}) reached before the last page; the next run continues from the cursor"
        ),
    }
}
