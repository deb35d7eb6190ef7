//! Benchmark: each worker's peak memory under load, for sizing Kubernetes requests and limits.
//!
//! `cargo run --release -p tardis-tests --bin bench-memory -- [RECORDS_PER_SOURCE]` (default 20000)
//!
//! The whole pipeline as release processes (one `fetcher run`, two enrichers, one writer) on a
//! real nats-server and Postgres, demo-source (two sources of RECORDS_PER_SOURCE records each)
//! and the mock LLM (50 ms a request), run three times: at the defaults of the compose stack
//! and the legacy ConfigMap (`CHUNK_SIZE` 1000, `ENRICH_MAX_IN_FLIGHT` 16), at 4 × `CHUNK_SIZE`,
//! and at 4 × `ENRICH_MAX_IN_FLIGHT`.
//! The fetcher and the enrichers start before anything is written, so the whole backlog waits
//! in NATS while they run: the enrichers' memory is measured with more work queued than they
//! may take. Each process's peak RSS is the kernel's high-water mark (`VmHWM` in
//! `/proc/<pid>/status`), read every 50 ms until it exits.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result, bail};
use devtools::demo_source::{DemoConfig, Running as DemoSource};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_tests::harness::{NatsServer, TestDb, bins, free_port};

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn spawn(name: &str, args: &[&str], env: &BTreeMap<String, String>) -> Result<Child> {
    Ok(Command::new(bins::bin(name)?)
        .args(args)
        .env_clear()
        .envs(env)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

async fn rows(db: &TestDb) -> Result<i64> {
    Ok(db
        .connect()
        .await?
        .query_one("SELECT count(*) FROM records", &[])
        .await?
        .get(0))
}

/// One run; returns the peak RSS in KiB of (fetcher, enrichers (max of two), writer).
async fn run(
    nats: &NatsServer,
    per_source: u64,
    chunk_size: u64,
    in_flight: u64,
) -> Result<(u64, u64, u64, f64)> {
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: per_source,
        rate: (per_source as f64 / 3600.0).max(1.0),
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: 50,
        ..MockConfig::default()
    })
    .await?;
    let sources = serde_json::json!([
        {"name": "market_data", "url": demo.url("/v2/market/quotes"), "auth_type": "bearer", "initial_lookback": "2h", "max_pages": 100000},
        {"name": "user_events", "url": demo.url("/v2/events"), "auth_type": "api_key", "initial_lookback": "2h", "max_pages": 100000}
    ]);
    let env: BTreeMap<String, String> = [
        ("NATS_URL", nats.url()),
        ("TARDIS_PREFIX", format!("mem{chunk_size}x{in_flight}")),
        ("DATABASE_URL", db.url.clone()),
        ("PGSSLMODE", "disable".into()),
        ("DATA_SOURCES", sources.to_string()),
        ("DATA_API_KEY", "your-data-source-api-key".into()),
        ("HOLYSHEEP_API_KEY", "mock-llm-key".into()),
        ("PROCESSOR_ENDPOINT", llm.endpoint()),
        ("CHUNK_SIZE", chunk_size.to_string()),
        ("ENRICH_MAX_IN_FLIGHT", in_flight.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let migrate = Command::new(bins::bin("writer")?)
        .arg("migrate")
        .env_clear()
        .envs(&env)
        .output()?;
    if !migrate.status.success() {
        bail!(
            "writer migrate: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    let started = Instant::now();
    let enrichers = [spawn("enricher", &[], &env)?, spawn("enricher", &[], &env)?];
    let mut fetcher = spawn("fetcher", &["run"], &env)?;
    // The writer starts once the fetcher has published everything: the backlog is queued.
    let mut peaks = [0u64; 4];
    let mut writer: Option<Child> = None;
    let total = i64::try_from(2 * per_source)?;
    loop {
        let mut pids = vec![fetcher.id(), enrichers[0].id(), enrichers[1].id()];
        if let Some(w) = &writer {
            pids.push(w.id());
        }
        for (i, pid) in pids.iter().enumerate() {
            if let Some(kib) = peak_rss_kib(*pid) {
                peaks[i] = peaks[i].max(kib);
            }
        }
        if writer.is_none() && fetcher.try_wait()?.is_some() {
            writer = Some(spawn("writer", &[], &env)?);
        }
        if writer.is_some() && rows(&db).await? >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("{} of {total} rows after 15 minutes", rows(&db).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let status = fetcher.wait()?;
    if !status.success() {
        bail!("fetcher run: {status}");
    }
    for mut c in enrichers.into_iter().chain(writer) {
        // Already gone is fine: only its exit is awaited.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(c.id())?),
            nix::sys::signal::Signal::SIGTERM,
        )
        .ok();
        c.wait()?;
    }
    Ok((peaks[0], peaks[1].max(peaks[2]), peaks[3], secs))
}

#[tokio::main]
async fn main() -> Result<()> {
    let per_source: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().context("RECORDS_PER_SOURCE must be a number"))
        .transpose()?
        .unwrap_or(20_000);
    let nats = NatsServer::start().await?;
    println!(
        "{:>10} {:>7} {:>10} {:>8} {:>12} {:>13} {:>11}",
        "records", "chunk", "in flight", "seconds", "fetcher MiB", "enricher MiB", "writer MiB"
    );
    let mut results = Vec::new();
    for (chunk, in_flight) in [(1000, 16), (4000, 16), (1000, 64)] {
        let (f, e, w, secs) = run(&nats, per_source, chunk, in_flight).await?;
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "{:>10} {:>7} {:>10} {:>8.1} {:>12.1} {:>13.1} {:>11.1}",
            2 * per_source,
            chunk,
            in_flight,
            secs,
            mib(f),
            mib(e),
            mib(w)
        );
        results.push((f, e, w));
    }
    let ratio = |a: u64, b: u64| b as f64 / a.max(1) as f64;
    for (i, what) in [(1, "4 x CHUNK_SIZE"), (2, "4 x ENRICH_MAX_IN_FLIGHT")] {
        println!(
            "peak RSS at {what} / at the defaults: fetcher {:.2}x, enricher {:.2}x, writer {:.2}x",
            ratio(results[0].0, results[i].0),
            ratio(results[0].1, results[i].1),
            ratio(results[0].2, results[i].2)
        );
    }
    Ok(())
}
