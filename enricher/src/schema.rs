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

use serde::ser::{SerializeMap, Serializer as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::result_reader::{ReadResult, read_result};

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
        match read_result(raw.get(), self) {
            Ok(Some(read)) => self.validated(&read),
            Ok(None) => Err("the result is not a JSON object".to_string()),
            Err(e) => Err(format!("the result cannot be read: {e}")),
        }
    }

    /// Checks a result's fields (as [`crate::result_reader`] read them) and writes the clean
    /// enrichment: the schema's fields present, in its order, each value as the model wrote it.
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
                    owned = match serde_json::from_str::<String>(text) {
                        Ok(s) => s,
                        // A string, but one that cannot be decoded (a lone surrogate).
                        Err(e) if text.starts_with('"') => {
                            return Err(format!("{name} cannot be read: {e}"));
                        }
                        Err(_) => return Err(format!("{name} is not a string: {text}")),
                    };
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

    /// A tiny deterministic generator for the text variants.
    struct Walk(u64);

    impl Walk {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as usize % n
        }

        /// Some JSON whitespace, often none.
        fn space(&mut self) -> &'static str {
            [" ", "", "", "\n  ", "\t", "", " \r\n"][self.below(7)]
        }

        /// A string as JSON text, some of its characters written as `\u` escapes (a
        /// surrogate pair beyond the BMP), some escapes as their short forms.
        fn string(&mut self, choices: &[&str]) -> String {
            let s = choices[self.below(choices.len())];
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str(["\\\"", "\\u0022"][self.below(2)]),
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str(["\\t", "\\u0009"][self.below(2)]),
                    '\n' => out.push_str(["\\n", "\\u000A"][self.below(2)]),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c if self.below(3) == 0 => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }

    #[test]
    fn raw_text_as_models_write_it_agrees_with_the_value_reference() {
        let s = EnrichmentSchema::parse(
            r#"{"s": {"type": "string", "enum": ["a b", "é", "x\"y"]},
                "w": {"type": "string", "max_words": 2, "max_length": 5},
                "n": {"type": "number"}, "i": {"type": "integer"}, "b": {"type": "boolean"},
                "o": {"type": "string", "required": false}}"#,
        )
        .unwrap();
        let strings = [
            "a b",
            "é",
            "x\"y",
            "one 😀",
            "tab\there",
            "new\nline",
            "  ",
            "",
            "abcdef",
            "a\\b",
            "\u{1}",
        ];
        let numbers = [
            "7",
            "-7",
            "-0",
            "0",
            "7.0",
            "1E+3",
            "1e3",
            "2.50",
            "25e-1",
            "-0.0",
            "1e300",
            "18446744073709551615",
            "-9223372036854775808",
            "9223372036854775808",
            "0.1e1",
        ];
        let others = [
            "true",
            "false",
            "null",
            "{\"k\": 1}",
            "[1, \"a\"]",
            "[]",
            "{}",
        ];
        let names = ["s", "w", "n", "i", "b", "o"];
        let mut walk = Walk(0x2545_f491_4f6c_dd1d);
        let mut agreed = (0, 0);
        for _ in 0..20_000 {
            let mut text = format!("{{{}", walk.space());
            let id_key = ["\"id\"", "\"\\u0069d\"", "\"i\\u0064\""][walk.below(3)];
            // Each entry's text, and the schema field and value it gives.
            let mut entries = vec![(format!("{id_key}:{}\"1\"", walk.space()), None)];
            for (at, name) in names.into_iter().enumerate() {
                if walk.below(12) == 0 {
                    continue;
                }
                // Each field's value: mostly one the field accepts, else anything.
                let value = |walk: &mut Walk| match (name, walk.below(3)) {
                    ("s", 0 | 1) => walk.string(&["a b", "é", "x\"y"]),
                    ("w", 0 | 1) => walk.string(&["a b", "é", "one 😀", "new\nl"]),
                    ("o", 0 | 1) => walk.string(&strings),
                    ("n", 0 | 1) => numbers[walk.below(numbers.len())].to_string(),
                    ("i", 0 | 1) => {
                        ["7", "-7", "-0", "0", "-9223372036854775808"][walk.below(5)].to_string()
                    }
                    ("b", 0 | 1) => others[walk.below(2)].to_string(),
                    _ => match walk.below(3) {
                        0 => others[walk.below(others.len())].to_string(),
                        1 => numbers[walk.below(numbers.len())].to_string(),
                        _ => walk.string(&strings),
                    },
                };
                // Sometimes given twice (the last counts), sometimes with an escaped key.
                for _ in 0..=usize::from(walk.below(8) == 0) {
                    let key = match walk.below(4) {
                        0 => format!("\"\\u{:04x}\"", name.as_bytes()[0]),
                        _ => format!("\"{name}\""),
                    };
                    let v = value(&mut walk);
                    let entry = format!("{key}{}:{}{v}", walk.space(), walk.space());
                    entries.push((entry, Some((at, v))));
                }
                if walk.below(10) == 0 {
                    entries.push((format!("\"x{name}\": {}", value(&mut walk)), None));
                }
            }
            // The entries in a shuffled order.
            for i in (1..entries.len()).rev() {
                entries.swap(i, walk.below(i + 1));
            }
            let sep = format!(",{}", walk.space());
            let texts: Vec<&str> = entries.iter().map(|(e, _)| e.as_str()).collect();
            text.push_str(&texts.join(&sep));
            // What the clean enrichment must be, if valid: each field's last value as written.
            let mut last: Vec<Option<&str>> = vec![None; names.len()];
            for (at, v) in entries.iter().filter_map(|(_, f)| f.as_ref()) {
                last[*at] = Some(v);
            }
            text.push_str(walk.space());
            text.push('}');

            let want = reference(&s, serde_json::from_str(&text).expect(&text));
            let read = crate::result_reader::read_result(&text, &s)
                .expect(&text)
                .expect(&text);
            assert_eq!(read.id.as_deref(), Some("1"), "{text}");
            let clean = s.validated(&read);
            if let Ok(raw) = &clean {
                let fields: Vec<String> = names
                    .iter()
                    .zip(&last)
                    .filter_map(|(name, v)| {
                        v.as_ref()
                            .filter(|v| **v != "null")
                            .map(|v| format!("\"{name}\":{v}"))
                    })
                    .collect();
                assert_eq!(raw.get(), format!("{{{}}}", fields.join(",")), "{text}");
            }
            let got = clean.map(|raw| serde_json::from_str::<Value>(raw.get()).unwrap());
            // A value that is not of its field's type is shown as written, where the
            // reference shows it as parsed (`1E+3` as `1000.0`): compare the values parsed.
            let shown = |e: &String| match e.find(" is not a") {
                Some(at) => {
                    let colon = at + e[at..].find(": ").expect(e);
                    let value: Value = serde_json::from_str(&e[colon + 2..]).expect(e);
                    (e[..colon].to_string(), Some(value))
                }
                None => (e.clone(), None),
            };
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{text}"),
                (Err(g), Err(w)) => assert_eq!(shown(g), shown(w), "{text}"),
                _ => panic!("{text}: {got:?} but the reference {want:?}"),
            }
            if want.is_ok() {
                agreed.0 += 1
            } else {
                agreed.1 += 1
            }
        }
        assert!(agreed.0 > 100 && agreed.1 > 100, "{agreed:?}");
    }
}
