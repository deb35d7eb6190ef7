//! Reading records out of a page body.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;
use tardis_common::messages::SourceRecord;

use crate::page::RawRecord;

/// Why a page could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("the response has no records array at {pointer}")]
    NoRecords { pointer: String },
    #[error("record #{index} has no id at {pointer}")]
    MissingId { index: usize, pointer: String },
    #[error("record #{index} (id {id}) has no usable updated_at at {pointer}: {found}")]
    BadUpdatedAt {
        index: usize,
        id: String,
        pointer: String,
        found: String,
    },
    #[error("record #{index} is not a JSON object")]
    NotAnObject { index: usize },
}

/// The records of a page, in the order the API sent them ([`crate::page::read`]'s: `None`
/// when the records pointer leads to no array).
pub fn records(
    items: Option<Vec<RawRecord>>,
    records_pointer: &str,
    id_pointer: &str,
    updated_at_pointer: Option<&str>,
) -> Result<Vec<SourceRecord>, ExtractError> {
    let items = items.ok_or_else(|| ExtractError::NoRecords {
        pointer: records_pointer.to_string(),
    })?;
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            if !item.is_object {
                return Err(ExtractError::NotAnObject { index });
            }
            let id = match item.id {
                Some(Value::String(s)) if !s.is_empty() => s,
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(ExtractError::MissingId {
                        index,
                        pointer: id_pointer.to_string(),
                    });
                }
            };
            let updated_at = match updated_at_pointer {
                None => None,
                Some(p) => {
                    let raw = item.updated_at.as_ref();
                    match raw.and_then(parse_time) {
                        Some(t) => Some(t),
                        None => {
                            return Err(ExtractError::BadUpdatedAt {
                                index,
                                id,
                                pointer: p.to_string(),
                                found: raw.map_or("nothing".to_string(), |v| v.to_string()),
                            });
                        }
                    }
                }
            };
            Ok(SourceRecord {
                id,
                updated_at,
                payload: item.payload,
                content_key: None,
                prior: None,
            })
        })
        .collect()
}

/// A time as an RFC 3339 string, a `YYYY-MM-DD HH:MM:SS[.f]` UTC string, or epoch seconds
/// (milliseconds when the number is too large to be seconds).
pub fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.to_utc())
            .ok()
            .or_else(|| {
                NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                    .ok()
                    .map(|n| Utc.from_utc_datetime(&n))
            }),
        Value::Number(n) => {
            let v = n.as_f64()?;
            let secs = if v.abs() >= 1e11 { v / 1000.0 } else { v };
            DateTime::from_timestamp_millis((secs * 1000.0).round() as i64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{Pointers, read};
    use serde_json::json;

    /// The records of a page body given as a `Value`, read as the fetcher reads a page.
    fn records(
        body: &Value,
        records_pointer: &str,
        id_pointer: &str,
        updated_at_pointer: Option<&str>,
    ) -> Result<Vec<SourceRecord>, ExtractError> {
        let pointers = Pointers::new(records_pointer, id_pointer, updated_at_pointer);
        let page = read(body.to_string().as_bytes(), &pointers, false).unwrap();
        super::records(
            page.records,
            records_pointer,
            id_pointer,
            updated_at_pointer,
        )
    }

    #[test]
    fn legacy_page_parses_with_numeric_and_string_ids() {
        let body = json!({"data": [
            {"id": 7, "updated_at": "2026-11-01T10:00:00Z", "price": 1.5},
            {"id": "abc", "updated_at": "2026-11-01T10:00:00.250+01:00"}
        ], "pagination": {"total_pages": 1}});
        let r = records(&body, "/data", "/id", Some("/updated_at")).unwrap();
        assert_eq!(r[0].id, "7");
        assert_eq!(
            r[0].payload.get(),
            r#"{"id":7,"updated_at":"2026-11-01T10:00:00Z","price":1.5}"#
        );
        assert_eq!(r[1].id, "abc");
        assert_eq!(
            r[1].updated_at.unwrap().to_rfc3339(),
            "2026-11-01T09:00:00.250+00:00"
        );
    }

    #[test]
    fn problems_name_the_record_and_the_pointer() {
        let body = json!({"items": []});
        assert_eq!(
            records(&body, "/data", "/id", None)
                .unwrap_err()
                .to_string(),
            "the response has no records array at /data"
        );
        let body =
            json!({"data": [{"id": 1, "updated_at": "2026-11-01T10:00:00Z"}, {"name": "x"}]});
        assert_eq!(
            records(&body, "/data", "/id", None)
                .unwrap_err()
                .to_string(),
            "record #1 has no id at /id"
        );
        let body = json!({"data": [{"id": 1, "updated_at": "yesterday"}]});
        assert_eq!(
            records(&body, "/data", "/id", Some("/updated_at"))
                .unwrap_err()
                .to_string(),
            "record #0 (id 1) has no usable updated_at at /updated_at: \"yesterday\""
        );
        let body = json!({"data": [3]});
        assert!(matches!(
            records(&body, "/data", "/id", None),
            Err(ExtractError::NotAnObject { index: 0 })
        ));
    }

    #[test]
    fn times_in_several_shapes() {
        let t = |v: Value| parse_time(&v).map(|t| t.to_rfc3339());
        assert_eq!(
            t(json!(1_700_000_000)),
            Some("2023-11-14T22:13:20+00:00".into())
        );
        assert_eq!(
            t(json!(1_700_000_000_500i64)),
            Some("2023-11-14T22:13:20.500+00:00".into())
        );
        assert_eq!(
            t(json!("2026-11-01 10:00:00")),
            Some("2026-11-01T10:00:00+00:00".into())
        );
        assert_eq!(t(json!(null)), None);
    }
}
