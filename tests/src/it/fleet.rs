//! The enricher fleet: one LLM budget shared through NATS by replicas that come and go, and
//! autoscaling on the work left in the records stream.

use std::time::Duration;

use anyhow::Result;
use devtools::demo_source::{DemoConfig, Running as DemoSource};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_common::nats::StreamKind;

use super::pipeline::{fetch_once, pipeline_env};
use super::writer::migrate;
use crate::harness::fleet::{enriched_messages, publish_records, spawn_enricher};
use crate::harness::{Captured, TestDb, TestNats, free_port, http_get, wait_for};

/// The provider's limit in these tests: 20 requests per 10 s window (120 a minute), so that a
/// minute's behaviour shows in seconds. Each replica is configured with the whole limit.
const WINDOW_SECS: u64 = 10;
const PER_WINDOW: u64 = 20;
const RPM: u64 = PER_WINDOW * 60 / WINDOW_SECS;

#[tokio::test]
async fn replicas_joining_and_killed_mid_run_stay_within_the_providers_limit() -> Result<()> {
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 100,
        rpm: Some(PER_WINDOW),
        window_secs: Some(WINDOW_SECS),
        ..MockConfig::default()
    })
    .await?;
    // 90 requests of 5 records: 45 s at the limit; one replica alone could send 40 a second.
    let chunks = publish_records(&t.jetstream(), &t.names(), "fleet", 450, 15).await?;
    let env = [
        ("LLM_RPM", RPM.to_string()),
        ("LLM_BATCH_SIZE", "5".to_string()),
        ("LLM_CONCURRENCY", "4".to_string()),
        ("LLM_TIMEOUT", "5s".to_string()),
        ("ENRICH_ACK_WAIT", "10s".to_string()),
        ("ENRICH_MAX_IN_FLIGHT", "4".to_string()),
        ("ENRICH_BATCH_LINGER", "20ms".to_string()),
    ];
    let start = |_: u32| spawn_enricher(&t.url, &t.prefix, &llm.endpoint(), &env);
    let a = start(1)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = start(2)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = start(3)?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // A replica dies without a word: its chunks come back after the ack wait, its share of
    // the budget was never held beyond its last request.
    b.kill()?;
    let done = wait_for("every chunk enriched", Duration::from_secs(150), || async {
        Ok((enriched_messages(&t.jetstream(), &t.names()).await? >= chunks).then_some(()))
    })
    .await;
    let stats = llm.mock.stats();
    if let Err(e) = done {
        panic!(
            "{e}\nstats: {stats}\nA:\n{}\nC:\n{}",
            a.output(),
            c.output()
        );
    }
    assert_eq!(enriched_messages(&t.jetstream(), &t.names()).await?, chunks);
    let calls = stats["requests"].as_u64().unwrap_or(0);
    let throttled = stats["throttled"].as_u64().unwrap_or(0);
    let peak = stats["peak_window_requests"].as_u64().unwrap_or(0);
    println!(
        "calls {calls}, 429s {throttled}, peak {peak} requests in a {WINDOW_SECS} s window (limit {PER_WINDOW})"
    );
    assert!(
        throttled * 50 <= calls,
        "429s above 2 % of calls: {throttled} of {calls}"
    );
    // The fleet used the limit (so per-replica budgets would have overrun it).
    assert!(
        peak >= PER_WINDOW * 3 / 4,
        "the fleet never came near the limit: peak {peak}"
    );
    for e in [a, c] {
        e.terminate()?;
    }
    Ok(())
}

/// The sum of the samples of `/metrics` at `port` whose line starts with `series` and
/// contains every one of `labels`; `None` when there is none.
async fn metric(port: u16, series: &str, labels: &[&str]) -> Result<Option<f64>> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await?;
    anyhow::ensure!(status == 200, "/metrics on port {port} answered {status}");
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(series) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    Ok((!values.is_empty()).then(|| values.iter().sum()))
}

/// Records a replica enriched, from its `/metrics`.
async fn enriched_by(ops_port: u16) -> Result<u64> {
    Ok(metric(
        ops_port,
        "tardis_enrich_records_total{",
        &["outcome=\"enriched\""],
    )
    .await?
    .unwrap_or(0.0) as u64)
}

#[tokio::test]
async fn a_replica_that_starts_later_gets_a_share_of_a_backlog() -> Result<()> {
    // 12 chunks waiting, fewer than one replica's ENRICH_MAX_IN_FLIGHT (16): a replica that
    // took every chunk it may hold would leave the one the autoscaler adds with nothing.
    let t = TestNats::new().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 300,
        ..MockConfig::default()
    })
    .await?;
    let chunks = publish_records(&t.jetstream(), &t.names(), "later", 1200, 100).await?;
    let (a_port, b_port) = (free_port()?, free_port()?);
    let env = |port: u16| {
        vec![
            ("LLM_BATCH_SIZE", "20".to_string()),
            ("LLM_CONCURRENCY", "2".to_string()),
            ("OPS_ADDR", format!("127.0.0.1:{port}")),
        ]
    };
    let a = spawn_enricher(&t.url, &t.prefix, &llm.endpoint(), &env(a_port))?;
    wait_for(
        "the first replica at work",
        Duration::from_secs(30),
        || async { Ok((llm.mock.stats()["served"].as_u64().unwrap_or(0) > 0).then_some(())) },
    )
    .await?;
    let b = spawn_enricher(&t.url, &t.prefix, &llm.endpoint(), &env(b_port))?;
    wait_for("every chunk enriched", Duration::from_secs(120), || async {
        Ok((enriched_messages(&t.jetstream(), &t.names()).await? >= chunks).then_some(()))
    })
    .await?;
    let (by_a, by_b) = (enriched_by(a_port).await?, enriched_by(b_port).await?);
    println!("enriched by the first replica: {by_a}, by the one started later: {by_b}");
    assert_eq!(by_a + by_b, 1200);
    // Half each when both run from the start; the later one loses only its start-up time.
    assert!(
        by_b >= 200,
        "the replica started later enriched only {by_b} of 1200 records"
    );
    a.terminate()?;
    b.terminate()?;
    Ok(())
}

/// `tardis_work_left_messages{stage="enrich"}` as the writer exports it.
async fn work_left(writer_ops: u16) -> Result<Option<u64>> {
    Ok(metric(
        writer_ops,
        "tardis_work_left_messages{stage=\"enrich\"}",
        &[],
    )
    .await?
    .map(|v| v as u64))
}

#[tokio::test]
async fn a_burst_scales_the_fleet_up_and_back_to_zero_and_every_record_lands_once() -> Result<()> {
    let t = TestNats::new().await?;
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: 10_000,
        rate: 100.0,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    // 1200 requests a minute (200 per 10 s), 200 ms each: the budget, not the replicas, is
    // the bound once two replicas run.
    let llm = MockLlm::start(MockConfig {
        latency_ms: 200,
        rpm: Some(200),
        window_secs: Some(WINDOW_SECS),
        ..MockConfig::default()
    })
    .await?;
    let mut env = pipeline_env(&t, &db, &demo, &llm)?;
    env.insert("CHUNK_SIZE".into(), "250".into());
    env.insert("LLM_RPM".into(), "1200".into());
    env.insert("LLM_CONCURRENCY".into(), "2".into());
    env.insert("ENRICH_MAX_IN_FLIGHT".into(), "4".into());
    env.insert("ENRICH_BATCH_LINGER".into(), "20ms".into());
    env.insert("RUST_LOG".into(), "warn".into());
    migrate(&env).await?;
    let writer_ops = free_port()?;
    let mut writer_env = env.clone();
    writer_env.insert("OPS_ADDR".into(), format!("127.0.0.1:{writer_ops}"));
    let mut writer_cmd = std::process::Command::new(crate::harness::bins::bin("writer")?);
    writer_cmd.env_clear().envs(&writer_env);
    let writer = Captured::spawn(writer_cmd)?;
    wait_for(
        "the writer's lag series",
        Duration::from_secs(30),
        || async { Ok(work_left(writer_ops).await.ok().flatten()) },
    )
    .await?;

    // The burst: one fetcher run of 20,000 records (80 chunks).
    let fetched = fetch_once(&env).await?;
    assert!(fetched.contains("succeeded, 10000 records"), "{fetched}");

    // The HPA's formula on the manifests' metric, every 2 s: desired = ceil(lag / target)
    // within [0, MAX]; up at once, down only to the highest desire of the last 10 s
    // (stabilization), to zero after 6 s without lag (KEDA's cooldown).
    const TARGET: u64 = 16;
    const MAX: usize = 4;
    let started = tokio::time::Instant::now();
    let mut fleet: Vec<Captured> = Vec::new();
    let mut recent: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut idle_since: Option<tokio::time::Instant> = None;
    let mut timeline = Vec::new();
    let mut stopping = Vec::new();
    let mut cold_start: Option<tokio::task::JoinHandle<Result<Duration>>> = None;
    let mut peak = 0;
    let consumer_lag = || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer = t
            .jetstream()
            .get_stream(t.names().stream(StreamKind::Records))
            .await?
            .get_consumer(
                &t.names()
                    .consumer(tardis_common::nats::ConsumerKind::Enricher),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = c.info().await?;
        anyhow::Ok(info.num_pending + info.num_ack_pending as u64)
    };
    let mut compared = 0;
    loop {
        // One definition: the messages in the stream are KEDA's num_pending + num_ack_pending
        // (read before and after, as the drain only lowers both).
        if let Ok(before) = consumer_lag().await {
            let mut s = t
                .jetstream()
                .get_stream(t.names().stream(StreamKind::Records))
                .await?;
            let in_stream = s.info().await?.state.messages;
            let after = consumer_lag().await?;
            assert!(
                after <= in_stream && in_stream <= before,
                "stream {in_stream} vs consumer lag {before}..{after}"
            );
            compared += 1;
        }
        let lag = work_left(writer_ops).await?.unwrap_or(0);
        let desired = (lag.div_ceil(TARGET) as usize).min(MAX);
        let now = tokio::time::Instant::now();
        recent.retain(|(at, _)| now.duration_since(*at) < Duration::from_secs(10));
        recent.push((now, desired));
        let stabilized = recent.iter().map(|(_, d)| *d).max().unwrap_or(0);
        idle_since = if lag == 0 {
            idle_since.or(Some(now))
        } else {
            None
        };
        let target = if lag == 0 {
            if idle_since.is_some_and(|i| now.duration_since(i) >= Duration::from_secs(6)) {
                0
            } else {
                fleet.len()
            }
        } else {
            stabilized.max(1)
        };
        while fleet.len() < target {
            let mut cmd = std::process::Command::new(crate::harness::bins::bin("enricher")?);
            cmd.env_clear()
                .envs(&env)
                .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
            fleet.push(Captured::spawn(cmd)?);
            if cold_start.is_none() {
                // Cold start: from the first process start to the first enriched row.
                let db = db.clone();
                cold_start = Some(tokio::spawn(async move {
                    let spawned = tokio::time::Instant::now();
                    let client = db.connect().await?;
                    loop {
                        let rows: i64 = client
                            .query_one("SELECT count(*) FROM records", &[])
                            .await?
                            .get(0);
                        if rows > 0 {
                            return Ok(spawned.elapsed());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }));
            }
        }
        while fleet.len() > target {
            // SIGTERM; the replica finishes its batches within its grace while the loop goes on.
            let e = fleet.pop().expect("a replica");
            stopping.push(tokio::task::spawn_blocking(move || e.terminate()));
        }
        peak = peak.max(fleet.len());
        timeline.push(format!(
            "t={:>3}s lag={lag:>3} desired={desired} replicas={}",
            started.elapsed().as_secs(),
            fleet.len()
        ));
        if fleet.is_empty() && lag == 0 && started.elapsed() > Duration::from_secs(10) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!(
                "the burst did not drain in 5 minutes:\n{}\nwriter:\n{}",
                timeline.join("\n"),
                writer.output()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("replicas over time:\n{}", timeline.join("\n"));
    assert!(
        compared > 10,
        "the stream and the consumer were compared {compared} times"
    );
    for s in stopping {
        s.await??;
    }
    let cold = cold_start.expect("a replica was started").await??;
    println!(
        "cold start: {:.2} s from starting the first enricher process to the first enriched row in Postgres",
        cold.as_secs_f64()
    );

    let client = db.connect().await?;
    let count = |sql: &'static str| {
        let client = &client;
        async move { anyhow::Ok(client.query_one(sql, &[]).await?.get::<_, i64>(0)) }
    };
    wait_for("20,000 rows", Duration::from_secs(60), || async {
        Ok((count("SELECT count(*) FROM records").await? >= 20_000).then_some(()))
    })
    .await?;
    assert_eq!(count("SELECT count(*) FROM records").await?, 20_000);
    assert_eq!(count("SELECT count(*) FROM dead_letters").await?, 0);
    let stats = llm.mock.stats();
    let calls = stats["requests"].as_u64().unwrap_or(0);
    let throttled = stats["throttled"].as_u64().unwrap_or(0);
    let sent: u64 = stats["calls_per_id"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    println!(
        "LLM: {calls} calls, {throttled} answered 429; {sent} record enrichments for 20,000 records"
    );
    assert!(peak >= 3, "the fleet never scaled up: peak {peak}");
    // Scaling down stops replicas with SIGTERM: they finish what they hold, so no record is
    // sent to the LLM twice, and the writer wrote each record once (no replayed version).
    assert_eq!(sent, 20_000, "records sent to the LLM more than once");
    let written = metric(
        writer_ops,
        "tardis_writer_rows_total{",
        &["table=\"records\"", "outcome=\"written\""],
    )
    .await?
    .unwrap_or(0.0);
    assert_eq!(written as u64, 20_000, "record versions written");
    assert!(
        throttled * 50 <= calls,
        "429s above 2 % of calls: {throttled} of {calls}"
    );
    let records_stream = t.names().stream(StreamKind::Records);
    let mut s = t.jetstream().get_stream(&records_stream).await?;
    assert_eq!(
        s.info().await?.state.messages,
        0,
        "the records stream drained"
    );
    writer.terminate()?;
    Ok(())
}
