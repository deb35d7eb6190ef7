//! The wire protocol's records as the mock reads them, and the results it answers.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::judge::Judgement;

/// The `(id, record)` pairs of a user message: `{"<id>": <record>, ...}` (the protocol), or
/// the older `{"records": [{"id", "record"}, ...]}`.
pub fn input_records(input: &Value) -> Vec<(Value, Value)> {
    record_refs(input)
        .into_iter()
        .map(|(id, record)| (id, record.clone()))
        .collect()
}

/// [`input_records`] without copying the records.
fn record_refs(input: &Value) -> Vec<(Value, &Value)> {
    static NULL: Value = Value::Null;
    if let Some(list) = input.get("records").and_then(Value::as_array) {
        return list
            .iter()
            .map(|r| {
                (
                    r.get("id").cloned().unwrap_or(Value::Null),
                    r.get("record").unwrap_or(&NULL),
                )
            })
            .collect();
    }
    input
        .as_object()
        .map(|records| {
            records
                .iter()
                .map(|(id, record)| (Value::String(id.clone()), record))
                .collect()
        })
        .unwrap_or_default()
}

/// One record of a user message: its id, its JSON text and its judgement.
pub(super) struct Incoming<'a> {
    pub id: Value,
    pub text: Cow<'a, str>,
    pub judgement: Judgement,
}

/// The records of a user message, in order: for the protocol's `{"<id>": <record>, ...}`
/// each record's text as sent (it is counted, hashed and searched as sent, and judged in one
/// pass over it, not parsed into a [`Value`]); the older `{"records": [...]}` through
/// [`input_records`]. `None` when the message, or one of its records, is not JSON (a lone
/// surrogate, a number beyond `f64`, nesting deeper than 128: what a full parse refuses).
pub(super) fn incoming(content: &str) -> Option<Vec<Incoming<'_>>> {
    if let Ok(RawRecords(records)) = serde_json::from_str::<RawRecords>(content)
        && !records
            .iter()
            .any(|(id, r)| id == "records" && r.get().starts_with('['))
    {
        return records
            .into_iter()
            .map(|(id, r)| {
                Some(Incoming {
                    id: Value::String(id),
                    judgement: Judgement::of_json(r.get())?,
                    text: Cow::Borrowed(r.get()),
                })
            })
            .collect();
    }
    let input: Value = serde_json::from_str(content).ok()?;
    Some(
        record_refs(&input)
            .into_iter()
            .map(|(id, r)| Incoming {
                id,
                judgement: Judgement::of_value(r),
                text: Cow::Owned(r.to_string()),
            })
            .collect(),
    )
}

/// A JSON object's members in order, each value's text as it is; a key twice keeps its
/// first place and its last value, as a parsed object does.
struct RawRecords<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawRecords<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRecords<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of records by id")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawRecords<'de>, A::Error> {
                let mut out: Vec<(String, &'de RawValue)> = Vec::new();
                let mut at: HashMap<String, usize> = HashMap::new();
                while let Some(id) = map.next_key::<String>()? {
                    let record: &'de RawValue = map.next_value()?;
                    match at.get(&id) {
                        Some(&i) => out[i].1 = record,
                        None => {
                            at.insert(id.clone(), out.len());
                            out.push((id, record));
                        }
                    }
                }
                Ok(RawRecords(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// One result of an answer, serialized in the order `{sentiment, category, summary, id}`.
#[derive(Serialize)]
pub(super) struct Answer {
    pub sentiment: &'static str,
    pub category: Category,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub id: Value,
}

#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum Category {
    Text(String),
    /// A poisoned record's (not a string: invalid).
    Number(u8),
}

impl Answer {
    pub fn judged(j: Judgement, id: Value) -> Self {
        Self {
            sentiment: j.sentiment,
            category: Category::Text(j.category),
            summary: Some(j.summary),
            id,
        }
    }
}
