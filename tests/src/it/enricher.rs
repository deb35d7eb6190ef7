//! The enricher against real nats-server and a local LLM (mock-llm, or wiremock for exact
//! failure sequences).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use devtools::mock_llm::{self, MockConfig, Running as MockLlm};
use serde_json::{Value, json};
use tardis_common::messages::{
    self, DeadLetter, EnrichedChunk, RecordChunk, SCHEMA_VERSION, SourceRecord,
};
use tardis_common::nats::{StreamKind, publish_durably};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::support::stream_messages;
use crate::harness::{Captured, TestNats, bins, free_port, http_get, wait_for};

/// Publishes `n` records of `source` in chunks of `per_chunk`; returns them.
async fn publish_records(
    t: &TestNats,
    source: &str,
    n: usize,
    per_chunk: usize,
    poison: Option<usize>,
) -> Result<Vec<RecordChunk>> {
    publish_texts(t, source, n, per_chunk, |i| {
        if Some(i) == poison {
            "POISON please break".to_string()
        } else if i % 3 == 0 {
            "Checkout failed twice".into()
        } else {
            format!("I love feature {i}")
        }
    })
    .await
}

/// Publishes records 1..=n of `source`, record `i` saying `text(i)`, in chunks of `per_chunk`.
pub(super) async fn publish_texts(
    t: &TestNats,
    source: &str,
    n: usize,
    per_chunk: usize,
    text: impl Fn(usize) -> String,
) -> Result<Vec<RecordChunk>> {
    tardis_common::nats::Topology::new(t.names(), Default::default())
        .provision(&t.jetstream(), &[StreamKind::Records], &[], false)
        .await?;
    let mut chunks = Vec::new();
    let ids: Vec<usize> = (1..=n).collect();
    for (seq, group) in ids.chunks(per_chunk).enumerate() {
        let records: Vec<SourceRecord> = group
            .iter()
            .map(|i| {
                Ok(SourceRecord {
                    id: i.to_string(),
                    updated_at: Some(chrono::Utc::now()),
                    payload: serde_json::value::RawValue::from_string(
                        json!({"id": i, "message": text(*i), "event": "review"}).to_string(),
                    )?,
                    content_key: None,
                    prior: None,
                })
            })
            .collect::<Result<_, serde_json::Error>>()?;
        let chunk = RecordChunk {
            schema_version: SCHEMA_VERSION,
            source: source.into(),
            chunk_id: messages::chunk_id(source, &records),
            run_id: "run-1".into(),
            chunk_seq: seq as u64,
            records,
            cursor_after: None,
            fetched_at: chrono::Utc::now(),
        };
        publish_durably(
            &t.jetstream(),
            &t.names().records_subject(source),
            &chunk.msg_id(),
            messages::encode(&chunk)?.into(),
            Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await?;
        chunks.push(chunk);
    }
    Ok(chunks)
}

fn env(t: &TestNats, endpoint: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("NATS_URL", t.url.as_str()),
        ("TARDIS_PREFIX", t.prefix.as_str()),
        ("OPS_ADDR", "127.0.0.1:0"),
        ("PROCESSOR_ENDPOINT", endpoint),
        ("LLM_BATCH_SIZE", "20"),
        ("LLM_RETRY_DELAY", "50ms"),
        ("LLM_TIMEOUT", "5s"),
        ("ENRICH_ACK_WAIT", "10s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// An enricher running in-process until the returned token is cancelled.
fn start(
    env: &BTreeMap<String, String>,
) -> Result<(
    CancellationToken,
    tokio::task::JoinHandle<Result<std::process::ExitCode>>,
)> {
    let config = enricher::Config::from_env(env)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(enricher::run(config, stop.clone()));
    Ok((stop, task))
}

async fn stop(
    handle: (
        CancellationToken,
        tokio::task::JoinHandle<Result<std::process::ExitCode>>,
    ),
) -> Result<()> {
    handle.0.cancel();
    let code = tokio::time::timeout(Duration::from_secs(30), handle.1).await???;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    Ok(())
}

async fn enriched(t: &TestNats) -> Result<Vec<EnrichedChunk>> {
    stream_messages(&t.jetstream(), &t.names().stream(StreamKind::Enriched)).await
}

/// Dead letters: the enrich-stage ones travel with their chunk's outcome, undecodable
/// messages go to the dead-letter stream.
async fn dead_letters(t: &TestNats) -> Result<Vec<DeadLetter>> {
    let mut letters: Vec<DeadLetter> = enriched(t)
        .await?
        .iter()
        .flat_map(EnrichedChunk::dead_letters)
        .collect();
    match stream_messages(&t.jetstream(), &t.names().stream(StreamKind::DeadLetters)).await {
        Ok(v) => letters.extend(v),
        Err(e) if e.to_string().contains("stream not found") => {}
        Err(e) => return Err(e),
    }
    Ok(letters)
}

fn enriched_ids(chunks: &[EnrichedChunk]) -> Vec<String> {
    let mut ids: Vec<String> = chunks
        .iter()
        .flat_map(|c| c.records.iter().map(|r| r.id.clone()))
        .collect();
    ids.sort_by_key(|i| i.parse::<u64>().unwrap_or(u64::MAX));
    ids
}

async fn wait_enriched(t: &TestNats, n: usize, within: Duration) -> Result<Vec<EnrichedChunk>> {
    wait_for(&format!("{n} enriched records"), within, || async {
        let chunks = enriched(t).await?;
        Ok((chunks.iter().map(|c| c.records.len()).sum::<usize>() >= n).then_some(chunks))
    })
    .await
}

fn all_ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| i.to_string()).collect()
}

async fn records_left(t: &TestNats) -> Result<u64> {
    Ok(t.jetstream()
        .get_stream(t.names().stream(StreamKind::Records))
        .await?
        .info()
        .await?
        .state
        .messages)
}

#[tokio::test]
async fn happy_path_batches_across_chunks_and_matches_every_id() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig::default()).await?;
    let published = publish_records(&t, "user_events", 250, 50, None).await?;
    let running = start(&env(
        &t,
        &llm.endpoint(),
        &[("ENRICH_BATCH_LINGER", "300ms")],
    ))?;
    let chunks = wait_enriched(&t, 250, Duration::from_secs(60)).await?;
    assert_eq!(enriched_ids(&chunks), all_ids(250));
    let stats = llm.mock.stats();
    assert_eq!(
        stats["requests"], 13,
        "250 records in batches of 20: {stats}"
    );
    // Every result belongs to its own record.
    let by_id: HashMap<String, &SourceRecord> = published
        .iter()
        .flat_map(|c| c.records.iter().map(|r| (r.id.clone(), r)))
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk.source, "user_events");
        for r in &chunk.records {
            let original: Value = serde_json::from_str(by_id[&r.id].payload.get())?;
            let enrichment: Value = serde_json::from_str(r.enrichment.get())?;
            assert_eq!(enrichment, mock_llm::enrich(&original), "record {}", r.id);
            assert_eq!(r.payload.get(), by_id[&r.id].payload.get());
            assert_eq!(r.model, "deepseek-v3.2");
            assert!(r.prompt_version.starts_with("v1-"));
            assert!(r.usage.prompt_tokens > 0 && r.usage.cost_usd > 0.0);
        }
    }
    let mut ids_per_chunk: Vec<String> = chunks.iter().map(|c| c.chunk_id.clone()).collect();
    ids_per_chunk.sort();
    let mut expected: Vec<String> = published.iter().map(|c| c.chunk_id.clone()).collect();
    expected.sort();
    assert_eq!(
        ids_per_chunk, expected,
        "one enriched chunk per record chunk"
    );
    assert!(dead_letters(&t).await?.is_empty());
    wait_for(
        "the records stream to drain (acks)",
        Duration::from_secs(10),
        || async { Ok((records_left(&t).await? == 0).then_some(())) },
    )
    .await?;

    // What we sent is a valid OpenAI chat-completions request.
    let schema: Value = serde_json::from_str(include_str!(
        "../../fixtures/openai-chat-completion-request.schema.json"
    ))?;
    let validator = jsonschema::validator_for(&schema)?;
    let sent = &stats["last_request"];
    let errors: Vec<String> = validator
        .iter_errors(sent)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(sent["messages"][0]["role"], "system");
    let user: Value = serde_json::from_str(sent["messages"][1]["content"].as_str().unwrap())?;
    // The records keyed by their ids, each exactly as fetched.
    let records = user.as_object().expect("the user message is a JSON object");
    assert!(
        !records.is_empty() && records.values().all(Value::is_object),
        "{user}"
    );
    stop(running).await
}

fn good(req: &Request) -> ResponseTemplate {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    ResponseTemplate::new(200).set_body_json(mock_llm::good_answer(&body))
}

#[tokio::test]
async fn rate_limits_server_errors_and_timeouts_are_retried() -> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .insert_header("x-ratelimit-reset-requests", "1s"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream"))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(|req: &Request| good(req).set_delay(Duration::from_secs(4)))
        .up_to_n_times(1)
        .with_priority(3)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(good)
        .with_priority(4)
        .mount(&server)
        .await;
    publish_records(&t, "s", 10, 10, None).await?;
    let running = start(&env(
        &t,
        &format!("{}/v1/chat/completions", server.uri()),
        &[("LLM_TIMEOUT", "1s"), ("ENRICH_ACK_WAIT", "2s")],
    ))?;
    let started = tokio::time::Instant::now();
    let chunks = wait_enriched(&t, 10, Duration::from_secs(60)).await?;
    assert_eq!(enriched_ids(&chunks), all_ids(10));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the 429's Retry-After was honoured"
    );
    let requests = server.received_requests().await.unwrap_or_default();
    assert_eq!(requests.len(), 4, "429, 500, timeout, then success");
    assert!(dead_letters(&t).await?.is_empty());
    stop(running).await
}

#[tokio::test]
async fn bad_answers_are_retried_and_only_the_poison_record_is_dead_lettered() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        invalid_json_rate: 0.1,
        drop_id_rate: 0.1,
        invent_id_rate: 0.2,
        truncate_rate: 0.1,
        poison: Some("POISON".into()),
        ..MockConfig::default()
    })
    .await?;
    publish_records(&t, "s", 120, 30, Some(77)).await?;
    let running = start(&env(&t, &llm.endpoint(), &[("LLM_MAX_ATTEMPTS", "5")]))?;
    let letters = wait_for(
        "the poison record's dead letter",
        Duration::from_secs(60),
        || async {
            let d = dead_letters(&t).await?;
            Ok((!d.is_empty()).then_some(d))
        },
    )
    .await?;
    let chunks = wait_enriched(&t, 119, Duration::from_secs(60)).await?;
    let mut expected = all_ids(120);
    expected.retain(|i| i != "77");
    assert_eq!(
        enriched_ids(&chunks),
        expected,
        "everything else enriched, once"
    );
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.record.id, "77");
    assert_eq!(letter.attempts, 5);
    assert!(
        letter
            .reason
            .contains("no valid enrichment after 5 attempts"),
        "{}",
        letter.reason
    );
    assert!(
        letter
            .reason
            .contains("sentiment: \"ecstatic\" is not one of positive, neutral, negative"),
        "{}",
        letter.reason
    );
    assert!(letter.record.payload.get().contains("POISON"));
    let stats = llm.mock.stats();
    assert!(
        stats["requests"].as_u64().unwrap() > 6,
        "faults forced retries: {stats}"
    );
    wait_for("every chunk acked", Duration::from_secs(10), || async {
        Ok((records_left(&t).await? == 0).then_some(()))
    })
    .await?;
    stop(running).await
}

fn spawn_binary(env: &BTreeMap<String, String>, port: u16) -> Result<Captured> {
    let mut cmd = Command::new(bins::bin("enricher")?);
    cmd.env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{port}"));
    Captured::spawn(cmd)
}

#[tokio::test]
async fn a_refused_key_stops_the_work_without_losing_any_and_never_prints_the_key() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        api_key: Some("sk-right-key-000111".into()),
        ..MockConfig::default()
    })
    .await?;
    publish_records(&t, "s", 30, 10, None).await?;
    let wrong = env(
        &t,
        &llm.endpoint(),
        &[
            ("LLM_API_KEY", "sk-wrong-key-999888"),
            ("RUST_LOG", "debug"),
        ],
    );
    let port = free_port()?;
    let child = spawn_binary(&wrong, port)?;
    if let Err(e) = wait_for("the key to be refused", Duration::from_secs(30), || async {
        Ok((llm.mock.stats()["unauthorized"].as_u64().unwrap_or(0) >= 1).then_some(()))
    })
    .await
    {
        let (_, output) = tokio::task::spawn_blocking(move || child.terminate()).await??;
        panic!("{e}: enricher output:\n{output}");
    }
    wait_for(
        "/ready to report the LLM, and only the LLM",
        Duration::from_secs(30),
        || async {
            Ok(http_get(&format!("http://127.0.0.1:{port}/ready"))
                .await
                .ok()
                .filter(|(s, b)| *s == 503 && b == "not ready: llm\n"))
        },
    )
    .await?;
    // It stays that way: no retry storm, no recovery without a restart.
    let refused = llm.mock.stats()["unauthorized"].as_u64().unwrap_or(0);
    let (code, output) = tokio::task::spawn_blocking(move || child.terminate()).await??;
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(
        llm.mock.stats()["unauthorized"].as_u64().unwrap_or(0),
        refused,
        "no more requests after the refusal"
    );
    assert!(
        output.contains("refused the API key (HTTP 401)"),
        "{output}"
    );
    assert!(
        !output.contains("sk-wrong-key-999888"),
        "the key was printed"
    );
    assert!(enriched(&t).await?.is_empty(), "nothing enriched");
    assert!(dead_letters(&t).await?.is_empty(), "nothing dead-lettered");
    assert_eq!(
        records_left(&t).await?,
        3,
        "nothing acked: every chunk is still queued"
    );

    let right = env(
        &t,
        &llm.endpoint(),
        &[("LLM_API_KEY", "sk-right-key-000111")],
    );
    let running = start(&right)?;
    let chunks = wait_enriched(&t, 30, Duration::from_secs(60)).await?;
    assert_eq!(enriched_ids(&chunks), all_ids(30));
    stop(running).await
}

#[tokio::test]
async fn three_replicas_share_the_work_and_each_record_is_sent_once() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .await?;
    publish_records(&t, "s", 600, 20, None).await?;
    let e = env(&t, &llm.endpoint(), &[("ENRICH_MAX_IN_FLIGHT", "2")]);
    let replicas = [start(&e)?, start(&e)?, start(&e)?];
    let chunks = wait_enriched(&t, 600, Duration::from_secs(90)).await?;
    assert_eq!(
        enriched_ids(&chunks),
        all_ids(600),
        "each record enriched exactly once"
    );
    let stats = llm.mock.stats();
    let calls = stats["calls_per_id"].as_object().unwrap();
    assert_eq!(calls.len(), 600);
    assert!(
        calls.values().all(|c| c == 1),
        "a record was sent to the LLM twice: {stats}"
    );
    for r in replicas {
        stop(r).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_replica_killed_mid_batch_has_its_chunks_redelivered() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 1500,
        ..MockConfig::default()
    })
    .await?;
    publish_records(&t, "s", 40, 10, None).await?;
    let e = env(
        &t,
        &llm.endpoint(),
        &[("LLM_TIMEOUT", "3s"), ("ENRICH_ACK_WAIT", "6s")],
    );
    let victim = spawn_binary(&e, free_port()?)?;
    wait_for(
        "the first replica to send a batch",
        Duration::from_secs(30),
        || async { Ok((llm.mock.stats()["requests"].as_u64().unwrap_or(0) >= 1).then_some(())) },
    )
    .await?;
    victim.kill()?;
    assert!(
        enriched(&t).await?.is_empty(),
        "killed before anything was published"
    );
    let survivor = start(&e)?;
    let chunks = wait_enriched(&t, 40, Duration::from_secs(60)).await?;
    assert_eq!(
        enriched_ids(&chunks),
        all_ids(40),
        "every record enriched once, none lost"
    );
    stop(survivor).await
}

#[tokio::test]
async fn an_endpoint_that_answers_200_but_not_a_completion_halts_and_hands_the_work_back()
-> Result<()> {
    let t = TestNats::new().await?;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string("<html><body>Welcome to nginx!</body></html>"),
        )
        .mount(&server)
        .await;
    publish_records(&t, "s", 8, 4, None).await?;
    let wrong = format!("{}/v1/chat/completions", server.uri());
    let halted = start(&env(&t, &wrong, &[]))?;
    let limit = enricher::enrich::NOT_A_COMPLETION_LIMIT as usize;
    wait_for("the bounded retries", Duration::from_secs(30), || async {
        Ok((requests_to(&server).await >= limit).then_some(()))
    })
    .await?;
    // A second enricher, pointed at a working endpoint, finishes the work the first handed
    // back; meanwhile the halted one sends nothing more.
    let llm = MockLlm::start(MockConfig::default()).await?;
    let working = start(&env(&t, &llm.endpoint(), &[]))?;
    let chunks = wait_enriched(&t, 8, Duration::from_secs(60)).await?;
    assert_eq!(enriched_ids(&chunks), all_ids(8));
    assert!(dead_letters(&t).await?.is_empty(), "nothing dead-lettered");
    assert_eq!(
        requests_to(&server).await,
        limit,
        "the halted enricher stopped after {limit} answers that were not completions"
    );
    stop(working).await?;
    stop(halted).await
}

async fn requests_to(server: &MockServer) -> usize {
    server.received_requests().await.map_or(0, |r| r.len())
}

#[tokio::test]
async fn a_batch_failing_through_an_outage_is_handed_back_not_held_forever() -> Result<()> {
    let t = TestNats::new().await?;
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .mount(&down)
        .await;
    publish_records(&t, "s", 8, 4, None).await?;
    let stuck = start(&env(
        &t,
        &format!("{}/v1/chat/completions", down.uri()),
        &[("LLM_OUTAGE_HAND_BACK", "1s")],
    ))?;
    wait_for(
        "the failing enricher to hold the work",
        Duration::from_secs(30),
        || async { Ok((requests_to(&down).await >= 2).then_some(())) },
    )
    .await?;
    // Another replica whose endpoint works gets the chunks once they are handed back.
    let llm = MockLlm::start(MockConfig::default()).await?;
    let working = start(&env(&t, &llm.endpoint(), &[]))?;
    let chunks = match wait_enriched(&t, 8, Duration::from_secs(30)).await {
        Ok(c) => c,
        Err(e) => panic!(
            "{e}: mock-llm {}, failing endpoint {} requests",
            llm.mock.stats(),
            requests_to(&down).await
        ),
    };
    assert_eq!(enriched_ids(&chunks), all_ids(8));
    assert!(
        dead_letters(&t).await?.is_empty(),
        "an outage dead-letters nothing"
    );
    stop(working).await?;
    stop(stuck).await
}
