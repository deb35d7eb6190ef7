//! Benchmark: the whole pipeline's rows/s with an instant LLM, beside a plain `COPY` of the
//! same rows into the same Postgres in the same run.
//!
//! `cargo run --release -p tardis-tests --bin bench-pipeline -- [RECORDS_PER_SOURCE]`
//! (default 50000)
//!
//! Demo-source with two sources of RECORDS_PER_SOURCE records, the mock LLM answering at once,
//! one `fetcher run`, two enrichers and one writer — release builds, real processes, started
//! together — on a nats-server with `sync_interval: always` (every JetStream write synced)
//! and Postgres. Timed from the first process started to the last row committed; then the
//! same rows are read back and COPYed (binary) into a table of the same shape and indexes.
//! Prints the conditions, each worker's peak RSS, both rates, where the CPU went (per process,
//! in core-seconds per 100,000 records, beside what the run's cores had), and the ratio last.
//! `WRITER_*`, `ENRICH_*`, `LLM_*` and `CHUNK_SIZE` variables in the environment reach the
//! workers.

use anyhow::{Context, Result};
use tardis_tests::bench::{PipelineRun, conditions, copy_baseline};
use tardis_tests::harness::NatsServer;

#[tokio::main]
async fn main() -> Result<()> {
    let per_source: u64 = std::env::args()
        .nth(1)
        .map(|s| {
            s.replace('_', "")
                .parse()
                .context("RECORDS_PER_SOURCE must be a number")
        })
        .transpose()?
        .unwrap_or(50_000);
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "jetstream { sync_interval: always }\n")?;
    let nats = NatsServer::start_with(&["-c", &conf.display().to_string()]).await?;
    let extra_env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            ["WRITER_", "ENRICH_", "LLM_", "FETCH_"]
                .iter()
                .any(|p| k.starts_with(p))
                || k == "CHUNK_SIZE"
        })
        .collect();
    let chunk_size = extra_env
        .iter()
        .find(|(k, _)| k == "CHUNK_SIZE")
        .map(|(_, v)| v.parse())
        .transpose()
        .context("CHUNK_SIZE must be a number")?
        .unwrap_or(1000);
    let run = PipelineRun {
        per_source,
        chunk_size,
        in_flight: 16,
        enrichers: 2,
        llm_latency_ms: 0,
        writer_after_fetcher: false,
        extra_env: extra_env.clone(),
    };
    let r = run.run(&nats).await?;
    let client = r.db.connect().await?;
    let (copied, copy_secs) = copy_baseline(&client).await?;
    let mib = |k: u64| k as f64 / 1024.0;
    let (p, c) = (r.rows as f64 / r.seconds, copied as f64 / copy_secs);
    println!("{}", conditions());
    println!(
        "pipeline: 1 fetcher run, 2 enrichers, 1 writer; mock LLM with no latency; nats-server sync_interval: always; CHUNK_SIZE {chunk_size}{}",
        extra_env
            .iter()
            .filter(|(k, _)| k != "CHUNK_SIZE")
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>()
    );
    println!(
        "peak RSS: fetcher {:.1} MiB, enricher {:.1} MiB (largest of two), writer {:.1} MiB",
        mib(r.fetcher_kib),
        mib(r.enricher_kib),
        mib(r.writer_kib)
    );
    println!("{:>10}  {:>9}  {:>10}", "rows", "seconds", "rows/s");
    println!(
        "pipeline   {:>10}  {:>9.2}  {p:>10.0}   (source → fetcher → NATS → enricher → NATS → writer → Postgres)",
        r.rows, r.seconds
    );
    println!("plain COPY {copied:>10}  {copy_secs:>9.2}  {c:>10.0}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per = |s: f64| s * 100_000.0 / r.rows as f64;
    let cpu = &r.cpu;
    println!(
        "CPU, core-seconds per 100,000 records: fetcher {:.2}, enrichers {:.2}, writer {:.2}, nats-server {:.2}, Postgres {}; this benchmark's demo-source and mock LLM {:.2}; total {:.2} of the {:.2} the run had ({cores} cores × {:.2} s)",
        per(cpu.fetcher),
        per(cpu.enrichers),
        per(cpu.writer),
        per(cpu.nats),
        cpu.postgres
            .map_or("n/a (not a local process)".to_string(), |s| format!(
                "{:.2}",
                per(s)
            )),
        per(cpu.bench),
        per(cpu.total()),
        per(cores * r.seconds),
        r.seconds
    );
    println!("ratio: pipeline / COPY = {:.0} %", p / c * 100.0);
    Ok(())
}
