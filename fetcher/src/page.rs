//! A page body read in one pass (pure): the records array's items as the source wrote them,
//! and the rest of the body — the envelope that pagination reads — as a [`Value`].
//!
//! * **A record is kept as its own JSON text**, only the whitespace between its tokens left
//!   out: no number goes through `f64` (a 30-digit id or amount stays as written, `1.50`
//!   stays `1.50`), no escape is rewritten, keys keep their order. Before, each record was
//!   parsed into a `serde_json::Value` and written back, which rounded such numbers.
//! * **Each record is still decoded once, whole**, without building anything: what a
//!   `serde_json::Value` refuses (a lone surrogate, a number beyond `f64`) fails the page, as
//!   a parse of the whole body did; so does a record nested 128 levels deep, counted from the
//!   record (the parse of the whole body counted from the page). The values at the record's id and
//!   `updated_at` pointers are read in that same pass, with `Value::pointer`'s rules (a key
//!   twice: the last counts; `~0`/`~1` escapes; array indexes without sign or leading zero).
//! * **The envelope** is the body with the records array replaced by `null`. When a
//!   pagination pointer leads into the records (a cursor read from the last record), the
//!   envelope is the whole body instead ([`read`]'s `whole_envelope`).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON pointer's reference tokens; `None` for a text that is not a pointer (it finds
/// nothing, as `Value::pointer` finds nothing).
pub fn tokens(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

/// The array index a token names, as `Value::pointer` reads it.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// One record of a page: its text, and the values found at the id and `updated_at` pointers.
#[derive(Debug)]
pub struct RawRecord {
    pub payload: Box<RawValue>,
    /// Whether the record is a JSON object.
    pub is_object: bool,
    pub id: Option<Value>,
    pub updated_at: Option<Value>,
}

/// A page body read by [`read`].
#[derive(Debug)]
pub struct PageBody {
    /// The body without its records (`null` in their place), or the whole body.
    pub envelope: Value,
    /// The records, when the records pointer leads to an array.
    pub records: Option<Vec<RawRecord>>,
}

/// Where to look: the records array and, in each record, the id and `updated_at`.
#[derive(Debug, Clone)]
pub struct Pointers {
    records: Option<Vec<String>>,
    id: Option<Vec<String>>,
    updated_at: Option<Vec<String>>,
}

impl Pointers {
    /// `records` is `""` or `"/"` for a body that is the array itself.
    pub fn new(records: &str, id: &str, updated_at: Option<&str>) -> Self {
        Self {
            records: tokens(if records == "/" { "" } else { records }),
            id: tokens(id),
            updated_at: updated_at.and_then(tokens),
        }
    }

    /// Whether `pointer` leads to the records array or into one of its items: what the
    /// envelope without its records would not answer as the whole body does.
    pub fn is_under_records(&self, pointer: &str) -> bool {
        match (&self.records, tokens(pointer)) {
            (Some(records), Some(p)) => {
                p.starts_with(records) && p.get(records.len()).is_none_or(|t| index(t).is_some())
            }
            _ => false,
        }
    }
}

/// Why a page body cannot be read: it, or one of its records, is not JSON.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Body(#[from] serde_json::Error),
    #[error("record #{index}: {error}")]
    Record {
        index: usize,
        error: serde_json::Error,
    },
}

/// Reads `body`.
pub fn read(body: &[u8], pointers: &Pointers, whole_envelope: bool) -> Result<PageBody, ReadError> {
    let mut found: Option<Vec<&RawValue>> = None;
    let envelope = match &pointers.records {
        Some(path) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let envelope = Envelope {
                path,
                found: &mut found,
            }
            .deserialize(&mut de)?;
            de.end()?;
            if whole_envelope {
                serde_json::from_slice(body)?
            } else {
                envelope
            }
        }
        None => serde_json::from_slice(body)?,
    };
    let records = found
        .map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(index, raw)| {
                    record(raw, pointers).map_err(|error| ReadError::Record { index, error })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(PageBody { envelope, records })
}

/// One record: decoded whole (see the module doc), its pointers' values, its text compacted.
fn record(raw: &RawValue, pointers: &Pointers) -> Result<RawRecord, serde_json::Error> {
    let text = raw.get();
    let mut slots: [Option<Value>; 2] = [None, None];
    let wanted: Vec<(&[String], usize)> = [&pointers.id, &pointers.updated_at]
        .into_iter()
        .enumerate()
        .filter_map(|(slot, p)| p.as_deref().map(|p| (p, slot)))
        .collect();
    let mut de = serde_json::Deserializer::from_str(text);
    Capture {
        wanted,
        slots: &mut slots,
    }
    .deserialize(&mut de)?;
    de.end()?;
    let payload = match compact(text) {
        Cow::Borrowed(_) => raw.to_owned(),
        Cow::Owned(text) => RawValue::from_string(text)?,
    };
    let [id, updated_at] = slots;
    Ok(RawRecord {
        payload,
        is_object: text.starts_with('{'),
        id,
        updated_at,
    })
}

/// `text` (valid JSON) without the whitespace between its tokens.
pub fn compact(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    let mut out: Option<Vec<u8>> = None;
    for (i, &b) in bytes.iter().enumerate() {
        let keep = if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            true
        } else if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            false
        } else {
            in_string = b == b'"';
            true
        };
        match (&mut out, keep) {
            (Some(out), true) => out.push(b),
            (None, false) => out = Some(bytes[..i].to_vec()),
            _ => {}
        }
    }
    match out {
        None => Cow::Borrowed(text),
        // Only ASCII bytes outside strings were left out: still UTF-8.
        Some(out) => Cow::Owned(
            String::from_utf8(out)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
    }
}

/// The envelope of a body: everything as a [`Value`], but the array at `path`, whose items
/// go to `found` as text (the last one counts when a key is there twice).
struct Envelope<'p, 'f, 'de> {
    path: &'p [String],
    found: &'f mut Option<Vec<&'de RawValue>>,
}

impl<'de> DeserializeSeed<'de> for Envelope<'_, '_, 'de> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.path.is_empty() {
            *self.found = None;
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Envelope<'_, '_, 'de> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                items.push(item);
            }
            *self.found = Some(items);
            return Ok(Value::Null);
        };
        let at = index(first);
        let mut out = Vec::new();
        while let Some(v) = if at == Some(out.len()) {
            seq.next_element_seed(Envelope {
                path: rest,
                found: &mut *self.found,
            })?
        } else {
            seq.next_element::<Value>()?
        } {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = match self.path.split_first() {
                Some((first, rest)) if *first == key => {
                    // A key twice: its last value counts, records or not.
                    *self.found = None;
                    map.next_value_seed(Envelope {
                        path: rest,
                        found: &mut *self.found,
                    })?
                }
                _ => map.next_value::<Value>()?,
            };
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// The scalar visits of a visitor that builds nothing: a scalar is read (a string unescaped,
/// a number parsed) and kept nowhere.
macro_rules! scalars_are_read {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
    };
}

/// A record decoded whole, building nothing but the values at the `wanted` pointers (each
/// its remaining tokens and the slot it goes to).
struct Capture<'w, 's> {
    wanted: Vec<(&'w [String], usize)>,
    slots: &'s mut [Option<Value>; 2],
}

impl<'de> DeserializeSeed<'de> for Capture<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // A value a pointer ends at: read it whole (what it points into, too).
        if self.wanted.iter().any(|(path, _)| path.is_empty()) {
            let value = Value::deserialize(d)?;
            for (path, slot) in self.wanted {
                let pointer: String = path.iter().map(|t| format!("/{}", escape(t))).collect();
                self.slots[slot] = value.pointer(&pointer).cloned();
            }
            return Ok(());
        }
        if self.wanted.is_empty() {
            return d.deserialize_any(Decode);
        }
        d.deserialize_any(self)
    }
}

/// A token written back into a pointer.
fn escape(token: &str) -> Cow<'_, str> {
    if token.contains(['~', '/']) {
        Cow::Owned(token.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(token)
    }
}

impl<'w> Capture<'w, '_> {
    /// The wanted pointers that go on through `step` (a key, or an index), reset: a key
    /// written twice counts with its last value.
    fn through(&mut self, step: impl Fn(&str) -> bool) -> Vec<(&'w [String], usize)> {
        let mut on = Vec::new();
        for &(path, slot) in &self.wanted {
            if let Some((first, rest)) = path.split_first()
                && step(first)
            {
                self.slots[slot] = None;
                on.push((rest, slot));
            }
        }
        on
    }
}

impl<'de> Visitor<'de> for Capture<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let wanted = self.through(|t| index(t) == Some(i));
            let more = seq
                .next_element_seed(Capture {
                    wanted,
                    slots: &mut *self.slots,
                })?
                .is_some();
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            let wanted = self.through(|t| t == key);
            map.next_value_seed(Capture {
                wanted,
                slots: &mut *self.slots,
            })?;
        }
        Ok(())
    }

    scalars_are_read!();
}

/// An object's key, borrowed from the text unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, k: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(k)))
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(k.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Decodes a value whole and keeps nothing (every string unescaped, every number read):
/// what `serde::de::IgnoredAny` does not check.
struct Decode;

impl<'de> DeserializeSeed<'de> for Decode {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Decode {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Decode)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Decode)?.is_some() {
            map.next_value_seed(Decode)?;
        }
        Ok(())
    }
    scalars_are_read!();
}

#[cfg(test)]
#[path = "page_tests.rs"]
mod tests;
