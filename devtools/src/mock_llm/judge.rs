//! The mock's enrichment of one record: deterministic, from the record's text — sentiment
//! from keywords, category from the record's shape, summary from its first words — read
//! from a parsed [`Value`] or, without building one, from the record's JSON text.

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use serde_json::{Value, json};

fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| text_of(x, out)),
        Value::Object(o) => o.values().for_each(|x| text_of(x, out)),
        _ => {}
    }
}

const POSITIVE: [&str; 12] = [
    "love",
    "great",
    "beats",
    "raises",
    "rise",
    "solved",
    "buyback",
    "launches",
    "saves",
    "good",
    "excellent",
    "happy",
];
const NEGATIVE: [&str; 12] = [
    "fail",
    "falls",
    "warning",
    "investigation",
    "confusing",
    "logging me out",
    "error",
    "bad",
    "broken",
    "slow",
    "angry",
    "crash",
];

/// How positive a text is: the positive keywords in it, less the negative ones (each counted
/// once, wherever it is, case ignored as by `str::to_lowercase`). One pass over the text for
/// all of them; an ASCII text is not even copied.
fn score(text: &str) -> i64 {
    static KEYWORDS: OnceLock<AhoCorasick> = OnceLock::new();
    let keywords = KEYWORDS.get_or_init(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(POSITIVE.iter().chain(NEGATIVE.iter()))
            .expect("plain keywords build")
    });
    let lower;
    // Lowercasing other text can make ASCII letters ('K', the Kelvin sign, is 'k').
    let text = if text.is_ascii() {
        text
    } else {
        lower = text.to_lowercase();
        &lower
    };
    let found = keywords
        .find_overlapping_iter(text)
        .fold(0u32, |found, m| found | 1 << m.pattern().as_u32());
    let positive = found & ((1 << POSITIVE.len()) - 1);
    i64::from(positive.count_ones()) - i64::from((found >> POSITIVE.len()).count_ones())
}

/// What the mock answers for one record: its sentiment, category and summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub sentiment: &'static str,
    pub category: String,
    pub summary: String,
}

impl Judgement {
    /// From the record's strings, in document order, each followed by a space; whether its
    /// top level has a `symbol` key; its top-level `event` when that is a string.
    fn of(text: &str, has_symbol: bool, event: Option<&str>) -> Self {
        let sentiment = match score(text) {
            s if s > 0 => "positive",
            s if s < 0 => "negative",
            _ => "neutral",
        };
        let category = if has_symbol {
            "market".to_string()
        } else if let Some(e) = event {
            e.to_string()
        } else {
            "general".to_string()
        };
        let mut summary = String::new();
        for w in text
            .split_whitespace()
            .filter(|w| !w.contains("T") || w.len() < 20)
            .take(12)
        {
            if !summary.is_empty() {
                summary.push(' ');
            }
            summary.push_str(w);
        }
        Self {
            sentiment,
            category,
            summary,
        }
    }

    /// The judgement of a parsed record.
    pub fn of_value(record: &Value) -> Self {
        let mut text = String::new();
        text_of(record, &mut text);
        Self::of(
            &text,
            record.get("symbol").is_some(),
            record.get("event").and_then(Value::as_str),
        )
    }

    /// The judgement of a record's JSON text, read once without building a [`Value`]: the
    /// same as [`Judgement::of_value`] of its parse, but for an object with a key twice: a
    /// parse keeps the last value at the first place, here every value counts where it is.
    /// `None` when `json` is not JSON (as a parse refuses it: a lone surrogate, a number
    /// beyond `f64`, nesting deeper than 128).
    pub fn of_json(json: &str) -> Option<Self> {
        let mut text = String::new();
        let mut de = serde_json::Deserializer::from_str(json);
        let top = serde::de::DeserializeSeed::deserialize(Scan::top(&mut text), &mut de).ok()?;
        de.end().ok()?;
        let event = top.event.map(|r| &text[r]);
        Some(Self::of(&text, top.has_symbol, event))
    }

    fn to_value(&self) -> Value {
        json!({"sentiment": self.sentiment, "category": self.category, "summary": self.summary})
    }
}

/// What [`Scan`] saw of a value: where its text is, when it is a string; at the top level,
/// whether it has a `symbol` key and where its `event` string is.
#[derive(Default)]
struct Seen {
    string: Option<std::ops::Range<usize>>,
    has_symbol: bool,
    event: Option<std::ops::Range<usize>>,
}

/// A visitor that appends every string of a JSON value to `text` (each followed by a space),
/// like [`text_of`], as the parser meets them.
struct Scan<'t> {
    text: &'t mut String,
    top: bool,
}

impl<'t> Scan<'t> {
    fn top(text: &'t mut String) -> Self {
        Self { text, top: true }
    }

    fn inner(text: &mut String) -> Scan<'_> {
        Scan { text, top: false }
    }
}

/// A top-level key: whether it is one of those [`Judgement`] looks at.
enum TopKey {
    Symbol,
    Event,
    Other,
}

impl<'de> serde::Deserialize<'de> for TopKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<TopKey, E> {
                Ok(match k {
                    "symbol" => TopKey::Symbol,
                    "event" => TopKey::Event,
                    _ => TopKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = Seen;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Seen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = Seen;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Seen, E> {
        let start = self.text.len();
        self.text.push_str(s);
        let end = self.text.len();
        self.text.push(' ');
        Ok(Seen {
            string: Some(start..end),
            ..Seen::default()
        })
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Seen, E> {
        Ok(Seen::default())
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Seen, E> {
        Ok(Seen::default())
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Seen, E> {
        Ok(Seen::default())
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Seen, E> {
        Ok(Seen::default())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Seen, E> {
        Ok(Seen::default())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
        while seq.next_element_seed(Scan::inner(self.text))?.is_some() {}
        Ok(Seen::default())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
        let mut seen = Seen::default();
        if !self.top {
            while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
                map.next_value_seed(Scan::inner(self.text))?;
            }
            return Ok(seen);
        }
        while let Some(key) = map.next_key::<TopKey>()? {
            let value = map.next_value_seed(Scan::inner(self.text))?;
            match key {
                TopKey::Symbol => seen.has_symbol = true,
                // The last `event` counts, as in a parsed object.
                TopKey::Event => seen.event = value.string,
                TopKey::Other => {}
            }
        }
        Ok(seen)
    }
}

/// The deterministic enrichment of one record.
pub fn enrich(record: &Value) -> Value {
    Judgement::of_value(record).to_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The score as it was first written: every keyword searched for in the lowercased text.
    fn score_by_search(text: &str) -> i64 {
        let lower = text.to_lowercase();
        POSITIVE.iter().filter(|w| lower.contains(*w)).count() as i64
            - NEGATIVE.iter().filter(|w| lower.contains(*w)).count() as i64
    }

    #[test]
    fn the_score_is_every_keyword_searched_for() {
        let demo = crate::demo_source::Demo::new(
            crate::demo_source::DemoConfig::default(),
            chrono::Utc::now(),
        );
        let mut texts: Vec<String> = (1..200)
            .flat_map(|id| crate::demo_source::Kind::ALL.map(|k| demo.record(k, id).to_string()))
            .collect();
        texts.extend(
            [
                "",
                "GREAT Great great",
                "errors everywhere, erroR",
                "a badge, a sloWLy sinking ship: Crashed",
                "praises the rise",
                "logging me outlogging me out",
                "happyfail",
                "bro\u{212a}en: the Kelvin sign lowercases to k",
                "\u{130}nvestigation with a dotted capital I",
                "ÉLAN läuft 🚀 good and excellent, but slow",
                "Solved? SOLVED. Buyback; launches; saves; beats; raises; love",
            ]
            .map(String::from),
        );
        let mut moved = 0;
        for text in &texts {
            assert_eq!(score(text), score_by_search(text), "{text}");
            moved += usize::from(score(text) != 0);
        }
        assert!(
            moved > 100,
            "the texts hardly exercise the keywords: {moved}"
        );
        assert_eq!(score("broken and bad and broken"), -2);
        assert_eq!(score("\u{212a}"), 0);
        assert_eq!(score("bro\u{212a}en"), -1);
    }

    #[test]
    fn enrichment_follows_the_text() {
        let e = enrich(&json!({"symbol": "ACME", "headline": "ACME beats earnings expectations"}));
        assert_eq!(e["sentiment"], "positive");
        assert_eq!(e["category"], "market");
        let e = enrich(&json!({"event": "support_ticket", "message": "Checkout failed twice"}));
        assert_eq!(e["sentiment"], "negative");
        assert_eq!(e["category"], "support_ticket");
        assert!(e["summary"].as_str().unwrap().split_whitespace().count() <= 12);
    }

    #[test]
    fn a_records_text_is_judged_as_its_parse_is() {
        let demo = crate::demo_source::Demo::new(
            crate::demo_source::DemoConfig::default(),
            chrono::Utc::now(),
        );
        let mut records: Vec<Value> = (1..40)
            .flat_map(|id| crate::demo_source::Kind::ALL.map(|k| demo.record(k, id)))
            .collect();
        records.extend([
            json!({"symbol": null, "note": "Great \"quoted\" news\n", "n": [1, 2.5, -3, true, null]}),
            json!({"event": "signup", "nested": {"event": "inner", "symbol": "X", "deep": [["Crash"]]}}),
            json!({"event": 7, "text": "ÉLAN läuft 🚀 good"}),
            json!({"headline": "2026-01-01T00:00:00.000000Z-and-more-than-twenty bad"}),
            json!(["an", "array", {"event": "not top level"}]),
            json!("a string record: excellent"),
            json!(42),
            json!(null),
            json!({}),
        ]);
        for r in &records {
            let text = r.to_string();
            assert_eq!(
                Judgement::of_json(&text),
                Some(Judgement::of_value(r)),
                "{text}"
            );
            // Whitespace and escapes as another client would send them.
            let pretty = serde_json::to_string_pretty(r).unwrap();
            assert_eq!(
                Judgement::of_json(&pretty),
                Some(Judgement::of_value(r)),
                "{pretty}"
            );
        }
        assert_eq!(
            Judgement::of_json(r#"{"a": "\u00e9t\u00E9 great"}"#)
                .unwrap()
                .sentiment,
            "positive"
        );
        assert_eq!(Judgement::of_json("{"), None);
        assert_eq!(Judgement::of_json(r#"{"a": "\ud800"}"#), None);
        assert_eq!(Judgement::of_json(r#"{"a": 1e400}"#), None);
        assert_eq!(
            Judgement::of_json(&format!("{}{}", "[".repeat(200), "]".repeat(200))),
            None
        );
        let huge = json!({"n": u64::MAX, "f": 1e300, "i": i64::MIN, "s": "good"});
        assert_eq!(
            Judgement::of_json(&huge.to_string()),
            Some(Judgement::of_value(&huge))
        );
        assert_eq!(Judgement::of_json(r#"{"a": 1} trailing"#), None);
    }
}
