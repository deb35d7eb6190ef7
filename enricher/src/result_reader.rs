//! Reading a model's answer in one pass over its text: the `results` array, and of each result
//! only its `id` and the raw text of the schema's fields, borrowed from the answer. Nothing
//! else is decoded or copied, and no `serde_json::Value` is built.
//!
//! What it reads is what a JSON parser would keep, with these differences on purpose:
//! - a key given twice counts as its last value (`results` of the answer, a field or the `id`
//!   of a result), as a JSON object keeps it;
//! - what the enricher never decodes is checked for syntax only, at any depth, and dropped:
//!   keys outside `results`, fields outside the schema, a result that is not an object (it
//!   counts as a result without an id), an `id` that is neither a string nor a number. A lone
//!   surrogate `\ud800`, a number out of `f64`'s range or nesting deeper than 128 there is not
//!   an error;
//! - a schema field is kept as its raw text (syntax checked) and decoded only when validated:
//!   one that cannot be decoded (a lone surrogate in a string) fails its record, with the
//!   reason, not the whole answer;
//! - an answer that is JSON but not an object has no `results` array (not "not valid JSON").
//!
//! Any syntax error, or an error decoding the keys of a result or its `id` (a lone surrogate
//! in a key, an `id` of `1e400`), makes the whole answer unreadable, as it would be for a JSON
//! parser: the caller fails the batch, never single records for it.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::schema::EnrichmentSchema;

/// Visitor methods for every scalar, each giving `$value`.
macro_rules! scalars_are {
    ($value:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// A result of an answer: its `id` and its schema fields' raw text.
#[derive(Debug, Clone)]
pub struct ReadResult<'a> {
    /// The result's `id` as text (a number as its decimal text); `None` when it has none or
    /// it is neither a string nor a number.
    pub id: Option<String>,
    /// Per schema field, in the schema's order: its raw value, when the result has it.
    pub fields: Vec<Option<&'a RawValue>>,
}

/// What an answer's content holds.
#[derive(Debug)]
pub enum AnswerContent<'a> {
    /// The `results` array: per result, what was read, or `None` for a result that is not a
    /// JSON object.
    Results(Vec<Option<ReadResult<'a>>>),
    /// A JSON object without a `results` array (absent or `null`), or with one of another
    /// type, named.
    NoResults(Option<&'static str>),
    /// JSON, but not an object.
    NotAnObject,
}

/// Reads an answer's content (one JSON value, nothing after it).
pub fn read_answer<'a>(
    content: &'a str,
    schema: &EnrichmentSchema,
) -> Result<AnswerContent<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(content);
    let answer = AnswerSeed { schema }.deserialize(&mut de)?;
    de.end()?;
    Ok(answer)
}

/// Reads one result: `None` when it is not a JSON object.
pub fn read_result<'a>(
    result: &'a str,
    schema: &EnrichmentSchema,
) -> Result<Option<ReadResult<'a>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(result);
    let read = ResultSeed { schema }.deserialize(&mut de)?;
    de.end()?;
    Ok(read)
}

/// `DeserializeSeed` for visitors that take any JSON value.
macro_rules! seeds_of_any {
    ($($seed:ident),*) => {
        $(impl<'de> DeserializeSeed<'de> for $seed<'_> {
            type Value = <Self as Visitor<'de>>::Value;

            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        })*
    };
}

seeds_of_any!(AnswerSeed, ResultsSeed, ResultSeed);

/// The answer's top level.
struct AnswerSeed<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> Visitor<'de> for AnswerSeed<'_> {
    type Value = AnswerContent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an answer object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut answer = AnswerContent::NoResults(None);
        while let Some(key) = map.next_key_seed(KeyNamed("results"))? {
            if key {
                answer = map.next_value_seed(ResultsSeed {
                    schema: self.schema,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(answer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(AnswerContent::NotAnObject)
    }

    scalars_are!(AnswerContent::NotAnObject);
}

/// The `results` value: an array of results, or another value (named).
struct ResultsSeed<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> Visitor<'de> for ResultsSeed<'_> {
    type Value = AnswerContent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of results")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut results = Vec::with_capacity(seq.size_hint().unwrap_or(16));
        while let Some(r) = seq.next_element_seed(ResultSeed {
            schema: self.schema,
        })? {
            results.push(r);
        }
        Ok(AnswerContent::Results(results))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(AnswerContent::NoResults(Some("an object")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(Some("a string")))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(Some("a boolean")))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(Some("a number")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(Some("a number")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(AnswerContent::NoResults(Some("a number")))
    }
}

/// One result against the schema: `None` when it is not an object.
struct ResultSeed<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> Visitor<'de> for ResultSeed<'_> {
    type Value = Option<ReadResult<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a result object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut read = ReadResult {
            id: None,
            fields: vec![None; self.schema.fields.len()],
        };
        while let Some(key) = map.next_key_seed(FieldKey {
            schema: self.schema,
        })? {
            match key {
                Key::Id => read.id = map.next_value::<IdText>()?.0,
                Key::Field(i) => read.fields[i] = Some(map.next_value::<&'de RawValue>()?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(read))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    scalars_are!(None);
}

/// Whether a key is the one named (compared decoded, without allocating when unescaped).
struct KeyNamed(&'static str);

impl<'de> DeserializeSeed<'de> for KeyNamed {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyNamed {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

/// What a result's key names.
enum Key {
    Id,
    Field(usize),
    Other,
}

struct FieldKey<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> DeserializeSeed<'de> for FieldKey<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldKey<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        if key == "id" {
            return Ok(Key::Id);
        }
        Ok(self
            .schema
            .fields
            .iter()
            .position(|(name, _)| name == key)
            .map_or(Key::Other, Key::Field))
    }
}

/// A result's `id` as text: a string as is, a number as its decimal text (`5`, `5.0`), anything
/// else none.
struct IdText(Option<String>);

impl<'de> Deserialize<'de> for IdText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdText;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an id")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<IdText, E> {
                Ok(IdText(Some(s.to_string())))
            }

            fn visit_string<E: de::Error>(self, s: String) -> Result<IdText, E> {
                Ok(IdText(Some(s)))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<IdText, E> {
                Ok(IdText(Some(n.to_string())))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<IdText, E> {
                Ok(IdText(Some(n.to_string())))
            }

            fn visit_f64<E: de::Error>(self, n: f64) -> Result<IdText, E> {
                Ok(IdText(
                    serde_json::Number::from_f64(n).map(|n| n.to_string()),
                ))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<IdText, E> {
                Ok(IdText(None))
            }

            fn visit_unit<E: de::Error>(self) -> Result<IdText, E> {
                Ok(IdText(None))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdText, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IdText(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IdText, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IdText(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> EnrichmentSchema {
        EnrichmentSchema::default()
    }

    /// A result's id and its validated enrichment, or why not; `None`: not an object.
    type Checked = Option<(Option<String>, Result<String, String>)>;

    /// An answer's results, checked.
    fn read(content: &str) -> Result<Vec<Checked>, String> {
        let s = schema();
        match read_answer(content, &s).map_err(|e| e.to_string())? {
            AnswerContent::Results(results) => Ok(results
                .into_iter()
                .map(|r| {
                    r.map(|r| {
                        let v = s.validated(&r).map(|raw| raw.get().to_string());
                        (r.id, v)
                    })
                })
                .collect()),
            other => Err(format!("{other:?}")),
        }
    }

    const GOOD: &str = r#""sentiment": "neutral", "category": "c", "summary": "s""#;

    #[test]
    fn the_last_results_key_counts_as_a_json_object_keeps_it() {
        let content = format!(
            r#"{{"results": [{{"id": "x", {GOOD}}}], "res\u0075lts": [{{"id": "a", {GOOD}}}]}}"#
        );
        let results = read(&content).unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].as_ref().unwrap().0.as_deref(), Some("a"));
        // A later `results` that is not an array wins too: no results.
        let content = format!(r#"{{"results": [{{"id": "a", {GOOD}}}], "results": null}}"#);
        assert!(matches!(
            read_answer(&content, &schema()).unwrap(),
            AnswerContent::NoResults(None)
        ));
    }

    #[test]
    fn what_is_read_must_decode_or_the_whole_answer_is_unreadable() {
        for (what, result) in [
            (
                "a lone surrogate in a key",
                format!(r#"{{"id": "a", "\ud800": 1, {GOOD}}}"#),
            ),
            (
                "a lone surrogate in the id",
                format!(r#"{{"id": "a\udc00", {GOOD}}}"#),
            ),
            ("an id out of range", format!(r#"{{"id": 1e400, {GOOD}}}"#)),
            (
                "a bad escape in a field",
                format!(r#"{{"id": "a", {GOOD}, "x": "\q"}}"#),
            ),
            (
                "a truncated result",
                r#"{"id": "a", "summary": "#.to_string(),
            ),
        ] {
            let content = format!(r#"{{"results": [{{"id": "b", {GOOD}}}, {result}]}}"#);
            let err = read_answer(&content, &schema()).unwrap_err();
            assert!(err.is_syntax() || err.is_eof(), "{what}: {err}");
        }
        for bad in ["{\"results\": [] } x", "{\"results\": [", ""] {
            let err = read_answer(bad, &schema()).unwrap_err();
            assert!(err.is_syntax() || err.is_eof(), "{bad:?}: {err}");
        }
    }

    #[test]
    fn values_never_read_are_only_checked_for_syntax_and_then_dropped() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let content = format!(
            r#"{{"note": "\ud800", "n": 1e400, "results": [
                {{"id": "a", {GOOD}, "extra": "\udfff", "big": -1e999, "deep": {deep}}}
            ]}}"#
        );
        let results = read(&content).unwrap();
        let (id, enrichment) = results[0].clone().unwrap();
        assert_eq!(id.as_deref(), Some("a"));
        assert_eq!(
            enrichment.unwrap(),
            r#"{"sentiment":"neutral","category":"c","summary":"s"}"#
        );
        // A JSON parser refuses this answer; the reader does not need to.
        assert!(serde_json::from_str::<serde_json::Value>(&content).is_err());
    }

    #[test]
    fn a_schema_field_that_cannot_be_decoded_fails_its_record_with_the_reason() {
        let content = r#"{"results": [{"id": "a", "sentiment": "neutral", "category": "c", "summary": "s\ud800"}]}"#;
        let results = read(content).unwrap();
        let (_, enrichment) = results[0].clone().unwrap();
        let err = enrichment.unwrap_err();
        assert!(
            err.starts_with("summary cannot be read: ") && err.contains("hex escape"),
            "{err}"
        );
    }

    #[test]
    fn answers_and_results_of_other_shapes_are_named() {
        let s = schema();
        for (content, kind) in [
            ("{\"results\": {\"a\": 1}}", Some("an object")),
            ("{\"results\": \"[]\"}", Some("a string")),
            ("{\"results\": 3}", Some("a number")),
            ("{\"results\": false}", Some("a boolean")),
            ("{\"results\": null}", None),
            ("{}", None),
        ] {
            match read_answer(content, &s).unwrap() {
                AnswerContent::NoResults(k) => assert_eq!(k, kind, "{content}"),
                other => panic!("{content}: {other:?}"),
            }
        }
        for content in ["[{\"results\": []}]", "\"results\"", "1", "null", "true"] {
            assert!(
                matches!(
                    read_answer(content, &s).unwrap(),
                    AnswerContent::NotAnObject
                ),
                "{content}"
            );
        }
        // Results that are not objects are `None`, in their place.
        let results = read(&format!(
            r#"{{"results": [1, [2], "x", null, {{"id": 7, {GOOD}}}]}}"#
        ))
        .unwrap();
        assert!(results[..4].iter().all(Option::is_none));
        assert_eq!(results[4].as_ref().unwrap().0.as_deref(), Some("7"));
        assert!(read_result("[1]", &s).unwrap().is_none());
        assert!(read_result("{} {}", &s).is_err());
    }
}
