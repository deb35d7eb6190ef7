//! A record's content key, pure: what "unchanged" means for reusing a stored enrichment.
//!
//! The content of a record is its payload without the fields its source names as not content
//! (`updated_at_field`, `ignore_fields`), with object keys in sorted order, so a source that
//! re-saves a record (a new `updated_at`), touches a volatile field (`view_count`) or writes
//! the same object with its keys in another order yields the same key. The key is a SHA-256
//! over that canonical JSON (128 bits, hex).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The content key of `payload` with the JSON pointers in `ignore` left out; `None` when the
/// payload is not JSON (it then never matches a stored enrichment).
pub fn content_key(payload: &RawValue, ignore: &[String]) -> Option<String> {
    let mut value: Json = match serde_json::from_str(payload.get()) {
        Ok(value) => value,
        // A key that is one of serde_json's private tokens, however escaped ([`Key`] refuses
        // it): its `Value` reads such an object as something else (with `raw_value`: the
        // string's JSON), and the keys were computed through `Value`.
        Err(_) => return via_value(payload.get(), ignore),
    };
    for pointer in ignore {
        remove(&mut value, pointer);
    }
    let mut canonical = Vec::with_capacity(payload.get().len());
    write_canonical(&value, &mut canonical);
    Some(hex::encode(&Sha256::digest(&canonical)[..16]))
}

/// A parsed payload that borrows its strings from the text where it can (those without
/// escapes): the content key reads each record once, and a `serde_json::Value` would copy
/// every key and string and hash every key into a map. Objects keep their members sorted
/// by key (UTF-8 bytes), one per key: the last, as `serde_json` keeps.
#[derive(Debug)]
enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Json::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        // Sorted by key, stably: of a key given twice, the last is kept.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        members.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        Ok(Json::Object(members))
    }
}

/// An object's key, borrowed from the text when it has no escapes. A key that starts with
/// serde_json's private prefix is refused (see [`content_key`]).
struct Key<'a>(Cow<'a, str>);

const PRIVATE: &str = "$serde_json::private::";

impl<'a> Key<'a> {
    fn checked<E: de::Error>(key: Cow<'a, str>) -> Result<Self, E> {
        if key.starts_with(PRIVATE) {
            return Err(E::custom("a key with serde_json's private prefix"));
        }
        Ok(Key(key))
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Key::checked(Cow::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Key::checked(Cow::Owned(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Key::checked(Cow::Owned(s))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Removes what `pointer` (RFC 6901) points at, if it is an object member.
fn remove(value: &mut Json, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = unescape(last);
    let target = if parent.is_empty() {
        Some(value)
    } else {
        pointer_mut(value, parent)
    };
    if let Some(Json::Object(members)) = target {
        members.retain(|(key, _)| *key != last);
    }
}

/// `~1` is `/` and `~0` is `~` in a pointer's token (in that order, as RFC 6901 says).
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// What `pointer` points at, as `serde_json::Value::pointer_mut` finds it: object members by
/// key, array items by an index without leading zeros.
fn pointer_mut<'v, 'a>(value: &'v mut Json<'a>, pointer: &str) -> Option<&'v mut Json<'a>> {
    let tokens = pointer.strip_prefix('/')?;
    tokens.split('/').try_fold(value, |target, token| {
        let token = unescape(token);
        match target {
            Json::Object(members) => members
                .iter_mut()
                .find(|(key, _)| *key == token)
                .map(|(_, v)| v),
            Json::Array(items) => index(&token).and_then(move |i| items.get_mut(i)),
            _ => None,
        }
    })
}

/// An array index in a pointer: digits, no leading zero (but `0` itself), no sign.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

/// JSON with object keys sorted (by their UTF-8 bytes) and no whitespace; numbers and
/// strings as `serde_json` writes them.
fn write_canonical(value: &Json, out: &mut Vec<u8>) {
    // Writing a scalar to a Vec cannot fail; if it ever did, the key would only miss.
    let write = |out: &mut Vec<u8>, r: serde_json::Result<()>| {
        if r.is_err() {
            out.push(0);
        }
    };
    match value {
        Json::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let r = serde_json::to_writer(&mut *out, key.as_ref());
                write(out, r);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Json::Number(n) => {
            let r = serde_json::to_writer(&mut *out, n);
            write(out, r);
        }
        Json::String(s) => {
            let r = serde_json::to_writer(&mut *out, s.as_ref());
            write(out, r);
        }
    }
}

/// The content key through `serde_json::Value`, as it was computed before [`Json`]: for the
/// payloads `Value` reads differently (see [`content_key`]), and the reference of the tests.
fn via_value(payload: &str, ignore: &[String]) -> Option<String> {
    use serde_json::Value;
    fn canonical(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    scalar(&Value::String(key.clone()), out);
                    out.push(b':');
                    canonical(&map[key], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    canonical(item, out);
                }
                out.push(b']');
            }
            value => scalar(value, out),
        }
    }
    fn scalar(value: &Value, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, value).is_err() {
            out.push(0);
        }
    }
    let mut value: Value = serde_json::from_str(payload).ok()?;
    for pointer in ignore {
        let Some((parent, last)) = pointer.rsplit_once('/') else {
            continue;
        };
        let last = unescape(last);
        let target = if parent.is_empty() {
            Some(&mut value)
        } else {
            value.pointer_mut(parent)
        };
        if let Some(Value::Object(map)) = target {
            map.remove(last.as_ref());
        }
    }
    let mut out = Vec::with_capacity(payload.len());
    canonical(&value, &mut out);
    Some(hex::encode(&Sha256::digest(&out)[..16]))
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

    fn reference_key(json: &str, ignore: &[&str]) -> Option<String> {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        via_value(json, &ignore)
    }

    #[test]
    fn the_key_is_the_one_computed_through_serde_json_value() {
        let payloads = [
            r#"{"id":1,"title":"x","updated_at":"2026-11-01T10:00:00Z"}"#,
            r#"{ "b" : 1 , "a" : [ 1 , 2.5 , -3 , 1e5 , -0 , 0.1 , 1.0 , 18446744073709551615 , -9223372036854775808 , 1.5e300 ] }"#,
            r#"{"esc\"aped":"line\nbreak \u00e9 \ud83d\ude00 \/ slash","plain":"é 😀"}"#,
            r#"{"dup":1,"other":true,"dup":2,"dup":{"z":null,"a":false}}"#,
            r#"{"a/b":1,"m~n":2,"x":{"b":1,"a":2,"a/b":3},"list":[{"k":1,"j":2},[3]]}"#,
            r#"{"":"empty key","nested":{"":{"":1}}}"#,
            r#"[1,{"b":2,"a":1},"s",null,true]"#,
            r#""just a string""#,
            "42",
            "null",
            r#"{"id":1,"view_count":3,"stats":{"likes":2,"last_seen":"a"}}"#,
            r#"{"Zed":1,"zed":2,"Äpfel":3,"apple":4,"10":5,"9":6}"#,
            // serde_json's private token, read by its `Value` as the string's JSON.
            r#"{"$serde_json::private::RawValue":"{\"b\":1,\"a\":2}"}"#,
            r#"{"x":{"$serde_json::private::RawValue":"[2,1]"},"y":1}"#,
            r#"{"$serde_json::private::RawValue":"[2,1]","more":1}"#,
            r#"{"\u0024serde_json::private::RawValue":"[2,1]"}"#,
            r#"{"$serde_json::private::Raw\u0056alue":"{\"b\":1}"}"#,
        ];
        let ignores: [&[&str]; 10] = [
            &[],
            &["/updated_at", "/view_count"],
            &["/a~1b", "/m~0n", "/x/a~1b", "/x/b"],
            &[
                "/stats/last_seen",
                "/missing/x",
                "/list/0",
                "/list/0/k",
                "/list/00/k",
                "/list/+0/k",
            ],
            &["/dup", "/dup/z", "/nested//", "/nested/", "/"],
            &["no-slash", "/1", "/a"],
            &["/list/1/0", "/list/2/k"],
            // Not indexes: a leading zero or a sign.
            &["/list/00/k"],
            &["/list/+0/k"],
            &["/list/01/0"],
        ];
        for payload in payloads {
            for ignore in ignores {
                assert_eq!(
                    key(payload, ignore),
                    reference_key(payload, ignore),
                    "{payload} without {ignore:?}"
                );
            }
        }
        assert!(key(payloads[0], &[]).is_some());
    }

    #[test]
    fn a_payload_that_is_not_an_object_still_has_a_key() {
        assert!(key(r#""just a string""#, &["/updated_at"]).is_some());
        assert_ne!(key("[1,2]", &[]), key("[2,1]", &[]));
    }
}
