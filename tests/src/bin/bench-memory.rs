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

use anyhow::{Context, Result};
use tardis_tests::bench::{PipelineRun, conditions};
use tardis_tests::harness::NatsServer;

/// One run; returns the peak RSS in KiB of (fetcher, enrichers (max of two), writer) and the
/// seconds it took.
async fn run(
    nats: &NatsServer,
    per_source: u64,
    chunk_size: u64,
    in_flight: u64,
) -> Result<(u64, u64, u64, f64)> {
    let r = PipelineRun {
        per_source,
        chunk_size,
        in_flight,
        enrichers: 2,
        llm_latency_ms: 50,
        writer_after_fetcher: true,
        extra_env: vec![],
    }
    .run(nats)
    .await?;
    Ok((r.fetcher_kib, r.enricher_kib, r.writer_kib, r.seconds))
}

#[tokio::main]
async fn main() -> Result<()> {
    let per_source: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().context("RECORDS_PER_SOURCE must be a number"))
        .transpose()?
        .unwrap_or(20_000);
    let nats = NatsServer::start().await?;
    println!("{}", conditions());
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
