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

use serde::{Deserialize, Serialize};
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

    /// Checks one result (without its `id`) and returns only the schema's fields.
    pub fn validate(&self, result: &Value) -> Result<Value, String> {
        self.validate_owned(result.clone())
    }

    /// [`Self::validate`], taking the result: its fields are moved, not copied, into the
    /// clean one (in the schema's order).
    pub fn validate_owned(&self, result: Value) -> Result<Value, String> {
        let Value::Object(mut obj) = result else {
            return Err("the result is not a JSON object".to_string());
        };
        let mut clean = Map::new();
        for (name, spec) in &self.fields {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schema_accepts_a_good_result_and_drops_extras() {
        let s = EnrichmentSchema::default();
        let v = s.validate(&json!({"id": "1", "sentiment": "neutral", "category": "market", "summary": "Prices were flat.", "extra": 1})).unwrap();
        assert_eq!(
            v,
            json!({"sentiment": "neutral", "category": "market", "summary": "Prices were flat."})
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
}
