//! Configuration: the legacy ConfigMap parses unchanged; every bad input gets a message that
//! names the key, says what is wrong and shows a valid example; secrets never print.

use std::time::Duration;

use fetcher::sources::{AuthType, ScheduleSpec};
use tardis_common::config::ConfigError;

use super::support::{LEGACY_SECRETS, env_of, legacy_env};

fn fetcher_errors(pairs: &[(&str, &str)]) -> ConfigError {
    let mut env = legacy_env();
    env.extend(env_of(pairs));
    fetcher::Config::from_env(&env).expect_err("configuration should be rejected")
}

fn assert_has(err: &ConfigError, expected: &str) {
    let text = err.to_string();
    assert!(text.contains(expected), "expected {expected:?} in:\n{text}");
}

#[test]
fn legacy_fixture_yields_two_sources_with_schedules_and_auth_types() {
    let env = legacy_env();
    let config = fetcher::Config::from_env(&env).expect("legacy ConfigMap is valid");
    let s = &config.sources;
    assert_eq!(s.chunk_size, 1000);
    assert_eq!(s.max_retries, 3);
    assert_eq!(s.retry_delay, Duration::from_secs(30));
    assert_eq!(s.collection_interval, Duration::from_secs(3600));
    let summary: Vec<(String, AuthType, String, String)> = s
        .sources
        .iter()
        .map(|src| {
            let ScheduleSpec::Cron {
                expression,
                timezone,
                ..
            } = &src.schedule
            else {
                panic!("{} has no cron schedule", src.name)
            };
            (
                src.name.clone(),
                src.auth_type,
                expression.clone(),
                timezone.to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "market_data".into(),
                AuthType::Bearer,
                "*/15 * * * *".into(),
                "UTC".into()
            ),
            (
                "user_events".into(),
                AuthType::ApiKey,
                "*/5 * * * *".into(),
                "UTC".into()
            ),
        ]
    );
    let market = &s.sources[0];
    assert_eq!(
        market.url.as_str(),
        "https://api.example.com/v2/market/quotes"
    );
    assert_eq!(market.credential_env, "DATA_API_KEY");
    assert_eq!(
        market.credential.as_ref().map(|c| c.expose().as_str()),
        Some("your-data-source-api-key")
    );
    assert_eq!(market.page_size, 1000, "page size defaults to CHUNK_SIZE");
    assert_eq!(market.records_pointer, "/data");
    assert_eq!(s.sources[1].api_key_header, "X-API-Key");

    let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:07:30Z")
        .unwrap()
        .to_utc();
    assert_eq!(
        market.schedule.next_after(t0).unwrap().to_rfc3339(),
        "2026-11-22T10:15:00+00:00"
    );

    let enricher =
        enricher::Config::from_env(&env).expect("legacy ConfigMap is valid for the enricher");
    assert_eq!(
        enricher.llm.endpoint.as_str(),
        "https://api.holysheep.ai/v1/chat/completions"
    );
    assert_eq!(
        enricher.llm.api_key.as_ref().map(|k| k.expose().as_str()),
        Some("YOUR_HOLYSHEEP_API_KEY")
    );
    assert_eq!(enricher.llm.model, "deepseek-v3.2");

    let writer = writer::Config::from_env(&env).expect("legacy ConfigMap is valid for the writer");
    assert_eq!(
        writer.postgres.pg_config().get_password(),
        Some(&b"secure-password-here"[..])
    );
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let env = legacy_env();
    let printed = [
        format!("{:?}", fetcher::Config::from_env(&env).unwrap()),
        format!("{:#?}", enricher::Config::from_env(&env).unwrap()),
        format!("{:?}", writer::Config::from_env(&env).unwrap()),
    ];
    for text in &printed {
        for secret in LEGACY_SECRETS {
            assert!(!text.contains(secret), "{secret:?} printed in {text}");
        }
        assert!(text.contains("***"), "secrets should show as ***: {text}");
    }
}

#[test]
fn bad_json_reports_line_and_column() {
    let err = fetcher_errors(&[("DATA_SOURCES", "[\n  {\"name\": \"a\",\n   \"url\": }\n]")]);
    assert_has(
        &err,
        "DATA_SOURCES: is not valid JSON: expected value at line 3 column 11",
    );
    assert_has(
        &err,
        "fix the JSON, for example DATA_SOURCES='[{\"name\":\"market_data\"",
    );
}

#[test]
fn unknown_auth_type_lists_the_valid_ones() {
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","auth_type":"oauth2"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].auth_type: source \"a\": unknown auth_type \"oauth2\"; use one of bearer, api_key, api_key_query, basic, none",
    );
}

#[test]
fn bad_cron_expression_is_named_with_an_example() {
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","schedule":"*/15 * *"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].schedule: source \"a\": invalid cron expression \"*/15 * *\"",
    );
    assert_has(&err, "for example \"schedule\": \"*/15 * * * *\"");
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","schedule":"99 * * * *"}]"#,
    )]);
    assert_has(&err, "invalid cron expression \"99 * * * *\"");
}

#[test]
fn bad_urls_are_rejected() {
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"api.example.com/quotes"},{"name":"b","url":"ftp://files.example.com/x"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].url: source \"a\": url is not a valid URL (relative URL without a base)",
    );
    assert_has(
        &err,
        "DATA_SOURCES[1].url: source \"b\": url must be an http or https URL, got scheme \"ftp\"",
    );
    assert_has(
        &err,
        "for example \"url\": \"https://api.example.com/v2/market/quotes\"",
    );
    let err = enricher::Config::from_env(&env_of(&[("PROCESSOR_ENDPOINT", "localhost:8080/v1")]))
        .unwrap_err();
    assert_has(&err, "PROCESSOR_ENDPOINT: must be an http or https URL");
    assert_has(
        &err,
        "for example PROCESSOR_ENDPOINT=https://api.holysheep.ai/v1/chat/completions",
    );
}

#[test]
fn zero_and_negative_numbers_are_rejected_all_at_once() {
    let err = fetcher_errors(&[
        ("CHUNK_SIZE", "0"),
        ("MAX_RETRIES", "-1"),
        ("RETRY_DELAY", "0"),
        ("COLLECTION_INTERVAL", "-5"),
    ]);
    assert_eq!(err.problems.len(), 4, "{err}");
    assert_has(
        &err,
        "CHUNK_SIZE: must be a positive integer, got 0; for example CHUNK_SIZE=1000",
    );
    assert_has(
        &err,
        "MAX_RETRIES: must be a non-negative integer, got -1; for example MAX_RETRIES=3",
    );
    assert_has(&err, "RETRY_DELAY: must be a positive duration, got \"0\"");
    assert_has(
        &err,
        "COLLECTION_INTERVAL: must be a positive duration, got \"-5\"",
    );
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","page_size":0,"rate_limit":-2,"timeout":"0s"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].page_size: source \"a\": page_size must be a positive integer, got 0",
    );
    assert_has(
        &err,
        "DATA_SOURCES[0].rate_limit: source \"a\": rate_limit must be a positive number",
    );
    assert_has(
        &err,
        "DATA_SOURCES[0].timeout: source \"a\": timeout must be a positive duration",
    );
}

#[test]
fn duplicate_source_names_are_rejected() {
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"quotes","url":"https://x.example/a"},{"name":"quotes","url":"https://x.example/b"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[1].name: duplicate source name \"quotes\"; give every source a unique name",
    );
}

#[test]
fn ignore_fields_are_pointers_beside_updated_at_and_an_empty_one_is_named() {
    let mut env = legacy_env();
    env.insert(
        "DATA_SOURCES".into(),
        r#"[{"name":"a","url":"https://x.example/a","ignore_fields":["view_count","/stats/last_seen","view_count"]},
            {"name":"b","url":"https://x.example/b","updated_at_field":null}]"#
            .into(),
    );
    let config = fetcher::Config::from_env(&env).expect("valid");
    assert_eq!(
        config.sources.sources[0].content_ignore,
        ["/updated_at", "/view_count", "/stats/last_seen"]
    );
    assert!(config.sources.sources[1].content_ignore.is_empty());
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","ignore_fields":[" "]}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].ignore_fields: source \"a\": ignore_fields holds an empty field name; list field names or JSON pointers",
    );
}

#[test]
fn missing_credentials_and_unknown_fields_are_named() {
    let mut env = legacy_env();
    env.remove("DATA_API_KEY");
    let err = fetcher::Config::from_env(&env).unwrap_err();
    assert_has(
        &err,
        "DATA_API_KEY: is not set, but source \"market_data\" uses auth_type bearer",
    );
    assert_has(
        &err,
        "DATA_API_KEY: is not set, but source \"user_events\" uses auth_type api_key",
    );
    let err = fetcher_errors(&[(
        "DATA_SOURCES",
        r#"[{"name":"a","url":"https://x.example/a","shedule":"* * * * *"}]"#,
    )]);
    assert_has(
        &err,
        "DATA_SOURCES[0].shedule (a): unknown field `shedule`, expected one of `name`, `url`",
    );
}

#[test]
fn common_keys_are_validated_too() {
    let err = writer::Config::from_env(&env_of(&[
        ("NATS_URL", "nats://ok:4222,nats://bad host:4222"),
        ("OPS_ADDR", "8080"),
        ("TARDIS_PREFIX", "has.dot"),
        ("TARDIS_STREAM_REPLICAS", "7"),
        ("NATS_USER", "tardis"),
    ]))
    .unwrap_err();
    assert_has(
        &err,
        "NATS_URL: \"nats://bad host:4222\" is not a NATS server URL",
    );
    assert_has(
        &err,
        "OPS_ADDR: is not an IP address and port: \"8080\"; for example OPS_ADDR=0.0.0.0:8080",
    );
    assert_has(
        &err,
        "TARDIS_PREFIX: \"has.dot\" may only hold letters, digits",
    );
    assert_has(
        &err,
        "TARDIS_STREAM_REPLICAS: JetStream allows at most 5 replicas, got 7",
    );
    assert_has(&err, "NATS_PASSWORD: is not set but NATS_USER is");
}

#[test]
fn the_error_lists_every_problem_on_its_own_line() {
    let err = fetcher_errors(&[("CHUNK_SIZE", "x"), ("DATA_SOURCES", "{}")]);
    let text = err.to_string();
    assert!(
        text.starts_with("invalid configuration (2 problems):\n  - "),
        "{text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn writer_concurrency_beyond_the_pool_names_both_keys_and_the_fix() {
    let mut env = legacy_env();
    env.extend(env_of(&[
        ("WRITER_CONCURRENCY", "5"),
        ("DB_POOL_SIZE", "8"),
    ]));
    let err = writer::Config::from_env(&env).expect_err("5 loops need 9 connections");
    assert_has(&err, "WRITER_CONCURRENCY");
    assert_has(&err, "DB_POOL_SIZE is 8");
    assert_has(&err, "DB_POOL_SIZE to at least 9");
    env.extend(env_of(&[("DB_POOL_SIZE", "9")]));
    let config = writer::Config::from_env(&env).expect("9 connections are enough");
    assert_eq!(config.concurrency, 5);
    let defaults = writer::Config::from_env(&legacy_env()).expect("defaults are valid");
    assert_eq!((defaults.concurrency, defaults.batch_bytes), (2, 4 << 20));
}
