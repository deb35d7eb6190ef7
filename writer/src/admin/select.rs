//! Pure: the selections of the day-2 commands as SQL conditions with bound parameters. What
//! an operator types is only ever a parameter value; field names are checked against
//! `[A-Za-z0-9_]` before they become a `->>` key, which is itself a parameter.

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use crate::config::{DlqFilter, ReenrichArgs};

/// A parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Texts(Vec<String>),
    Time(DateTime<Utc>),
}

impl Param {
    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Texts(v) => v,
            Param::Time(v) => v,
        }
    }
}

/// `WHERE` conditions joined by `AND` (or `TRUE`), and their parameters `$1..`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    conditions: Vec<String>,
    pub params: Vec<Param>,
}

impl Selection {
    /// Adds a condition where `?` stands for the next parameter.
    pub fn and(&mut self, condition: &str, param: Param) {
        self.params.push(param);
        let n = self.params.len();
        self.conditions
            .push(condition.replace('?', &format!("${n}")));
    }

    /// A condition without a parameter.
    pub fn and_sql(&mut self, condition: &str) {
        self.conditions.push(condition.to_string());
    }

    pub fn sql(&self) -> String {
        if self.conditions.is_empty() {
            "TRUE".into()
        } else {
            self.conditions.join(" AND ")
        }
    }

    /// The parameters as `tokio-postgres` takes them (`extra` after them).
    pub fn refs<'a>(&'a self, extra: &[&'a (dyn ToSql + Sync)]) -> Vec<&'a (dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(Param::as_sql)
            .chain(extra.iter().copied())
            .collect()
    }

    /// The number of the next parameter.
    pub fn next(&self) -> usize {
        self.params.len() + 1
    }
}

/// A stage name as stored (`fetch`, `enrich`, `write`).
pub fn stage(text: &str) -> anyhow::Result<&'static str> {
    match text.trim().to_ascii_lowercase().as_str() {
        "fetch" => Ok("fetch"),
        "enrich" => Ok("enrich"),
        "write" => Ok("write"),
        other => anyhow::bail!("--stage {other:?} is not a stage: give fetch, enrich or write"),
    }
}

/// The dead letters `filter` takes (`open`: unresolved only), over the table `dead_letters`.
pub fn dead_letters(
    filter: &DlqFilter,
    open: bool,
    now: DateTime<Utc>,
) -> anyhow::Result<Selection> {
    let mut s = Selection::default();
    if let Some(source) = &filter.source {
        s.and("source = ?", Param::Text(source.clone()));
    }
    if let Some(st) = &filter.stage {
        s.and("stage = ?", Param::Text(stage(st)?.into()));
    }
    if let Some(reason) = &filter.reason {
        s.and(
            "strpos(lower(reason), lower(?)) > 0",
            Param::Text(reason.clone()),
        );
    }
    if let Some(since) = &filter.since {
        s.and(
            "last_seen >= ?",
            Param::Time(super::parse_time("--since", since, now)?),
        );
    }
    if let Some(until) = &filter.until {
        s.and(
            "last_seen < ?",
            Param::Time(super::parse_time("--until", until, now)?),
        );
    }
    if !filter.record_ids.is_empty() {
        s.and(
            "record_id = ANY(?)",
            Param::Texts(filter.record_ids.clone()),
        );
    }
    if open {
        s.and_sql("resolved_at IS NULL");
    }
    Ok(s)
}

/// The stored records `args` takes, over the table `records`.
pub fn records(args: &ReenrichArgs, now: DateTime<Utc>) -> anyhow::Result<Selection> {
    let mut s = Selection::default();
    if let Some(source) = &args.source {
        s.and("source = ?", Param::Text(source.clone()));
    }
    if let Some(v) = &args.prompt_version {
        s.and("prompt_version = ?", Param::Text(v.clone()));
    }
    if let Some(v) = &args.not_prompt_version {
        s.and("prompt_version <> ?", Param::Text(v.clone()));
    }
    if let Some(m) = &args.model {
        s.and("model = ?", Param::Text(m.clone()));
    }
    if let Some(since) = &args.since {
        s.and(
            "enriched_at >= ?",
            Param::Time(super::parse_time("--since", since, now)?),
        );
    }
    if let Some(until) = &args.until {
        s.and(
            "enriched_at < ?",
            Param::Time(super::parse_time("--until", until, now)?),
        );
    }
    for filter in &args.filters {
        let Some((path, value)) = filter.split_once('=') else {
            anyhow::bail!(
                "--where {filter:?} is not field=value: give enrichment.category=quote or payload.symbol=ACME"
            );
        };
        let (column, field) = match path.trim().split_once('.') {
            Some(("enrichment", f)) => ("enrichment", f),
            Some(("payload", f)) => ("payload", f),
            _ => anyhow::bail!(
                "--where {filter:?}: the field must be enrichment.<name> or payload.<name>"
            ),
        };
        if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            anyhow::bail!("--where {filter:?}: a field name is letters, digits and _ only");
        }
        s.params.push(Param::Text(field.to_string()));
        let key = s.params.len();
        s.and(
            &format!("{column} ->> ${key} = ?"),
            Param::Text(value.to_string()),
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .to_utc()
    }

    #[test]
    fn a_reenrich_selection_binds_every_value() {
        let args = ReenrichArgs {
            source: Some("market_data".into()),
            prompt_version: Some("v1-aaaa".into()),
            since: Some("7d".into()),
            filters: vec!["enrichment.category=x'; DROP TABLE records; --".into()],
            ..Default::default()
        };
        let s = records(&args, now()).unwrap();
        assert_eq!(
            s.sql(),
            "source = $1 AND prompt_version = $2 AND enriched_at >= $3 AND enrichment ->> $4 = $5"
        );
        assert_eq!(
            s.params[4],
            Param::Text("x'; DROP TABLE records; --".into())
        );
        assert_eq!(s.next(), 6);
    }

    #[test]
    fn field_names_and_stages_are_checked() {
        for bad in [
            "category=x",
            "enrichment.=x",
            "payload.a-b=x",
            "other.a=x",
            "enrichment.a",
        ] {
            let args = ReenrichArgs {
                filters: vec![bad.into()],
                ..Default::default()
            };
            assert!(records(&args, now()).is_err(), "{bad}");
        }
        let filter = DlqFilter {
            stage: Some("parse".into()),
            ..Default::default()
        };
        let e = dead_letters(&filter, true, now()).unwrap_err().to_string();
        assert!(e.contains("give fetch, enrich or write"), "{e}");
    }

    #[test]
    fn a_dead_letter_selection_with_everything() {
        let filter = DlqFilter {
            source: Some("s".into()),
            stage: Some("Enrich".into()),
            reason: Some("schema".into()),
            since: Some("24h".into()),
            until: None,
            record_ids: vec!["1".into(), "2".into()],
        };
        let s = dead_letters(&filter, true, now()).unwrap();
        assert_eq!(
            s.sql(),
            "source = $1 AND stage = $2 AND strpos(lower(reason), lower($3)) > 0 AND last_seen >= $4 AND record_id = ANY($5) AND resolved_at IS NULL"
        );
        assert_eq!(s.params[1], Param::Text("enrich".into()));
        assert_eq!(
            dead_letters(&DlqFilter::default(), false, now())
                .unwrap()
                .sql(),
            "TRUE"
        );
    }
}
