//! The batch policy (retry, split, bury, halt, hand back) against a scripted LLM, on
//! Tokio's paused clock: waits are checked without sleeping.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tardis_common::config::Reader;

use super::*;
use crate::protocol::RequestBody;
use serde_json::Value;

type Reply = Box<dyn Fn(&[String]) -> Result<Answer, CallError> + Send + Sync>;

/// Answers with the scripted replies in turn (the last one forever), recording the ids of
/// every request.
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    calls: Mutex<Vec<Vec<String>>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script")
    }
}

impl Script {
    fn new(replies: Vec<Reply>) -> Arc<Self> {
        Arc::new(Self {
            replies: Mutex::new(replies.into()),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
}

fn ids_of(body: &RequestBody) -> Vec<String> {
    let body = body.to_value();
    let user = body["messages"][1]["content"].as_str().unwrap_or("{}");
    let v: Value = serde_json::from_str(user).unwrap_or_default();
    v.as_object()
        .map(|records| records.keys().cloned().collect())
        .unwrap_or_default()
}

impl Complete for Script {
    fn complete<'a>(
        &'a self,
        body: &'a RequestBody,
        _cost: Cost,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Answer, CallError>> + Send + 'a>>
    {
        let ids = ids_of(body);
        self.calls.lock().unwrap().push(ids.clone());
        let mut replies = self.replies.lock().unwrap();
        let result = if replies.len() > 1 {
            let r = replies.pop_front().unwrap();
            r(&ids)
        } else {
            replies
                .front()
                .map_or_else(|| Ok(answer("{}")), |r| r(&ids))
        };
        Box::pin(async move { result })
    }
}

fn answer(content: &str) -> Answer {
    Answer {
        content: Some(content.to_string()),
        finish_reason: Some("stop".into()),
        refusal: None,
        prompt_tokens: 100,
        completion_tokens: 20,
    }
}

/// Valid results for every id but those containing "poison" (an invalid sentiment).
fn valid(ids: &[String]) -> Result<Answer, CallError> {
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            let sentiment = if id.contains("poison") { "ecstatic" } else { "positive" };
            serde_json::json!({"id": id, "sentiment": sentiment, "category": "test", "summary": "fine"})
        })
        .collect();
    Ok(answer(
        &serde_json::json!({ "results": results }).to_string(),
    ))
}

fn processor(script: Arc<Script>, extra: &[(&str, &str)]) -> BatchProcessor {
    let mut env: BTreeMap<String, String> = [
        (
            "PROCESSOR_ENDPOINT",
            "http://127.0.0.1:9/v1/chat/completions",
        ),
        ("LLM_RETRY_DELAY", "1s"),
        ("LLM_MAX_ATTEMPTS", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    let mut r = Reader::new(&env);
    let settings = LlmSettings::read(&mut r);
    r.finish().unwrap();
    let registry = prometheus::Registry::new();
    let readiness = tardis_common::ops::Readiness::new(&registry).unwrap();
    BatchProcessor {
        client: script,
        schema: EnrichmentSchema::default(),
        system_prompt: "enrich".into(),
        settings,
        metrics: EnrichMetrics::register(&registry).unwrap(),
        health: Arc::new(LlmHealth::new(readiness.flag("llm"))),
        stop: CancellationToken::new(),
        spend: None,
    }
}

fn items(ids: &[&str]) -> Vec<Item> {
    ids.iter()
        .enumerate()
        .map(|(index, id)| Item {
            key: ItemKey { chunk: 1, index },
            source: "s".into(),
            id: id.to_string(),
            payload: RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).unwrap(),
            tokens: 10,
            attempts: 0,
            last_error: None,
            errors: Vec::new(),
        })
        .collect()
}

/// The one outcome of `id` (it must have exactly one).
fn outcome_of<'a>(r: &'a BatchResult, id: &str) -> &'a Outcome {
    let found: Vec<&Outcome> = r
        .outcomes
        .iter()
        .filter(|(k, _, _)| k.index == index_of(id))
        .map(|(_, _, o)| o)
        .collect();
    assert_eq!(found.len(), 1, "{id}: {:?}", r.outcomes);
    found[0]
}

fn index_of(id: &str) -> usize {
    ["1", "2", "3", "4-poison"]
        .iter()
        .position(|x| *x == id)
        .unwrap()
}

/// Records like the demo source's (about 134 characters of JSON each).
fn demo_items(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| {
            let id = format!("{}", 1000 + i);
            let json = format!(
                r#"{{"id":{id},"symbol":"AAPL","price":187.{i:02},"volume":{},"updated_at":"2026-11-30T10:00:{:02}.000Z","note":"steady trading, light volume"}}"#,
                1_000_000 + i,
                i % 60
            );
            Item {
                key: ItemKey { chunk: 1, index: i },
                source: "s".into(),
                id,
                payload: RawValue::from_string(json).unwrap(),
                tokens: 40,
                attempts: 0,
                last_error: None,
                errors: Vec::new(),
            }
        })
        .collect()
}

/// Characters of the whole prompt (system and user content as sent) per character of
/// the records' own JSON, for a batch of `n` demo-like records at the default settings.
fn prompt_overhead(n: usize) -> f64 {
    let mut p = processor(Script::new(vec![]), &[]);
    p.system_prompt = crate::protocol::system_prompt(None, &p.schema);
    let items = demo_items(n);
    let own: usize = items.iter().map(|i| i.payload.get().len()).sum();
    assert!((125..=145).contains(&(own / n)), "{} chars", own / n);
    let (body, _) = p.body(&items);
    let sent: usize = body.to_value()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().len())
        .sum();
    sent as f64 / own as f64
}

#[test]
fn the_whole_prompt_is_at_most_1_2_times_the_records_at_the_default_batch() {
    let p = processor(Script::new(vec![]), &[]);
    let default = p.settings.batch_size as usize;
    assert_eq!(
        default, 40,
        "LLM_MAX_OUTPUT_TOKENS / LLM_MAX_TOKENS_PER_RECORD"
    );
    let ratio = prompt_overhead(default);
    for n in [1, 5, 20, default, 50] {
        println!("{n:>3} records: {:.3}x", prompt_overhead(n));
    }
    assert!(ratio <= 1.2, "{ratio:.3}x at {default} records");
    // Smaller batches share the instructions among fewer records.
    assert!(prompt_overhead(1) > prompt_overhead(5));
    assert!(prompt_overhead(5) > prompt_overhead(20));
    assert!(prompt_overhead(20) > ratio);
}

#[test]
fn max_tokens_grows_with_the_batch_up_to_the_output_limit() {
    let p = processor(Script::new(vec![]), &[("LLM_MAX_OUTPUT_TOKENS", "1000")]);
    assert_eq!(p.settings.batch_size, 5, "1000 / 200");
    let (body, cost) = p.body(&demo_items(2));
    assert_eq!(body.to_value()["max_tokens"], 450);
    assert_eq!(cost.max_tokens, 450);
    let (body, _) = p.body(&demo_items(8));
    assert_eq!(body.to_value()["max_tokens"], 1000);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_waits_at_least_retry_after_then_succeeds() {
    let script = Script::new(vec![
        Box::new(|_| {
            Err(CallError::Transient {
                rate_limited: true,
                reason: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(10)),
            })
        }),
        Box::new(valid),
    ]);
    let p = processor(script.clone(), &[]);
    let started = tokio::time::Instant::now();
    let r = p.process(items(&["1", "2", "3"])).await;
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.outcomes.len(), 3);
    assert!(matches!(outcome_of(&r, "2"), Outcome::Enriched { .. }));
    assert_eq!(script.calls().len(), 2, "the same batch, once more");
}

#[tokio::test(start_paused = true)]
async fn invalid_json_splits_the_batch_and_only_the_poison_record_is_buried() {
    let script = Script::new(vec![Box::new(|ids: &[String]| {
        if ids.len() > 1 && ids.iter().any(|i| i.contains("poison")) {
            Ok(answer("this is not JSON"))
        } else {
            valid(ids)
        }
    })]);
    let p = processor(script.clone(), &[]);
    let r = p.process(items(&["1", "2", "3", "4-poison"])).await;
    assert_eq!(r.outcomes.len(), 4);
    for id in ["1", "2", "3"] {
        assert!(
            matches!(outcome_of(&r, id), Outcome::Enriched { .. }),
            "{id}"
        );
    }
    match outcome_of(&r, "4-poison") {
        Outcome::Dead {
            attempts, reason, ..
        } => {
            assert_eq!(*attempts, 2, "LLM_MAX_ATTEMPTS");
            assert!(reason.contains("ecstatic"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let calls = script.calls();
    assert_eq!(calls[0].len(), 4, "first the whole batch");
    assert!(
        calls.iter().any(|c| c == &["4-poison".to_string()]),
        "then alone: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_result_is_retried_without_its_neighbours() {
    let script = Script::new(vec![
        Box::new(|ids: &[String]| {
            let rest: Vec<String> = ids.iter().filter(|i| *i != "2").cloned().collect();
            valid(&rest)
        }),
        Box::new(valid),
    ]);
    let p = processor(script.clone(), &[]);
    let r = p.process(items(&["1", "2", "3"])).await;
    assert_eq!(r.outcomes.len(), 3);
    assert_eq!(script.calls(), vec![vec!["1", "2", "3"], vec!["2"]]);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_hand_back_gives_the_batch_back() {
    let script = Script::new(vec![Box::new(|_| {
        Err(CallError::Transient {
            rate_limited: false,
            reason: "HTTP 503".into(),
            retry_after: None,
        })
    })]);
    let p = processor(script.clone(), &[("LLM_OUTAGE_HAND_BACK", "30s")]);
    let started = tokio::time::Instant::now();
    let r = p.process(items(&["1", "2"])).await;
    assert!(r.hand_back);
    assert_eq!(r.abandoned.len(), 2);
    assert!(r.outcomes.is_empty(), "an outage decides nothing");
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert!(!p.health.is_halted());
}

#[tokio::test(start_paused = true)]
async fn answers_that_are_not_completions_halt_after_three() {
    let script = Script::new(vec![Box::new(|_| {
        Err(CallError::NotACompletion {
            endpoint: "http://x/".into(),
            status: 200,
            reason: "the response is not JSON".into(),
        })
    })]);
    let p = processor(script.clone(), &[]);
    let r = p.process(items(&["1", "2"])).await;
    assert!(p.health.is_halted());
    assert_eq!(script.calls().len(), NOT_A_COMPLETION_LIMIT as usize);
    assert_eq!(r.abandoned.len(), 2);
    assert!(
        !r.hand_back,
        "halted: handed back by the pipeline, all at once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_key_halts_at_once_and_decides_nothing() {
    let script = Script::new(vec![Box::new(|_| {
        Err(CallError::Unauthorized {
            endpoint: "http://x/".into(),
            status: 401,
        })
    })]);
    let p = processor(script.clone(), &[]);
    let r = p.process(items(&["1"])).await;
    assert!(p.health.is_halted());
    assert!(r.outcomes.is_empty());
    assert_eq!(script.calls().len(), 1);
}
