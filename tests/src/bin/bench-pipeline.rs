//! Benchmark: the whole pipeline's rows/s with an instant LLM, beside a plain `COPY` of the
//! same rows into the same Postgres in the same run.
//!
//! `cargo run --release -p tardis-tests --bin bench-pipeline -- [RECORDS_PER_SOURCE] [RUNS]`
//! (default 50000, 3)
//!
//! Demo-source with two sources of RECORDS_PER_SOURCE records, the mock LLM answering at once,
//! one `fetcher run`, two enrichers and one writer — release builds, real processes, started
//! together — on a nats-server with `sync_interval: always` (every JetStream write synced)
//! and Postgres. Timed from the first process started to the last row committed; then the
//! same rows are read back and COPYed (binary) into a table of the same shape and indexes.
//! Prints the conditions, then for each run (a fresh nats-server and database each) each
//! worker's peak RSS, both rates, where the CPU went (per process, in core-seconds per 100,000
//! records, beside what the run's cores had) and its ratio; the median of the runs' ratios
//! last (on a shared machine one run's `COPY` alone varies by a third). Then what a row costs
//! in CPU, `COPY`'s (Postgres and this client) against the pipeline's (every process): the
//! pipeline spreads over the cores where one `COPY` keeps about one busy, so with every core
//! busy the rate ratio is bounded by about the cores × this cost ratio.
//! `WRITER_*`, `ENRICH_*`, `LLM_*` and `CHUNK_SIZE` variables in the environment reach the
//! workers.

use anyhow::{Context, Result};
use tardis_tests::bench::{PipelineRun, conditions, copy_baseline_with_cpu};
use tardis_tests::harness::NatsServer;

/// One run's figures: rows/s of the pipeline and of `COPY`, their ratio, and a row's CPU,
/// `COPY`'s / the pipeline's.
struct Measured {
    pipeline: f64,
    copy: f64,
    ratio: f64,
    cost: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let number = |i: usize, what: &str, default: u64| -> Result<u64> {
        std::env::args()
            .nth(i)
            .map(|s| {
                s.replace('_', "")
                    .parse()
                    .with_context(|| format!("{what} must be a number"))
            })
            .transpose()
            .map(|n| n.unwrap_or(default))
    };
    let per_source = number(1, "RECORDS_PER_SOURCE", 50_000)?;
    let runs = number(2, "RUNS", 3)?.max(1);
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
    println!("{}", conditions());
    println!(
        "pipeline: 1 fetcher run, 2 enrichers, 1 writer; mock LLM with no latency; nats-server sync_interval: always; CHUNK_SIZE {chunk_size}{}; {runs} run(s), each on a fresh nats-server and database",
        extra_env
            .iter()
            .filter(|(k, _)| k != "CHUNK_SIZE")
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>()
    );
    let mut measured = Vec::new();
    for n in 1..=runs {
        // A fresh nats-server: the fetcher's cursors and the streams of a run before would
        // leave this one nothing to fetch.
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, "jetstream { sync_interval: always }\n")?;
        let nats = NatsServer::start_with(&["-c", &conf.display().to_string()]).await?;
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
        let (copied, copy_secs, copy_cpu) = copy_baseline_with_cpu(&client).await?;
        let mib = |k: u64| k as f64 / 1024.0;
        let (p, c) = (r.rows as f64 / r.seconds, copied as f64 / copy_secs);
        println!("run {n} of {runs}");
        println!(
            "  peak RSS: fetcher {:.1} MiB, enricher {:.1} MiB (largest of two), writer {:.1} MiB",
            mib(r.fetcher_kib),
            mib(r.enricher_kib),
            mib(r.writer_kib)
        );
        println!(
            "  {:<10}  {:>10}  {:>9}  {:>10}",
            "", "rows", "seconds", "rows/s"
        );
        println!(
            "  {:<10}  {:>10}  {:>9.2}  {p:>10.0}   (source → fetcher → NATS → enricher → NATS → writer → Postgres)",
            "pipeline", r.rows, r.seconds
        );
        println!(
            "  {:<10}  {copied:>10}  {copy_secs:>9.2}  {c:>10.0}",
            "plain COPY"
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let per = |s: f64| s * 100_000.0 / r.rows as f64;
        let cpu = &r.cpu;
        println!(
            "  CPU, core-seconds per 100,000 records: fetcher {:.2}, enrichers {:.2}, writer {:.2}, nats-server {:.2}, Postgres {}; this benchmark's demo-source and mock LLM {:.2}; total {:.2} of the {:.2} the run had ({cores} cores × {:.2} s)",
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
        let t = &r.timeline;
        println!(
            "  timeline, seconds: first row {:.2}, fetcher done {:.2}, a tenth of the rows {:.2}, nine tenths {:.2}, all {:.2}; between a tenth and nine tenths {:.0} rows/s ({:.0} % of COPY)",
            t.first_row,
            t.fetched,
            t.tenth,
            t.nine_tenths,
            r.seconds,
            t.steady_rate(r.rows),
            t.steady_rate(r.rows) / c * 100.0
        );
        // The CPU a row costs, COPY's against the pipeline's.
        let cost = copy_cpu.map(|copy| copy / copied as f64 / (cpu.total() / r.rows as f64));
        if let Some(copy) = copy_cpu {
            println!(
                "  CPU of the COPY, core-seconds per 100,000 records: {:.2} (Postgres and the client); a row's CPU, COPY / pipeline = {:.0} %",
                copy * 100_000.0 / copied as f64,
                cost.unwrap_or(0.0) * 100.0
            );
        }
        println!("  pipeline / COPY = {:.0} %", p / c * 100.0);
        measured.push(Measured {
            pipeline: p,
            copy: c,
            ratio: p / c,
            cost,
        });
        drop(client);
        let name = r.db.name.clone();
        if let Err(e) = r.db.drop_database().await {
            // The runs measured so far still count; the next may pay for this one's autovacuum.
            eprintln!("warning: could not drop the run's database {name}: {e:#}");
        }
    }
    // The median; of an even number of runs, the mean of the middle two.
    let median = |f: fn(&Measured) -> f64| {
        let mut v: Vec<f64> = measured.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    println!(
        "medians: pipeline {:.0} rows/s, plain COPY {:.0} rows/s",
        median(|m| m.pipeline),
        median(|m| m.copy)
    );
    println!(
        "ratio: pipeline / COPY = {:.0} % (median of {runs} run(s); run by run: {})",
        median(|m| m.ratio) * 100.0,
        measured
            .iter()
            .map(|m| format!("{:.0} %", m.ratio * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if measured.iter().all(|m| m.cost.is_some()) {
        println!(
            "a row's CPU, COPY / pipeline = {:.0} % (median; run by run: {})",
            median(|m| m.cost.unwrap_or(0.0)) * 100.0,
            measured
                .iter()
                .map(|m| format!("{:.0} %", m.cost.unwrap_or(0.0) * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
