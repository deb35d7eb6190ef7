//! A record's content key, pure: what "unchanged" means for reusing a stored enrichment.
//!
//! The content of a record is its payload without the fields its source names as not content
//! (`updated_at_field`, `ignore_fields`), with object keys in sorted order, so a source that
//! re-saves a record (a new `updated_at`), touches a volatile field (`view_count`) or writes
//! the same object with its keys in another order yields the same key. The key is a SHA-256
//! over that canonical JSON (128 bits, hex).

use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The content key of `payload` with the JSON pointers in `ignore` left out; `None` when the
/// payload is not JSON (it then never matches a stored enrichment).
pub fn content_key(payload: &RawValue, ignore: &[String]) -> Option<String> {
    let mut value: Value = serde_json::from_str(payload.get()).ok()?;
    for pointer in ignore {
        remove(&mut value, pointer);
    }
    let mut canonical = Vec::with_capacity(payload.get().len());
    write_canonical(&value, &mut canonical);
    Some(hex::encode(&Sha256::digest(&canonical)[..16]))
}

/// Removes what `pointer` (RFC 6901) points at, if it is an object member.
fn remove(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    let target = if parent.is_empty() {
        Some(value)
    } else {
        value.pointer_mut(parent)
    };
    if let Some(Value::Object(map)) = target {
        map.remove(&last);
    }
}

/// JSON with object keys sorted (by their UTF-8 bytes) and no whitespace; numbers and
/// strings as `serde_json` writes them.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar `Value` to a Vec cannot fail; if it ever did, the key would only miss.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(json: &str, ignore: &[&str]) -> Option<String> {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        content_key(&RawValue::from_string(json.into()).unwrap(), &ignore)
    }

    #[test]
    fn a_new_updated_at_or_key_order_is_the_same_content() {
        let a = key(
            r#"{"id":1,"title":"x","updated_at":"2026-11-01T10:00:00Z"}"#,
            &["/updated_at"],
        );
        let b = key(
            r#"{"updated_at":"2026-12-01T10:00:00Z", "title":"x","id":1}"#,
            &["/updated_at"],
        );
        assert!(a.is_some());
        assert_eq!(a, b);
    }

    #[test]
    fn any_other_change_is_new_content() {
        let base = key(r#"{"id":1,"title":"x","n":1}"#, &[]);
        for changed in [
            r#"{"id":1,"title":"y","n":1}"#,
            r#"{"id":1,"title":"x","n":1.5}"#,
            r#"{"id":1,"title":"x","n":"1"}"#,
            r#"{"id":1,"title":"x"}"#,
            r#"{"id":1,"title":"x","n":1,"extra":null}"#,
            r#"{"id":1,"title":"x","n":[1]}"#,
        ] {
            assert_ne!(key(changed, &[]), base, "{changed}");
        }
    }

    #[test]
    fn ignored_fields_top_level_or_nested_do_not_count() {
        let ignore = ["/view_count", "/stats/last_seen"];
        let a = key(
            r#"{"id":1,"view_count":3,"stats":{"likes":2,"last_seen":"a"}}"#,
            &ignore,
        );
        let b = key(
            r#"{"id":1,"view_count":99,"stats":{"last_seen":"b","likes":2}}"#,
            &ignore,
        );
        let c = key(
            r#"{"id":1,"view_count":99,"stats":{"last_seen":"b","likes":3}}"#,
            &ignore,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        // A pointer to something that is not there, or not in an object, changes nothing.
        assert_eq!(
            key(r#"{"id":1,"list":[1,2]}"#, &["/missing/x", "/list/0"]),
            key(r#"{"id":1,"list":[1,2]}"#, &[])
        );
    }

    #[test]
    fn escaped_pointers_and_nested_key_order() {
        assert_eq!(
            key(r#"{"a/b":1,"x":{"b":1,"a":2}}"#, &["/a~1b"]),
            key(r#"{"x":{"a":2,"b":1}}"#, &[])
        );
    }

    #[test]
    fn a_payload_that_is_not_an_object_still_has_a_key() {
        assert!(key(r#""just a string""#, &["/updated_at"]).is_some());
        assert_ne!(key("[1,2]", &[]), key("[2,1]", &[]));
    }
}
