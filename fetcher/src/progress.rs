//! What a backfill says while it runs: pages, records, rate and an ETA, as a progress line on
//! a terminal, or a JSON log line every [`LOG_EVERY`] otherwise (so a Job's log is not flooded).
//! The ETA is pure ([`eta`]): how far the records' `updated_at` has come through the window.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::info;

/// How often a backfill off a terminal logs its progress.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The time left, from the share of the window `[since, end)` that the newest record read
/// (`position`) has covered in `elapsed`; `None` until that share is known and positive.
pub fn eta(
    since: DateTime<Utc>,
    end: DateTime<Utc>,
    position: Option<DateTime<Utc>>,
    elapsed: Duration,
) -> Option<Duration> {
    let total = (end - since).num_milliseconds() as f64;
    let done = (position? - since).num_milliseconds() as f64;
    if total <= 0.0 || done <= 0.0 {
        return None;
    }
    let share = (done / total).min(1.0);
    Some(Duration::from_secs_f64(
        elapsed.as_secs_f64() * (1.0 - share) / share,
    ))
}

/// The progress of one backfill.
#[derive(Debug)]
pub struct BackfillProgress {
    source: String,
    since: DateTime<Utc>,
    end: DateTime<Utc>,
    started: tokio::time::Instant,
    bar: Option<indicatif::ProgressBar>,
    last_log: Option<tokio::time::Instant>,
}

impl BackfillProgress {
    pub fn new(source: &str, since: DateTime<Utc>, until: Option<DateTime<Utc>>) -> Self {
        let bar = tardis_common::cli::on_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            source: source.to_string(),
            since,
            end: until.unwrap_or_else(Utc::now),
            started: tokio::time::Instant::now(),
            bar,
            last_log: None,
        }
    }

    /// After each page: what was read so far and the newest `updated_at` seen.
    pub fn page(&mut self, pages: u64, records: u64, position: Option<DateTime<Utc>>) {
        let elapsed = self.started.elapsed();
        let rate = records as f64 / elapsed.as_secs_f64().max(0.001);
        let eta = eta(self.since, self.end, position, elapsed);
        let eta_text = eta.map_or("unknown".to_string(), |d| {
            humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
        });
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "backfill {}: {pages} pages, {records} records, {rate:.0} records/s, at {}, eta {eta_text}",
                self.source,
                position.map_or("-".into(), |p| p.format("%Y-%m-%d %H:%M").to_string()),
            ));
            return;
        }
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            self.last_log = Some(now);
            info!(
                source = %self.source,
                pages,
                records,
                records_per_second = (rate * 10.0).round() / 10.0,
                position = position.map(|p| p.to_rfc3339()),
                eta_seconds = eta.map(|d| d.as_secs()),
                "backfill progress"
            );
        }
    }
}

impl Drop for BackfillProgress {
    /// The last line stays on the terminal when the run ends, however it ends.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn the_eta_follows_the_share_of_the_window_covered() {
        let (since, end) = (at("2026-01-01T00:00:00Z"), at("2026-01-11T00:00:00Z"));
        let minute = Duration::from_secs(60);
        // A quarter of the window in a minute: three more.
        assert_eq!(
            eta(since, end, Some(at("2026-01-03T12:00:00Z")), minute),
            Some(Duration::from_secs(180))
        );
        assert_eq!(eta(since, end, Some(end), minute), Some(Duration::ZERO));
        assert_eq!(eta(since, end, None, minute), None);
        assert_eq!(eta(since, end, Some(since), minute), None);
        assert_eq!(eta(end, since, Some(end), minute), None);
    }
}
