//! Delivery under injected faults: every publish and ack step of the enricher and the writer
//! fails at least once, on real nats-server and Postgres, with records that die in one round
//! and would be valid in the next. Every record must end in exactly one of `records` and
//! `dead_letters`, and nothing may be left in a stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_common::faults::Faults;
use tardis_common::nats::StreamKind;
use tokio_util::sync::CancellationToken;

use crate::harness::{TestDb, TestNats, wait_for};

const SOURCE: &str = "user_events";
const RECORDS: u64 = 12;

/// 3 chunks of 4 records; ids 2, 6 and 10 carry the mock's poison.
async fn publish(t: &TestNats) -> Result<()> {
    super::enricher::publish_texts(t, SOURCE, RECORDS as usize, 4, |i| {
        if i % 4 == 2 {
            "POISON please break".to_string()
        } else {
            format!("I love feature {i}")
        }
    })
    .await?;
    Ok(())
}

fn enricher_env(t: &TestNats, endpoint: &str) -> BTreeMap<String, String> {
    [
        ("NATS_URL", t.url.as_str()),
        ("TARDIS_PREFIX", t.prefix.as_str()),
        ("OPS_ADDR", "127.0.0.1:0"),
        ("PROCESSOR_ENDPOINT", endpoint),
        ("LLM_BATCH_SIZE", "4"),
        ("LLM_MAX_ATTEMPTS", "1"),
        ("LLM_RETRY_DELAY", "50ms"),
        ("LLM_TIMEOUT", "2s"),
        ("ENRICH_ACK_WAIT", "4s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn stream_len(t: &TestNats, kind: StreamKind) -> Result<u64> {
    match t.jetstream().get_stream(t.names().stream(kind)).await {
        Ok(mut s) => Ok(s.info().await?.state.messages),
        Err(_) => Ok(0),
    }
}

/// Runs the enricher and the writer with `enricher_faults` and `writer_faults` until every
/// record is in a table and every stream is empty; returns, per id, (in records, in
/// dead_letters).
async fn run_with_faults(
    enricher_faults: Faults,
    writer_faults: Faults,
) -> Result<BTreeMap<u64, (i64, i64)>> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig {
        poison: Some("POISON".into()),
        // Dead in the first round, valid in the next: the hole between two rounds.
        poison_calls: Some(1),
        ..MockConfig::default()
    })
    .await?;
    publish(&t).await?;
    let wenv = super::writer::env(&t, &db.url);
    super::writer::migrate(&wenv).await?;
    let stop = CancellationToken::new();
    let enricher = tokio::spawn(enricher::run_with(
        enricher::Config::from_env(&enricher_env(&t, &llm.endpoint()))?,
        stop.clone(),
        Arc::new(enricher_faults),
    ));
    let writer = tokio::spawn(writer::run_with(
        writer::Config::from_env(&wenv)?,
        stop.clone(),
        Arc::new(writer_faults),
    ));
    let client = db.connect().await?;
    let placed = wait_for(
        "every record in a table and every stream drained",
        Duration::from_secs(90),
        || async {
            let mut placed = BTreeMap::new();
            for id in 1..=RECORDS {
                let id_text = id.to_string();
                let r: i64 = client
                    .query_one(
                        "SELECT count(*) FROM records WHERE source = $1 AND record_id = $2",
                        &[&SOURCE, &id_text],
                    )
                    .await?
                    .get(0);
                let d: i64 = client
                    .query_one(
                        "SELECT count(*) FROM dead_letters WHERE source = $1 AND record_id = $2",
                        &[&SOURCE, &id_text],
                    )
                    .await?
                    .get(0);
                placed.insert(id, (r, d));
            }
            let everywhere = placed.values().all(|(r, d)| r + d >= 1);
            let mut drained = true;
            for kind in [
                StreamKind::Records,
                StreamKind::Enriched,
                StreamKind::DeadLetters,
            ] {
                drained &= stream_len(&t, kind).await? == 0;
            }
            anyhow::ensure!(everywhere, "not yet in a table: {placed:?}");
            anyhow::ensure!(drained, "streams not drained yet");
            Ok(Some(placed))
        },
    )
    .await?;
    stop.cancel();
    enricher.await??;
    writer.await??;
    Ok(placed)
}

fn assert_exactly_once(placed: &BTreeMap<u64, (i64, i64)>) {
    for (id, (r, d)) in placed {
        assert_eq!(
            r + d,
            1,
            "record {id}: {r} in records, {d} in dead_letters (all: {placed:?})"
        );
    }
}

/// Runs with the faults and requires every record in exactly one table.
async fn exactly_once_despite(enricher_faults: Faults, writer_faults: Faults) -> Result<()> {
    let placed = run_with_faults(enricher_faults, writer_faults).await?;
    assert_exactly_once(&placed);
    Ok(())
}

#[tokio::test]
async fn a_publish_that_fails_never_leaves_a_record_nowhere() -> Result<()> {
    exactly_once_despite(
        Faults::none().at("enricher.publish.before", &[2, 3, 4, 5]),
        Faults::none(),
    )
    .await
}

#[tokio::test]
async fn a_publish_whose_reply_is_lost_never_doubles_a_record() -> Result<()> {
    exactly_once_despite(
        Faults::none().at("enricher.publish.reply", &[1, 2, 3, 4]),
        Faults::none(),
    )
    .await
}

#[tokio::test]
async fn lost_acks_of_the_enricher_and_the_writer_change_nothing() -> Result<()> {
    exactly_once_despite(
        Faults::none().at("enricher.ack", &[1, 2]),
        Faults::none().at("writer.ack", &[1, 2, 3]),
    )
    .await
}

/// Stops an enricher `restarts` times while every chunk's LLM call outlasts the drain, then
/// lets one finish; returns the chunks' outcomes.
async fn restart_while_in_flight(
    extra: &[(&str, &str)],
    restarts: u64,
) -> Result<Vec<tardis_common::messages::EnrichedChunk>> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 3_000,
        ..MockConfig::default()
    })
    .await?;
    publish(&t).await?;
    let mut env = enricher_env(&t, &llm.endpoint());
    env.insert("LLM_TIMEOUT".into(), "10s".into());
    env.insert("ENRICH_ACK_WAIT".into(), "20s".into());
    env.insert("ENRICH_SHUTDOWN_GRACE".into(), "100ms".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    for round in 1..=restarts {
        let stop = CancellationToken::new();
        let task = tokio::spawn(enricher::run(
            enricher::Config::from_env(&env)?,
            stop.clone(),
        ));
        // Each round, every one of the 3 chunks is delivered and its request is in flight.
        wait_for(
            &format!("round {round}: every chunk delivered and in flight"),
            Duration::from_secs(30),
            || async {
                let sent = llm.mock.stats()["requests"].as_u64().unwrap_or(0);
                Ok((sent >= 3 * round).then_some(()))
            },
        )
        .await?;
        stop.cancel();
        task.await??;
    }
    let mut config = llm.mock.config();
    config.latency_ms = 0;
    llm.mock.set_config(config);
    let stop = CancellationToken::new();
    let task = tokio::spawn(enricher::run(
        enricher::Config::from_env(&env)?,
        stop.clone(),
    ));
    let result = wait_for(
        "every chunk finished after the restarts",
        Duration::from_secs(60),
        || async {
            let left = stream_len(&t, StreamKind::Records).await?;
            let done = stream_len(&t, StreamKind::Enriched).await?;
            anyhow::ensure!(
                left == 0,
                "{left} record chunks still in the stream, {done} outcomes"
            );
            Ok((done == 3).then_some(()))
        },
    )
    .await;
    stop.cancel();
    task.await??;
    result?;
    super::support::stream_messages(&t.jetstream(), &t.names().stream(StreamKind::Enriched)).await
}

#[tokio::test]
async fn a_chunk_past_enrich_max_deliver_is_dead_lettered_never_stranded() -> Result<()> {
    let outcomes = restart_while_in_flight(&[("ENRICH_MAX_DELIVER", "3")], 3).await?;
    let dead: Vec<_> = outcomes.iter().flat_map(|o| o.dead.iter()).collect();
    assert_eq!(
        dead.len() as u64,
        RECORDS,
        "every record, given up on with its reason"
    );
    assert!(
        dead[0].reason.contains("ENRICH_MAX_DELIVER=3"),
        "{}",
        dead[0].reason
    );
    Ok(())
}

#[tokio::test]
async fn hand_backs_on_shutdown_use_up_nothing() -> Result<()> {
    let outcomes = restart_while_in_flight(&[], 12).await?;
    let enriched: usize = outcomes.iter().map(|o| o.records.len()).sum();
    let dead: usize = outcomes.iter().map(|o| o.dead.len()).sum();
    assert_eq!(
        (enriched as u64, dead),
        (RECORDS, 0),
        "12 hand-backs and every record is still enriched"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_task_that_panics_hands_its_chunks_back() -> Result<()> {
    exactly_once_despite(
        Faults::none().at("enricher.batch.panic", &[1]),
        Faults::none(),
    )
    .await
}

/// Every publish and ack step of the enricher and the writer fails at least once, a batch task
/// panics, and the enricher is restarted 15 times with chunks in flight: every record still
/// ends in exactly one of `records` and `dead_letters`, and no stream keeps anything.
#[tokio::test]
async fn every_step_fails_once_and_the_enricher_restarts_fifteen_times() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let llm = MockLlm::start(MockConfig {
        poison: Some("POISON".into()),
        poison_calls: Some(1),
        latency_ms: 400,
        ..MockConfig::default()
    })
    .await?;
    publish(&t).await?;
    let wenv = super::writer::env(&t, &db.url);
    super::writer::migrate(&wenv).await?;
    let stop_writer = CancellationToken::new();
    let writer = tokio::spawn(writer::run_with(
        writer::Config::from_env(&wenv)?,
        stop_writer.clone(),
        Arc::new(Faults::none().at("writer.ack", &[1, 3])),
    ));
    let mut env = enricher_env(&t, &llm.endpoint());
    env.insert("ENRICH_SHUTDOWN_GRACE".into(), "100ms".into());
    env.insert("LLM_BATCH_SIZE".into(), "2".into());
    // Short ack waits: lost acks come back within seconds.
    env.insert("LLM_TIMEOUT".into(), "1s".into());
    env.insert("ENRICH_ACK_WAIT".into(), "2s".into());
    let faults = || {
        Arc::new(
            Faults::none()
                .at("enricher.publish.before", &[1])
                .at("enricher.publish.reply", &[2])
                .at("enricher.ack", &[1])
                .at("enricher.batch.panic", &[2]),
        )
    };
    for round in 1..=15u64 {
        let stop = CancellationToken::new();
        let task = tokio::spawn(enricher::run_with(
            enricher::Config::from_env(&env)?,
            stop.clone(),
            faults(),
        ));
        let before = llm.mock.stats()["requests"].as_u64().unwrap_or(0);
        wait_for(
            &format!("restart {round}: a request in flight"),
            Duration::from_secs(20),
            || async {
                let now = llm.mock.stats()["requests"].as_u64().unwrap_or(0);
                let left = stream_len(&t, StreamKind::Records).await?;
                Ok((now > before || left == 0).then_some(()))
            },
        )
        .await?;
        stop.cancel();
        task.await??;
    }
    let stop = CancellationToken::new();
    let last = tokio::spawn(enricher::run_with(
        enricher::Config::from_env(&env)?,
        stop.clone(),
        faults(),
    ));
    let client = db.connect().await?;
    let placed = wait_for(
        "every record in a table and every stream drained",
        Duration::from_secs(120),
        || async {
            let rows = client
                .query(
                    "SELECT r.record_id, count(*) FROM (
                        SELECT record_id FROM records WHERE source = $1
                        UNION ALL SELECT record_id FROM dead_letters WHERE source = $1) r
                     GROUP BY r.record_id",
                    &[&SOURCE],
                )
                .await?;
            let placed: BTreeMap<u64, i64> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0).parse().unwrap_or(0), r.get(1)))
                .collect();
            let mut drained = true;
            for kind in [
                StreamKind::Records,
                StreamKind::Enriched,
                StreamKind::DeadLetters,
            ] {
                drained &= stream_len(&t, kind).await? == 0;
            }
            anyhow::ensure!(placed.len() as u64 == RECORDS, "placed so far: {placed:?}");
            anyhow::ensure!(drained, "streams not drained yet");
            Ok(Some(placed))
        },
    )
    .await?;
    stop.cancel();
    last.await??;
    stop_writer.cancel();
    writer.await??;
    for (id, n) in &placed {
        assert_eq!(*n, 1, "record {id} is in {n} places: {placed:?}");
    }
    Ok(())
}
