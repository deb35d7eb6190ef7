//! The enrichment schema: the fields the model must return for each record, and their checks.
//!
//! `ENRICH_SCHEMA` takes a JSON object of fields, each with a `type` (`string`, `number`,
//! `integer`, `boolean`) and optional `enum`, `max_words`, `max_length`, `description`,
//! `required` (default true). The default:
//!
//! ```json
//! {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
//!  "category":  {"type": "string", "max_length": 64},
//!  "summary":   {"type": "string", "max_words": 50}}
//! ```

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_words: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// The fields of one enrichment, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichmentSchema {
    pub fields: Vec<(String, FieldSpec)>,
}

impl Default for EnrichmentSchema {
    fn default() -> Self {
        Self::parse(
            r#"{
            "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"], "description": "overall tone of the record"},
            "category": {"type": "string", "max_length": 64, "description": "a short lowercase topic label"},
            "summary": {"type": "string", "max_words": 50, "description": "one or two sentences, at most 50 words"}
        }"#,
        )
        .expect("the default schema is valid")
    }
}

impl EnrichmentSchema {
    /// Parses the `ENRICH_SCHEMA` JSON.
    pub fn parse(text: &str) -> Result<Self, String> {
        let map: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object of fields: {e}"))?;
        if map.is_empty() {
            return Err("has no fields".into());
        }
        let mut fields = Vec::new();
        for (name, spec) in map {
            let spec: FieldSpec =
                serde_json::from_value(spec).map_err(|e| format!("field {name:?}: {e}"))?;
            if name == "id" {
                return Err("field \"id\" is reserved for the record id".into());
            }
            fields.push((name, spec));
        }
        Ok(Self { fields })
    }

    /// Checks one result (without its `id`) and returns only the schema's fields, in the
    /// schema's order.
    pub fn validate(&self, result: &Value) -> Result<Box<RawValue>, String> {
        let raw = serde_json::value::to_raw_value(result)
            .map_err(|e| format!("the result cannot be read: {e}"))?;
        let read = self.read(&raw)?;
        self.validated(&read)
    }

    /// One result of an answer as its `id` and the raw text of each of the schema's fields,
    /// borrowed from the answer: nothing else is parsed or copied. A field given twice counts
    /// as its last value (as a JSON object would keep it). Not an object: an error.
    pub fn read<'a>(&self, result: &'a RawValue) -> Result<ReadResult<'a>, String> {
        let mut de = serde_json::Deserializer::from_str(result.get());
        let read = ResultSeed { schema: self }
            .deserialize(&mut de)
            .and_then(|r| de.end().map(|()| r))
            .map_err(|e| format!("the result cannot be read: {e}"))?;
        read.ok_or_else(|| "the result is not a JSON object".to_string())
    }

    /// Checks a result's fields (from [`Self::read`]) and writes the clean enrichment: the
    /// schema's fields present, in its order, each value as the model wrote it.
    pub fn validated(&self, read: &ReadResult<'_>) -> Result<Box<RawValue>, String> {
        let mut ser = serde_json::Serializer::new(Vec::with_capacity(
            16 + read
                .fields
                .iter()
                .flatten()
                .map(|v| v.get().len() + 16)
                .sum::<usize>(),
        ));
        let mut clean = ser.serialize_map(None).map_err(|e| e.to_string())?;
        for ((name, spec), value) in self.fields.iter().zip(&read.fields) {
            let Some(v) = value.filter(|v| v.get() != "null") else {
                if spec.required {
                    return Err(format!("{name} is missing"));
                }
                continue;
            };
            check(name, spec, v)?;
            clean.serialize_entry(name, v).map_err(|e| e.to_string())?;
        }
        SerializeMap::end(clean).map_err(|e| e.to_string())?;
        let text = String::from_utf8(ser.into_inner()).map_err(|e| e.to_string())?;
        RawValue::from_string(text).map_err(|e| e.to_string())
    }

    /// The JSON Schema of the whole answer, `{"results": [{"id", ...fields}]}`.
    pub fn answer_json_schema(&self) -> Value {
        let mut props = Map::new();
        props.insert("id".into(), json!({"type": "string"}));
        let mut required = vec![json!("id")];
        for (name, spec) in &self.fields {
            let mut p = Map::new();
            p.insert("type".into(), json!(spec.kind));
            if let Some(e) = &spec.one_of {
                p.insert("enum".into(), json!(e));
            }
            if let Some(m) = spec.max_length {
                p.insert("maxLength".into(), json!(m));
            }
            if let Some(d) = &spec.description {
                p.insert("description".into(), json!(d));
            }
            props.insert(name.clone(), Value::Object(p));
            if spec.required {
                required.push(json!(name));
            }
        }
        json!({
            "type": "object",
            "properties": {"results": {"type": "array", "items": {
                "type": "object", "properties": props, "required": required, "additionalProperties": false
            }}},
            "required": ["results"],
            "additionalProperties": false
        })
    }

    /// The fields described for the prompt, one per line.
    pub fn describe(&self) -> String {
        self.fields
            .iter()
            .map(|(name, s)| {
                let mut line = format!(
                    "- \"{name}\": {}",
                    serde_json::to_string(&s.kind)
                        .unwrap_or_default()
                        .trim_matches('"')
                );
                if let Some(e) = &s.one_of {
                    line.push_str(&format!(", one of {}", e.join(" | ")));
                }
                if let Some(w) = s.max_words {
                    line.push_str(&format!(", at most {w} words"));
                }
                if let Some(l) = s.max_length {
                    line.push_str(&format!(", at most {l} characters"));
                }
                if let Some(d) = &s.description {
                    line.push_str(&format!(" ({d})"));
                }
                if !s.required {
                    line.push_str(", optional");
                }
                line
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A result of an answer as [`EnrichmentSchema::read`] found it.
#[derive(Debug, Clone)]
pub struct ReadResult<'a> {
    /// The result's `id` as text (a number as its decimal text); `None` when it has none or
    /// it is neither a string nor a number.
    pub id: Option<String>,
    /// Per schema field, in the schema's order: its raw value, when the result has it.
    pub fields: Vec<Option<&'a RawValue>>,
}

/// Checks one field's raw value against its spec.
fn check(name: &str, spec: &FieldSpec, v: &RawValue) -> Result<(), String> {
    let text = v.get();
    match spec.kind {
        FieldType::String => {
            // A string without escapes is its own text between the quotes; one with escapes
            // is unescaped.
            let owned;
            let s: &str = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                Some(inner) if !inner.contains('\\') => inner,
                _ => {
                    owned = serde_json::from_str::<String>(text)
                        .map_err(|_| format!("{name} is not a string: {text}"))?;
                    &owned
                }
            };
            if let Some(allowed) = &spec.one_of
                && !allowed.iter().any(|a| a == s)
            {
                return Err(format!(
                    "{name}: {s:?} is not one of {}",
                    allowed.join(", ")
                ));
            }
            if let Some(max) = spec.max_words {
                let words = s.split_whitespace().count();
                if words > max {
                    return Err(format!("{name} has {words} words, more than {max}"));
                }
            }
            if let Some(max) = spec.max_length
                && s.chars().count() > max
            {
                return Err(format!("{name} is longer than {max} characters"));
            }
            if s.trim().is_empty() && spec.required {
                return Err(format!("{name} is empty"));
            }
        }
        FieldType::Number => {
            serde_json::from_str::<f64>(text)
                .map_err(|_| format!("{name} is not a number: {text}"))?;
        }
        FieldType::Integer => {
            serde_json::from_str::<i64>(text)
                .map_err(|_| format!("{name} is not an integer: {text}"))?;
        }
        FieldType::Boolean => {
            serde_json::from_str::<bool>(text)
                .map_err(|_| format!("{name} is not a boolean: {text}"))?;
        }
    }
    Ok(())
}

/// Reads one result against the schema: `None` when it is not an object.
struct ResultSeed<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> DeserializeSeed<'de> for ResultSeed<'_> {
    type Value = Option<ReadResult<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ResultSeed<'_> {
    type Value = Option<ReadResult<'de>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a result object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut read = ReadResult {
            id: None,
            fields: vec![None; self.schema.fields.len()],
        };
        while let Some(key) = map.next_key_seed(KeySeed {
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

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// What a result's key names.
enum Key {
    Id,
    Field(usize),
    Other,
}

struct KeySeed<'s> {
    schema: &'s EnrichmentSchema,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
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

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
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

    #[test]
    fn default_schema_accepts_a_good_result_and_drops_extras() {
        let s = EnrichmentSchema::default();
        let v = s.validate(&json!({"id": "1", "sentiment": "neutral", "category": "market", "summary": "Prices were flat.", "extra": 1})).unwrap();
        assert_eq!(
            v.get(),
            r#"{"sentiment":"neutral","category":"market","summary":"Prices were flat."}"#
        );
    }

    #[test]
    fn default_schema_rejects_bad_results_with_reasons() {
        let s = EnrichmentSchema::default();
        let r = |v: Value| s.validate(&v).unwrap_err();
        assert_eq!(
            r(json!({"sentiment": "ecstatic", "category": "x", "summary": "y"})),
            "sentiment: \"ecstatic\" is not one of positive, neutral, negative"
        );
        assert_eq!(
            r(json!({"sentiment": "positive", "summary": "y"})),
            "category is missing"
        );
        assert_eq!(
            r(json!({"sentiment": "positive", "category": 7, "summary": "y"})),
            "category is not a string: 7"
        );
        let long = vec!["word"; 51].join(" ");
        assert_eq!(
            r(json!({"sentiment": "positive", "category": "x", "summary": long})),
            "summary has 51 words, more than 50"
        );
        assert_eq!(r(json!("text")), "the result is not a JSON object");
    }

    #[test]
    fn custom_schemas_parse_and_bad_ones_are_explained() {
        let s = EnrichmentSchema::parse(
            r#"{"priority": {"type": "integer"}, "tags": {"type": "string", "required": false}}"#,
        )
        .unwrap();
        assert!(s.validate(&json!({"priority": 2})).is_ok());
        assert!(s.validate(&json!({"priority": "high"})).is_err());
        assert!(
            EnrichmentSchema::parse("[]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            EnrichmentSchema::parse(r#"{"x": {"type": "date"}}"#)
                .unwrap_err()
                .contains("field \"x\"")
        );
        assert!(
            EnrichmentSchema::parse(r#"{"id": {"type": "string"}}"#)
                .unwrap_err()
                .contains("reserved")
        );
    }

    #[test]
    fn answer_schema_lists_required_fields() {
        let v = EnrichmentSchema::default().answer_json_schema();
        assert_eq!(
            v["properties"]["results"]["items"]["required"],
            json!(["id", "sentiment", "category", "summary"])
        );
    }

    /// The validation as it was when results were `serde_json::Value`s, kept as the
    /// reference the raw reading must agree with.
    fn reference(schema: &EnrichmentSchema, result: Value) -> Result<Value, String> {
        let Value::Object(mut obj) = result else {
            return Err("the result is not a JSON object".to_string());
        };
        let mut clean = Map::new();
        for (name, spec) in &schema.fields {
            let Some((key, v)) = obj.remove_entry(name).filter(|(_, v)| !v.is_null()) else {
                if spec.required {
                    return Err(format!("{name} is missing"));
                }
                continue;
            };
            match spec.kind {
                FieldType::String => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| format!("{name} is not a string: {v}"))?;
                    if let Some(allowed) = &spec.one_of
                        && !allowed.iter().any(|a| a == s)
                    {
                        return Err(format!(
                            "{name}: {s:?} is not one of {}",
                            allowed.join(", ")
                        ));
                    }
                    if let Some(max) = spec.max_words {
                        let words = s.split_whitespace().count();
                        if words > max {
                            return Err(format!("{name} has {words} words, more than {max}"));
                        }
                    }
                    if let Some(max) = spec.max_length
                        && s.chars().count() > max
                    {
                        return Err(format!("{name} is longer than {max} characters"));
                    }
                    if s.trim().is_empty() && spec.required {
                        return Err(format!("{name} is empty"));
                    }
                }
                FieldType::Number => {
                    v.as_f64()
                        .ok_or_else(|| format!("{name} is not a number: {v}"))?;
                }
                FieldType::Integer => {
                    v.as_i64()
                        .ok_or_else(|| format!("{name} is not an integer: {v}"))?;
                }
                FieldType::Boolean => {
                    v.as_bool()
                        .ok_or_else(|| format!("{name} is not a boolean: {v}"))?;
                }
            }
            clean.insert(key, v);
        }
        Ok(Value::Object(clean))
    }

    #[test]
    fn raw_validation_agrees_with_the_value_reference() {
        let s = EnrichmentSchema::parse(
            r#"{"s": {"type": "string", "enum": ["a b", "é"]},
                "w": {"type": "string", "max_words": 2, "max_length": 5},
                "n": {"type": "number"}, "i": {"type": "integer"}, "b": {"type": "boolean"},
                "o": {"type": "string", "required": false}}"#,
        )
        .unwrap();
        let values = [
            json!("a b"),
            json!("é"),
            json!("tab\there"),
            json!("x\"y"),
            json!("one two"),
            json!("one two three"),
            json!("  "),
            json!("abcdef"),
            json!(""),
            json!(null),
            json!(7),
            json!(-7),
            json!(2.5),
            json!(1e300),
            json!(u64::MAX),
            json!(true),
            json!({"k": 1}),
            json!([1, "a"]),
        ];
        let names = [
            ("s", json!("é")),
            ("w", json!("one two")),
            ("n", json!(2.5)),
            ("i", json!(-7)),
            ("b", json!(false)),
            ("o", json!("x")),
        ];
        // A fixed pseudo-random walk through the combinations (and absent fields).
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut agreed = (0, 0);
        for _ in 0..20_000 {
            let mut result = serde_json::Map::new();
            for (name, good) in &names {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                // Mostly a good value, so that whole results pass too.
                let pick = (seed >> 33) as usize % (4 * values.len());
                match values.get(pick) {
                    Some(v) => result.insert(name.to_string(), v.clone()),
                    None if pick.is_multiple_of(31) => None,
                    None => result.insert(name.to_string(), good.clone()),
                };
            }
            result.insert("id".into(), json!("1"));
            let result = Value::Object(result);
            let want = reference(&s, result.clone());
            let got = s
                .validate(&result)
                .map(|raw| serde_json::from_str::<Value>(raw.get()).unwrap());
            assert_eq!(got, want, "{result}");
            if want.is_ok() {
                agreed.0 += 1
            } else {
                agreed.1 += 1
            }
        }
        // Both kinds were seen, many times.
        assert!(agreed.0 > 100 && agreed.1 > 100, "{agreed:?}");
    }
}
