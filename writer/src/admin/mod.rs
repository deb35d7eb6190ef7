//! The day-2 commands of the writer's image — it holds both connections they need (Postgres
//! and NATS): `writer status`, `writer dlq list|show|replay`, `writer reenrich`. Each prints
//! on stdout (a table, or JSON with `--json`), errors on stderr, and exits non-zero with a
//! message naming what it could not reach ([`tardis_common::cli`]). The selections are pure
//! ([`select`]): every value an operator gives is a bound parameter, never SQL text.
//!
//! What they publish goes where a fetch would: record chunks on `tardis.records.<source>`,
//! with ids that make a retried command harmless (`dlq replay`) or a new command a new
//! enrichment (`reenrich`); the enricher and this writer do the rest, so the delivery
//! contract is the pipeline's own.

pub mod dlq;
pub mod reenrich;
pub mod select;
pub mod status;

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::config::{Command, Config};

/// Runs a day-2 command.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    match config.command.clone() {
        Command::Status { json } => status::run(&config, json).await,
        Command::Dlq(command) => dlq::run(&config, command).await,
        Command::Reenrich(args) => reenrich::run(&config, args).await,
        Command::Run | Command::Migrate => anyhow::bail!("not a day-2 command"),
    }
}

/// A time given on the command line: RFC 3339 (`2026-12-01T10:00:00Z`), a date
/// (`2026-12-01`, midnight UTC), or an age before `now` (`24h`, `7d`, `90m`).
pub fn parse_time(flag: &str, text: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_utc());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    match tardis_common::config::parse_duration(text) {
        Ok(age) => chrono::Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_sub_signed(age))
            .ok_or_else(|| anyhow::anyhow!("{flag} {text:?} reaches before any date")),
        Err(_) => anyhow::bail!(
            "{flag} {text:?} is not a time: give 2026-12-01T10:00:00Z, 2026-12-01 or an age such as 24h"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_instants_dates_or_ages() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let t = |s: &str| parse_time("--since", s, now).unwrap().to_rfc3339();
        assert_eq!(t("2026-11-30T10:00:00+01:00"), "2026-11-30T09:00:00+00:00");
        assert_eq!(t("2026-11-30"), "2026-11-30T00:00:00+00:00");
        assert_eq!(t("24h"), "2026-11-30T12:00:00+00:00");
        assert_eq!(t("90m"), "2026-12-01T10:30:00+00:00");
        let e = parse_time("--since", "yesterday", now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--since \"yesterday\" is not a time"), "{e}");
    }
}
