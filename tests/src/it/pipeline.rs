//! The whole pipeline with the real binaries as processes:
//! demo-source → fetcher → NATS → enricher (mock-llm) → writer → Postgres.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use devtools::demo_source::{DemoConfig, Running as DemoSource};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use serde_json::{Value, json};

use super::support::legacy_env;
use super::writer::migrate;
use crate::harness::{Captured, TestDb, TestNats, bins, free_port, wait_for};

pub(super) fn spawn(name: &str, args: &[&str], env: &BTreeMap<String, String>) -> Result<Captured> {
    let mut cmd = Command::new(bins::bin(name)?);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
    Captured::spawn(cmd)
}

pub(super) async fn fetch_once(env: &BTreeMap<String, String>) -> Result<String> {
    let (status, output) = spawn("fetcher", &["run"], env)?
        .exited_within(Duration::from_secs(300))
        .await?;
    anyhow::ensure!(status.success(), "fetcher run failed:\n{output}");
    Ok(output)
}

/// The legacy ConfigMap and Secret, pointed at the local stand-ins, NATS and Postgres.
pub(super) fn pipeline_env(
    t: &crate::harness::TestNats,
    db: &crate::harness::TestDb,
    demo: &DemoSource,
    llm: &MockLlm,
) -> Result<BTreeMap<String, String>> {
    let mut env = legacy_env();
    let sources: Value = serde_json::from_str(&env["DATA_SOURCES"])?;
    let sources: Vec<Value> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s["url"] = json!(
                s["url"]
                    .as_str()
                    .unwrap()
                    .replace("https://api.example.com", &demo.url(""))
            );
            s
        })
        .collect();
    env.insert("DATA_SOURCES".into(), Value::Array(sources).to_string());
    env.insert("PROCESSOR_ENDPOINT".into(), llm.endpoint());
    env.insert("NATS_URL".into(), t.url.clone());
    env.insert("TARDIS_PREFIX".into(), t.prefix.clone());
    env.insert("DATABASE_URL".into(), db.url.clone());
    env.insert("PGSSLMODE".into(), "disable".into());
    Ok(env)
}

#[tokio::test]
async fn ten_thousand_records_end_to_end_exactly_once() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: 5000,
        rate: 100.0,
        tie_group: 7,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let llm = MockLlm::start(MockConfig::default()).await?;

    let mut env = pipeline_env(&t, &db, &demo, &llm)?;
    env.insert("LLM_CONCURRENCY".into(), "8".into());
    env.insert("ENRICH_BATCH_LINGER".into(), "20ms".into());

    migrate(&env).await?;
    let writer = spawn("writer", &[], &env)?;
    let enricher = spawn("enricher", &[], &env)?;
    let fetched = fetch_once(&env).await?;
    assert!(
        fetched.contains("market_data: succeeded, 5000 records"),
        "{fetched}"
    );
    assert!(
        fetched.contains("user_events: succeeded, 5000 records"),
        "{fetched}"
    );

    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            anyhow::Ok(
                db.connect()
                    .await?
                    .query_one(sql, &[])
                    .await?
                    .get::<_, i64>(0),
            )
        }
    };
    let waited = wait_for("10,000 rows", Duration::from_secs(180), || async {
        Ok((count("SELECT count(*) FROM records").await? >= 10_000).then_some(()))
    })
    .await;
    if let Err(e) = waited {
        panic!(
            "{e}\nenricher:\n{}\nwriter:\n{}",
            enricher.output(),
            writer.output()
        );
    }
    assert_eq!(count("SELECT count(*) FROM records").await?, 10_000);
    assert_eq!(
        count("SELECT count(*) FROM records WHERE enrichment->>'sentiment' IN ('positive','neutral','negative') AND length(enrichment->>'category') > 0 AND enrichment ? 'summary'").await?,
        10_000,
        "every row has a valid enrichment"
    );
    let client = db.connect().await?;
    for (source, kind) in [
        ("market_data", devtools::demo_source::Kind::MarketData),
        ("user_events", devtools::demo_source::Kind::UserEvents),
    ] {
        let last = demo.demo.record(kind, 5000);
        let cp: Value = client
            .query_one(
                "SELECT cursor FROM source_checkpoints WHERE source = $1",
                &[&source],
            )
            .await?
            .get(0);
        assert_eq!(cp["id"], "5000", "{source} checkpoint");
        assert_eq!(
            demo.demo.highest_served(kind),
            5000,
            "{source}: demo-source reports what it served"
        );
        assert_eq!(kind.source_name(), source);
        let at = chrono::DateTime::parse_from_rfc3339(cp["updated_at"].as_str().unwrap())?.to_utc();
        let expected =
            chrono::DateTime::parse_from_rfc3339(last["updated_at"].as_str().unwrap())?.to_utc();
        assert_eq!(at, expected, "{source} checkpoint time");
    }
    wait_for(
        "both fetch runs recorded",
        Duration::from_secs(30),
        || async {
            Ok((count(
                "SELECT count(*) FROM fetch_runs WHERE outcome = 'succeeded' AND records = 5000",
            )
            .await?
                == 2)
                .then_some(()))
        },
    )
    .await?;

    // New records appear; a second run brings only those.
    demo.demo.extend(10);
    let fetched = fetch_once(&env).await?;
    assert!(
        fetched.contains("market_data: succeeded, 10 records"),
        "{fetched}"
    );
    assert!(
        fetched.contains("user_events: succeeded, 10 records"),
        "{fetched}"
    );
    wait_for("10,020 rows", Duration::from_secs(60), || async {
        Ok((count("SELECT count(*) FROM records").await? >= 10_020).then_some(()))
    })
    .await?;
    assert_eq!(count("SELECT count(*) FROM records").await?, 10_020);
    assert_eq!(count("SELECT count(*) FROM dead_letters").await?, 0);
    let stats = llm.mock.stats();
    // Both sources number their records from 1, so every id was sent twice: once per source.
    let resent: Vec<(&String, &Value)> = stats["calls_per_id"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, c)| c.as_u64() != Some(2))
        .collect();
    assert!(
        resent.is_empty(),
        "records sent to the LLM more than once per source: {resent:?}\nenricher warnings:\n{}",
        enricher
            .output()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );

    let (code, out) = tokio::task::spawn_blocking(move || enricher.terminate()).await??;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = tokio::task::spawn_blocking(move || writer.terminate()).await??;
    assert_eq!(code, Some(0), "{out}");
    Ok(())
}

/// A span as an OTLP/HTTP receiver got it: `(service, name, trace id, linked trace ids,
/// attributes)`.
type ExportedSpan = (
    String,
    String,
    Vec<u8>,
    Vec<Vec<u8>>,
    BTreeMap<String, String>,
);

/// Every span the workers exported to `collector` (OTLP/HTTP protobuf bodies).
async fn exported_spans(collector: &wiremock::MockServer) -> Result<Vec<ExportedSpan>> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message as _;
    let mut spans = Vec::new();
    for request in collector.received_requests().await.unwrap_or_default() {
        anyhow::ensure!(request.url.path() == "/v1/traces", "{}", request.url);
        let export = ExportTraceServiceRequest::decode(request.body.as_slice())?;
        for rs in export.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Any::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((
                        service.clone(),
                        s.name.clone(),
                        s.trace_id.clone(),
                        s.links.iter().map(|l| l.trace_id.clone()).collect(),
                        s.attributes
                            .iter()
                            .map(|a| {
                                let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(s)) => s.clone(),
                                    Some(Any::IntValue(i)) => i.to_string(),
                                    Some(Any::DoubleValue(d)) => d.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (a.key.clone(), v)
                            })
                            .collect(),
                    ));
                }
            }
        }
    }
    Ok(spans)
}

#[tokio::test]
async fn one_record_yields_one_trace_from_fetch_to_the_writers_transaction() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: 1,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let collector = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/traces"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let mut env = pipeline_env(&t, &db, &demo, &llm)?;
    env.insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.uri());
    env.insert("DATA_SOURCES".into(), {
        let all: Value = serde_json::from_str(&env["DATA_SOURCES"])?;
        json!([all[1]]).to_string()
    });
    migrate(&env).await?;
    let writer = spawn("writer", &[], &env)?;
    let enricher = spawn("enricher", &[], &env)?;
    let fetched = fetch_once(&env).await?;
    assert!(
        fetched.contains("user_events: succeeded, 1 records"),
        "{fetched}"
    );
    let rows = || async {
        anyhow::Ok(
            db.connect()
                .await?
                .query_one("SELECT count(*) FROM records", &[])
                .await?
                .get::<_, i64>(0),
        )
    };
    wait_for("the record's row", Duration::from_secs(60), || async {
        Ok((rows().await? == 1).then_some(()))
    })
    .await?;
    // A graceful stop flushes the spans still buffered.
    let (code, enricher_out) = enricher.terminate()?;
    assert_eq!(code, Some(0), "{enricher_out}");
    let (code, writer_out) = writer.terminate()?;
    assert_eq!(code, Some(0), "{writer_out}");

    let spans = exported_spans(&collector).await?;
    let names = |service: &str| -> Vec<String> {
        spans
            .iter()
            .filter(|s| s.0 == service)
            .map(|s| s.1.clone())
            .collect()
    };
    let services: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.0.as_str()).collect();
    // The fetcher's run and the enricher's chunk share one trace (traceparent through NATS).
    let fetch_traces: std::collections::BTreeSet<&Vec<u8>> = spans
        .iter()
        .filter(|s| s.0 == "tardis-fetcher")
        .map(|s| &s.2)
        .collect();
    let enrich_traces: Vec<&Vec<u8>> = spans
        .iter()
        .filter(|s| s.0 == "tardis-enricher" && fetch_traces.contains(&s.2))
        .map(|s| &s.2)
        .collect();
    assert!(
        !enrich_traces.is_empty(),
        "no enricher span in the fetcher's trace; services {services:?}, enricher spans {:?}",
        names("tardis-enricher")
    );
    // The writer's batch span is linked to that trace, and says what it wrote.
    let batch = spans
        .iter()
        .find(|s| {
            s.0 == "tardis-writer"
                && s.1 == "write batch"
                && s.4.get("consumer").map(String::as_str) == Some("writer")
                && s.3.iter().any(|l| enrich_traces.contains(&l))
        })
        .unwrap_or_else(|| {
            panic!(
                "no writer batch span linked to the record's trace; writer spans {:?}",
                spans
                    .iter()
                    .filter(|s| s.0 == "tardis-writer")
                    .collect::<Vec<_>>()
            )
        });
    assert_eq!(
        batch.4.get("rows_written").map(String::as_str),
        Some("1"),
        "{batch:?}"
    );
    assert!(batch.4.contains_key("commit_seconds"), "{batch:?}");
    Ok(())
}
