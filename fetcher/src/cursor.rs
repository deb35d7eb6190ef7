//! Cursor arithmetic: the order of records and what a run has already handed on.
//!
//! Records are ordered by `(updated_at, id)`. Ids compare as numbers when both are decimal
//! integers (so `"9" < "10"`, as an API sorting numeric ids does) and as text otherwise. The
//! legacy API treats `since` as inclusive and takes `after_id` as the tie-breaker, and we also
//! drop, client-side, every record at or before the cursor — so records sharing one
//! `updated_at` are neither skipped nor repeated, whatever the API does with `after_id`.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use tardis_common::messages::{Cursor, SourceRecord};

/// Compares two record ids: numerically when both are decimal integers, else as text.
pub fn compare_ids(a: &str, b: &str) -> Ordering {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if numeric(a) && numeric(b) {
        let (ta, tb) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
        ta.len()
            .cmp(&tb.len())
            .then_with(|| ta.cmp(tb))
            .then_with(|| a.cmp(b))
    } else {
        a.cmp(b)
    }
}

/// Compares two `(updated_at, id)` positions.
pub fn compare_positions(a: (&DateTime<Utc>, &str), b: (&DateTime<Utc>, &str)) -> Ordering {
    a.0.cmp(b.0).then_with(|| compare_ids(a.1, b.1))
}

/// Whether `record` comes strictly after `cursor` (always true without a position cursor).
pub fn is_after(record: &SourceRecord, cursor: Option<&Cursor>) -> bool {
    match (cursor, &record.updated_at) {
        (Some(Cursor::Position { updated_at, id, .. }), Some(at)) => {
            compare_positions((at, &record.id), (updated_at, id)) == Ordering::Greater
        }
        _ => true,
    }
}

/// The position of a position cursor.
fn position(c: &Cursor) -> Option<(&DateTime<Utc>, &str)> {
    match c {
        Cursor::Position { updated_at, id, .. } => Some((updated_at, id.as_str())),
        Cursor::Token { .. } => None,
    }
}

/// The later of two cursors (a position cursor only moves forward).
pub fn later(current: Option<Cursor>, candidate: Option<Cursor>) -> Option<Cursor> {
    match (current, candidate) {
        (Some(a), Some(b)) => match (position(&a), position(&b)) {
            (Some(pa), Some(pb)) if compare_positions(pb, pa) != Ordering::Greater => Some(a),
            _ => Some(b),
        },
        (current, None) => current,
        (None, candidate) => candidate,
    }
}

/// The record of `records` last by `(updated_at, id)`, if they have times.
pub fn max_record(records: &[SourceRecord]) -> Option<&SourceRecord> {
    records
        .iter()
        .filter(|r| r.updated_at.is_some())
        .max_by(|a, b| {
            compare_positions(
                (
                    a.updated_at.as_ref().unwrap_or(&DateTime::<Utc>::MIN_UTC),
                    &a.id,
                ),
                (
                    b.updated_at.as_ref().unwrap_or(&DateTime::<Utc>::MIN_UTC),
                    &b.id,
                ),
            )
        })
}

/// The cursor just after `record`, keeping its `updated_at` exactly as the source wrote it
/// (read at `updated_at_pointer` in its payload) to send back as `since`.
pub fn position_of(record: &SourceRecord, updated_at_pointer: Option<&str>) -> Option<Cursor> {
    let updated_at = record.updated_at?;
    let since = updated_at_pointer.and_then(|p| source_text(record, p));
    Some(Cursor::Position {
        updated_at,
        id: record.id.clone(),
        since,
    })
}

/// The cursor after the last record of `records` by `(updated_at, id)`.
pub fn max_position(records: &[SourceRecord], updated_at_pointer: Option<&str>) -> Option<Cursor> {
    max_record(records).and_then(|r| position_of(r, updated_at_pointer))
}

/// The value at `pointer` in a record's payload as the source wrote it: a string's content,
/// or a number's digits.
fn source_text(record: &SourceRecord, pointer: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(record.payload.get()).ok()?;
    match value.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The `since` value to send for a cursor: the source's own text when the cursor has it,
/// else RFC 3339 with as many fractional digits as needed.
pub fn since_text(updated_at: &DateTime<Utc>, since: Option<&str>) -> String {
    since.map_or_else(
        || updated_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        str::to_string,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn rec(id: &str, t: &str) -> SourceRecord {
        SourceRecord {
            id: id.into(),
            updated_at: Some(at(t)),
            payload: RawValue::from_string("{}".into()).unwrap(),
            content_key: None,
            prior: None,
        }
    }

    #[test]
    fn numeric_ids_compare_as_numbers() {
        assert_eq!(compare_ids("9", "10"), Ordering::Less);
        assert_eq!(compare_ids("10", "9"), Ordering::Greater);
        assert_eq!(
            compare_ids("007", "7"),
            Ordering::Less,
            "stable for leading zeros"
        );
        assert_eq!(compare_ids("abc", "abd"), Ordering::Less);
        assert_eq!(
            compare_ids("a9", "a10"),
            Ordering::Greater,
            "text ids compare as text"
        );
    }

    #[test]
    fn ties_on_updated_at_are_split_by_id() {
        let cursor = Cursor::Position {
            updated_at: at("2026-01-01T00:00:00Z"),
            id: "2".into(),
            since: None,
        };
        let t = "2026-01-01T00:00:00Z";
        assert!(!is_after(&rec("1", t), Some(&cursor)));
        assert!(
            !is_after(&rec("2", t), Some(&cursor)),
            "the cursor record itself is done"
        );
        assert!(is_after(&rec("3", t), Some(&cursor)));
        assert!(is_after(&rec("10", t), Some(&cursor)));
        assert!(is_after(&rec("1", "2026-01-01T00:00:01Z"), Some(&cursor)));
        assert!(!is_after(&rec("99", "2025-12-31T23:59:59Z"), Some(&cursor)));
        assert!(is_after(&rec("1", t), None));
    }

    #[test]
    fn cursors_only_move_forward() {
        let a = Cursor::Position {
            updated_at: at("2026-01-01T00:00:00Z"),
            id: "5".into(),
            since: Some("2026-01-01T00:00:00.000Z".into()),
        };
        let b = Cursor::Position {
            updated_at: at("2026-01-01T00:00:00Z"),
            id: "4".into(),
            since: None,
        };
        assert_eq!(later(Some(a.clone()), Some(b.clone())), Some(a.clone()));
        assert_eq!(later(Some(b), Some(a.clone())), Some(a.clone()));
        assert_eq!(later(Some(a.clone()), None), Some(a));
        let t = Cursor::Token { token: "x".into() };
        assert_eq!(later(None, Some(t.clone())), Some(t));
    }

    #[test]
    fn max_position_of_a_chunk() {
        let records = [
            rec("3", "2026-01-01T00:00:00Z"),
            rec("12", "2026-01-01T00:00:00Z"),
            rec("1", "2025-01-01T00:00:00Z"),
        ];
        assert_eq!(
            max_position(&records, None),
            Some(Cursor::Position {
                updated_at: at("2026-01-01T00:00:00Z"),
                id: "12".into(),
                since: None,
            })
        );
    }

    fn written(id: &str, text: serde_json::Value) -> SourceRecord {
        let payload = serde_json::json!({"id": id, "meta": {"modified": text}});
        SourceRecord {
            id: id.into(),
            updated_at: crate::extract::parse_time(&text),
            payload: RawValue::from_string(payload.to_string()).unwrap(),
            content_key: None,
            prior: None,
        }
    }

    #[test]
    fn the_cursor_keeps_updated_at_exactly_as_the_source_wrote_it() {
        for text in [
            "2026-11-30T10:00:39.000Z",
            "2026-11-30T10:00:39Z",
            "2026-11-30T10:00:39+00:00",
            "2026-11-30T11:00:39.000000+01:00",
            "2026-11-30T10:00:39.123456789Z",
            "2026-11-30 10:00:39",
        ] {
            let r = written("7", serde_json::json!(text));
            let c = max_position(std::slice::from_ref(&r), Some("/meta/modified")).unwrap();
            let Cursor::Position {
                updated_at, since, ..
            } = &c
            else {
                panic!("{c:?}")
            };
            assert_eq!(since.as_deref(), Some(text));
            assert_eq!(since_text(updated_at, since.as_deref()), text);
            assert_eq!(updated_at.timestamp(), 1_796_032_839, "{text}");
        }
        let r = written("7", serde_json::json!(1_796_032_839));
        let c = max_position(std::slice::from_ref(&r), Some("/meta/modified")).unwrap();
        assert!(matches!(&c, Cursor::Position { since: Some(s), .. } if s == "1796032839"));
    }

    #[test]
    fn ordering_compares_parsed_times_not_text() {
        // "…39Z" sorts after "…39.500Z" as text; as times it is earlier.
        let a = written("1", serde_json::json!("2026-11-30T10:00:39Z"));
        let b = written("2", serde_json::json!("2026-11-30T10:00:39.500Z"));
        let c = max_position(&[b.clone(), a.clone()], Some("/meta/modified")).unwrap();
        assert!(matches!(&c, Cursor::Position { id, .. } if id == "2"));
        let cursor = position_of(&a, Some("/meta/modified"));
        assert!(is_after(&b, cursor.as_ref()));
        assert_eq!(
            since_text(&a.updated_at.unwrap(), None),
            "2026-11-30T10:00:39Z",
            "without the source's text, RFC 3339"
        );
    }
}
