//! Benchmark: a fleet of 1, 2, 4 and 8 enricher replicas (real processes, release build)
//! against one mock provider that enforces its limits with 429 and `Retry-After`. Every
//! replica is configured with the provider's limits, as an operator would: the fleet shares
//! one budget through NATS.
//!
//! `cargo run --release -p tardis-tests --bin bench-fleet -- [--records N] [--replicas 1,2,4,8]
//!  [--scenario rpm|tpm|latency|unknown|all]`
//!
//! Scenarios: `rpm` (240 requests a minute), `tpm` (400,000 tokens a minute), `latency` (no
//! limits, 500 ms a request: throughput should grow with the replicas), and, only when asked
//! for, `unknown` (the provider allows 240 RPM but the replicas are told nothing: they learn the
//! limit from its 429s and headers; run it with 3 x the records). For each replica count
//! it prints records/s, the most the limits allow, their ratio, and 429s as % of calls.

use std::time::Duration;

use anyhow::{Result, bail};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_common::nats::Names;
use tardis_tests::harness::fleet::{enriched_messages, publish_records, spawn_enricher};
use tardis_tests::harness::{Captured, NatsServer};

#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// The provider's limits; the replicas are configured with them unless `unconfigured`.
    rpm: Option<u64>,
    tpm: Option<u64>,
    latency_ms: u64,
    batch: u64,
    concurrency: u64,
    unconfigured: bool,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "rpm",
        rpm: Some(240),
        tpm: None,
        latency_ms: 300,
        batch: 20,
        concurrency: 4,
        unconfigured: false,
    },
    Scenario {
        name: "tpm",
        rpm: Some(1200),
        tpm: Some(400_000),
        latency_ms: 300,
        batch: 20,
        concurrency: 4,
        unconfigured: false,
    },
    Scenario {
        name: "latency",
        rpm: None,
        tpm: None,
        latency_ms: 500,
        batch: 20,
        concurrency: 2,
        unconfigured: false,
    },
    Scenario {
        name: "unknown",
        rpm: Some(240),
        tpm: None,
        latency_ms: 300,
        batch: 20,
        concurrency: 4,
        unconfigured: true,
    },
];

struct Row {
    replicas: usize,
    rate: f64,
    max: f64,
    calls: u64,
    throttled: u64,
}

async fn run(nats: &NatsServer, s: Scenario, replicas: usize, records: usize) -> Result<Row> {
    let llm = MockLlm::start(MockConfig {
        latency_ms: s.latency_ms,
        rpm: s.rpm,
        tpm: s.tpm,
        ..MockConfig::default()
    })
    .await?;
    let prefix = format!("fleet{}{replicas}", s.name);
    let names = Names::with_prefix(&prefix);
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let chunks = publish_records(&js, &names, "bench", records, 100).await?;
    let mut env = vec![
        ("LLM_BATCH_SIZE", s.batch.to_string()),
        ("LLM_CONCURRENCY", s.concurrency.to_string()),
        ("ENRICH_BATCH_LINGER", "20ms".to_string()),
    ];
    if let (Some(r), false) = (s.rpm, s.unconfigured) {
        env.push(("LLM_RPM", r.to_string()));
    }
    if let (Some(t), false) = (s.tpm, s.unconfigured) {
        env.push(("LLM_TPM", t.to_string()));
    }
    let started = tokio::time::Instant::now();
    let fleet: Vec<Captured> = (0..replicas)
        .map(|_| spawn_enricher(&nats.url(), &prefix, &llm.endpoint(), &env))
        .collect::<Result<_>>()?;
    while enriched_messages(&js, &names).await? < chunks {
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("not finished after 30 minutes:\n{}", fleet[0].output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for e in fleet {
        tokio::task::spawn_blocking(move || e.terminate()).await??;
    }
    let stats = llm.mock.stats();
    let calls = stats["requests"].as_u64().unwrap_or(0);
    let throttled = stats["throttled"].as_u64().unwrap_or(0);
    let tokens_per_record = stats["tokens"].as_f64().unwrap_or(0.0) / records as f64;
    let by_rpm = s
        .rpm
        .map_or(f64::INFINITY, |r| r as f64 / 60.0 * s.batch as f64);
    let by_tpm = s.tpm.map_or(f64::INFINITY, |t| {
        t as f64 / 60.0 / tokens_per_record.max(1.0)
    });
    let by_latency = replicas as f64 * s.concurrency as f64 * s.batch as f64
        / (s.latency_ms as f64 / 1000.0).max(0.001);
    Ok(Row {
        replicas,
        rate: records as f64 / secs,
        max: by_rpm.min(by_tpm).min(by_latency),
        calls,
        throttled,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut records = 3000usize;
    let mut counts = vec![1usize, 2, 4, 8];
    let mut only: Option<String> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--records" => records = value.replace('_', "").parse()?,
            "--replicas" => {
                counts = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--scenario" => only = Some(value).filter(|v| v != "all"),
            other => bail!("unknown flag {other}"),
        }
    }
    // Build the release binaries before any clock starts.
    tardis_tests::harness::bins::bin("enricher")?;
    let nats = NatsServer::start().await?;
    for s in SCENARIOS {
        match only.as_deref() {
            Some(o) if o != s.name => continue,
            None if s.unconfigured => continue,
            _ => {}
        }
        println!(
            "\nscenario {}: provider limits {} RPM, {} TPM; latency {} ms; batch {}; {} requests in flight per replica; {records} records; {}",
            s.name,
            s.rpm.map_or("no".into(), |r| r.to_string()),
            s.tpm.map_or("no".into(), |t| t.to_string()),
            s.latency_ms,
            s.batch,
            s.concurrency,
            if s.unconfigured {
                "the replicas are told no limit"
            } else {
                "every replica configured with the provider's limits"
            }
        );
        println!("replicas   records/s   limits' max   ratio    calls   429s   429 % of calls");
        let mut first_rate = None;
        for &n in &counts {
            let r = run(&nats, s, n, records).await?;
            first_rate.get_or_insert(r.rate);
            println!(
                "{:>8}   {:>9.1}   {:>11.1}   {:>4.0} %   {:>6}   {:>4}   {:>6.2} %{}",
                r.replicas,
                r.rate,
                r.max,
                r.rate / r.max * 100.0,
                r.calls,
                r.throttled,
                r.throttled as f64 / r.calls.max(1) as f64 * 100.0,
                if s.rpm.is_none() && s.tpm.is_none() {
                    format!(
                        "   x{:.2} of 1 replica",
                        r.rate / first_rate.unwrap_or(r.rate)
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
