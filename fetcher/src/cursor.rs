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
        (Some(Cursor::Position { updated_at, id }), Some(at)) => {
            compare_positions((at, &record.id), (updated_at, id)) == Ordering::Greater
        }
        _ => true,
    }
}

/// The later of two cursors (a position cursor only moves forward).
pub fn later(current: Option<Cursor>, candidate: Option<Cursor>) -> Option<Cursor> {
    match (current, candidate) {
        (
            Some(Cursor::Position {
                updated_at: a,
                id: ia,
            }),
            Some(Cursor::Position {
                updated_at: b,
                id: ib,
            }),
        ) => {
            if compare_positions((&b, &ib), (&a, &ia)) == Ordering::Greater {
                Some(Cursor::Position {
                    updated_at: b,
                    id: ib,
                })
            } else {
                Some(Cursor::Position {
                    updated_at: a,
                    id: ia,
                })
            }
        }
        (current, None) => current,
        (_, candidate) => candidate,
    }
}

/// The position of the last record of `records` by `(updated_at, id)`, if they have times.
pub fn max_position(records: &[SourceRecord]) -> Option<Cursor> {
    records
        .iter()
        .filter_map(|r| r.updated_at.as_ref().map(|t| (t, r.id.as_str())))
        .max_by(|a, b| compare_positions(*a, *b))
        .map(|(t, id)| Cursor::Position {
            updated_at: *t,
            id: id.to_string(),
        })
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
        };
        let b = Cursor::Position {
            updated_at: at("2026-01-01T00:00:00Z"),
            id: "4".into(),
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
            max_position(&records),
            Some(Cursor::Position {
                updated_at: at("2026-01-01T00:00:00Z"),
                id: "12".into()
            })
        );
    }
}
