//! [`super`]'s tests: a page read against its parse into a `Value` (the reference).

use super::*;

/// What a page gave when it was parsed into a `Value` (the reference): the body, and per
/// record the values at the id and `updated_at` pointers and the record itself.
type Parsed = (Value, Option<Vec<(Option<Value>, Option<Value>, Value)>>);

fn by_value(body: &str, records: &str, id: &str, updated_at: Option<&str>) -> Parsed {
    let body: Value = serde_json::from_str(body).unwrap();
    let at = if records == "/" { "" } else { records };
    let items = body.pointer(at).and_then(Value::as_array).map(|items| {
        items
            .iter()
            .map(|r| {
                (
                    r.pointer(id).cloned(),
                    updated_at.and_then(|p| r.pointer(p)).cloned(),
                    r.clone(),
                )
            })
            .collect()
    });
    (body, items)
}

fn by_page(body: &str, records: &str, id: &str, updated_at: Option<&str>) -> Parsed {
    let pointers = Pointers::new(records, id, updated_at);
    let page = read(body.as_bytes(), &pointers, false).unwrap();
    let items = page.records.map(|items| {
        items
            .into_iter()
            .map(|r| {
                assert_eq!(r.is_object, r.payload.get().starts_with('{'));
                let parsed: Value = serde_json::from_str(r.payload.get()).unwrap();
                (r.id, r.updated_at, parsed)
            })
            .collect()
    });
    (page.envelope, items)
}

/// Bodies of every shape the pointers meet, read both ways.
#[test]
fn a_page_reads_as_its_parse_does() {
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        (
            r#"{"data": [{"id": 7, "updated_at": "2026-11-01T10:00:00Z", "p": 1.5}, {"id": "x"}], "pagination": {"total_pages": 2}}"#,
            "/data",
            "/id",
            Some("/updated_at"),
        ),
        // A bare array; records that are not objects; ids of every type.
        (
            r#"[{"id": 1}, 3, "s", null, [1], {"id": null}, {"id": 1.0}, {"id": 1e2}, {"id": -0}, {"id": {"n": 1}}]"#,
            "/",
            "/id",
            None,
        ),
        // Nested pointers, escapes in keys and pointers, array indexes.
        (
            r#"{"r": {"a/b": [{"m~n": {"k": [5, {"t": "2026-11-01T10:00:00Z"}]}, "u\u0069d": "esc"}]}}"#,
            "/r/a~1b",
            "/m~0n/k/0",
            Some("/m~0n/k/1/t"),
        ),
        (
            r#"{"pages": [{"items": [{"id": 1}]}, {"items": [{"id": 2}]}]}"#,
            "/pages/1/items",
            "/uid",
            None,
        ),
        // A key written with escapes, found by the pointer that names it plainly.
        (
            r#"{"data": [{"u\u0069d": 5, "\u0074": "2026-11-01T10:00:00Z"}, {"uid": "x", "u\u0069d": 6}]}"#,
            "/data",
            "/uid",
            Some("/t"),
        ),
        // Not an index: a sign, a leading zero.
        (
            r#"{"pages": [[{"id": 1}], [{"id": 2}]]}"#,
            "/pages/01",
            "/id",
            None,
        ),
        (
            r#"{"pages": [[{"id": 1}], [{"id": 2}]]}"#,
            "/pages/+1",
            "/id",
            None,
        ),
        // A key twice: the last counts, at the records, on the way to them, in a record.
        (
            r#"{"data": [{"id": 1}], "data": [{"id": 2, "id": 3, "t": {"a": 1}, "t": {"b": 2}}]}"#,
            "/data",
            "/id",
            Some("/t/a"),
        ),
        (r#"{"data": [{"id": 1}], "data": 5}"#, "/data", "/id", None),
        (
            r#"{"a": {"data": [{"id": 1}]}, "a": {"x": 1}}"#,
            "/a/data",
            "/id",
            None,
        ),
        // No records where the pointer leads; a pointer that is not one.
        (r#"{"items": []}"#, "/data", "/id", None),
        (r#"{"data": {"id": 1}}"#, "/data", "/id", None),
        (r#"{"data": [{"id": 1}]}"#, "data", "/id", None),
        (
            r#"{"data": [{"id": 1}]}"#,
            "/data",
            "id",
            Some("updated_at"),
        ),
        (r#"{"data": [{"": 1}]}"#, "/data", "/", None),
        (r#"{"data": [{"id": 1}]}"#, "/data", "", None),
    ];
    for (body, records, id, updated_at) in cases {
        let (value, expected) = by_value(body, records, id, *updated_at);
        let (lean, got) = by_page(body, records, id, *updated_at);
        assert_eq!(got, expected, "{body} at {records}");
        // The envelope is the body but for the records array itself; the whole one on demand.
        let pointers = Pointers::new(records, id, *updated_at);
        let whole = read(body.as_bytes(), &pointers, true).unwrap();
        assert_eq!(whole.envelope, value, "{body}: the whole envelope");
        let mut without = value.clone();
        let at = if *records == "/" { "" } else { records };
        if expected.is_some()
            && let Some(r) = without.pointer_mut(at)
        {
            *r = Value::Null;
        }
        assert_eq!(lean, without, "{body} at {records}");
    }
}

#[test]
fn a_record_is_kept_as_written_without_whitespace() {
    let body = "[ {\n  \"id\" : 123456789012345678901234567890 ,\n\t\"a\": 1.50, \"b\": 1E+3,\r\n  \"s\": \"two  spaces \\\" \\\\\", \"e\": \"caf\\u00e9\\/\" } , {\"id\":1} ]";
    let pointers = Pointers::new("/", "/id", None);
    let records = read(body.as_bytes(), &pointers, false)
        .unwrap()
        .records
        .unwrap();
    assert_eq!(
        records[0].payload.get(),
        r#"{"id":123456789012345678901234567890,"a":1.50,"b":1E+3,"s":"two  spaces \" \\","e":"caf\u00e9\/"}"#
    );
    assert_eq!(records[1].payload.get(), r#"{"id":1}"#);
    assert_eq!(compact(r#"{"a":"\\"}"#), Cow::Borrowed(r#"{"a":"\\"}"#));
    assert_eq!(compact(r#"{"a" :"\\" }"#), r#"{"a":"\\"}"#);
    assert_eq!(compact("\"é\" "), "\"é\"");
}

/// Content keys are those of the records as the fetcher used to write them (through a
/// `Value`), so stored enrichments are still found after the upgrade.
#[test]
fn content_keys_are_those_of_the_records_written_through_a_value() {
    let body = r#"[
        {"id": 1, "big": 123456789012345678901234567890, "a": 1.50, "b": 1E+3, "c": -0.0},
        {"id": 2, "s": "caf\u00e9 \/ \" \\ \ud83d\ude00", "k": {"z": 1, "a": [1, 2.0e0]}},
        {"id": 3, "dup": 1, "dup": 2, "updated_at": "2026-11-01T10:00:00Z", "n": null},
        { "id" : 4 ,
          "pretty" : [ true , false ] }
    ]"#;
    let pointers = Pointers::new("/", "/id", None);
    let records = read(body.as_bytes(), &pointers, false)
        .unwrap()
        .records
        .unwrap();
    let before: Vec<Value> = serde_json::from_str(body).unwrap();
    let ignore = ["/updated_at".to_string(), "/k/z".to_string()];
    for (r, v) in records.iter().zip(&before) {
        let rewritten = serde_json::value::to_raw_value(v).unwrap();
        assert_ne!(r.payload.get(), "", "{v}");
        assert_eq!(
            crate::content::content_key(&r.payload, &ignore),
            crate::content::content_key(&rewritten, &ignore),
            "{}",
            r.payload.get()
        );
    }
    // Only the records whose text a `Value` rewrites have a new text.
    let same: Vec<bool> = records
        .iter()
        .zip(&before)
        .map(|(r, v)| r.payload.get() == serde_json::value::to_raw_value(v).unwrap().get())
        .collect();
    assert_eq!(same, [false, false, false, true]);
}

#[test]
fn what_a_value_refuses_fails_the_page_naming_the_record() {
    let pointers = Pointers::new("/data", "/id", None);
    for (record, why) in [
        (r#"{"id": 2, "s": "\ud800 alone"}"#, "escape"),
        (r#"{"id": 2, "\udc00": 1}"#, "surrogate"),
        (r#"{"id": 2, "n": 1e400}"#, "out of range"),
        (r#"{"id": 2, "n": [-1e999]}"#, "out of range"),
    ] {
        let body = format!(r#"{{"data": [{{"id": 1}}, {record}]}}"#);
        let error = read(body.as_bytes(), &pointers, false).unwrap_err();
        assert!(
            matches!(error, ReadError::Record { index: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains(why), "{record}: {error}");
    }
    // Nesting counts from the record (a `Value` of the page counted from the page: a record
    // at 127 levels inside `data` was refused there, and is read now).
    for (levels, ok) in [(126, true), (127, false)] {
        let body = format!(
            r#"{{"data": [{{"id": 1, "d": {}1{}}}]}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        assert_eq!(
            read(body.as_bytes(), &pointers, false).is_ok(),
            ok,
            "{levels}"
        );
    }
    let deep = format!(
        r#"{{"data": [{{"id": 1, "d": {}1{}}}]}}"#,
        "[".repeat(130),
        "]".repeat(130)
    );
    assert!(read(deep.as_bytes(), &pointers, false).is_err());
    for body in [
        r#"{"data": [{"id": 1}]"#,
        r#"{"data": [{"id": 1}]} x"#,
        r#"{"data": [{"id": 1},]}"#,
    ] {
        assert!(
            matches!(
                read(body.as_bytes(), &pointers, false),
                Err(ReadError::Body(_))
            ),
            "{body}"
        );
    }
    // Outside the records, what a `Value` refuses fails the body, as it did.
    let body = r#"{"data": [{"id": 1}], "meta": "\ud800"}"#;
    assert!(matches!(
        read(body.as_bytes(), &pointers, false),
        Err(ReadError::Body(_))
    ));
}

#[test]
fn a_pagination_pointer_into_the_records_keeps_them_in_the_envelope() {
    let pointers = Pointers::new("/data", "/id", None);
    assert!(pointers.is_under_records("/data/1/id"));
    assert!(pointers.is_under_records("/data"));
    assert!(!pointers.is_under_records("/data2"));
    assert!(!pointers.is_under_records("/meta/next"));
    assert!(!pointers.is_under_records("/data/x"));
    let root = Pointers::new("/", "/id", None);
    assert!(!root.is_under_records("/pagination/total_pages"));
    assert!(root.is_under_records("/0/id"));
}
