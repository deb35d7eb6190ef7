//! Benchmark: N records through the enricher against mock-llm with a latency and RPM/TPM
//! limits.
//!
//! `cargo run --release -p tardis-tests --bin bench-enrich -- [--records N] [--latency-ms L]
//!  [--rpm R] [--tpm T] [--batch B] [--concurrency C]`
//!
//! Publishes N records (chunks of 100) into a fresh records stream, runs one `enricher`
//! (release build, a real process) with client-side limits equal to the provider's, and
//! prints records/s, the theoretical maximum the limits allow, their ratio and the 429s.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_common::nats::{Names, StreamKind};
use tardis_tests::harness::fleet::publish_records;
use tardis_tests::harness::{Captured, NatsServer, bins, free_port};

struct Args {
    records: usize,
    latency_ms: u64,
    rpm: u64,
    tpm: u64,
    batch: u64,
    concurrency: u64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        records: 3000,
        latency_ms: 300,
        rpm: 600,
        tpm: 400_000,
        batch: 20,
        concurrency: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: u64 = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?
            .replace('_', "")
            .parse()?;
        match flag.as_str() {
            "--records" => a.records = value as usize,
            "--latency-ms" => a.latency_ms = value,
            "--rpm" => a.rpm = value,
            "--tpm" => a.tpm = value,
            "--batch" => a.batch = value,
            "--concurrency" => a.concurrency = value,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let nats = NatsServer::start().await?;
    let llm = MockLlm::start(MockConfig {
        latency_ms: a.latency_ms,
        rpm: Some(a.rpm),
        tpm: Some(a.tpm),
        ..MockConfig::default()
    })
    .await?;
    let names = Names::with_prefix("benchenrich");
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    // Provisions the records and enriched streams, then publishes.
    let chunks = publish_records(&js, &names, "bench", a.records, 100).await?;
    let mut cmd = Command::new(bins::bin("enricher")?);
    cmd.env_clear()
        .env("NATS_URL", nats.url())
        .env("TARDIS_PREFIX", "benchenrich")
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .env("PROCESSOR_ENDPOINT", llm.endpoint())
        .env("LLM_BATCH_SIZE", a.batch.to_string())
        .env("LLM_CONCURRENCY", a.concurrency.to_string())
        .env("LLM_RPM", a.rpm.to_string())
        .env("LLM_TPM", a.tpm.to_string())
        .env("RUST_LOG", "warn");
    let started = tokio::time::Instant::now();
    let enricher = Captured::spawn(cmd)?;
    let mut stream = js.get_stream(names.stream(StreamKind::Enriched)).await?;
    loop {
        if stream.info().await?.state.messages >= chunks {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("not finished after 30 minutes:\n{}", enricher.output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (_, _) = tokio::task::spawn_blocking(move || enricher.terminate()).await??;
    let stats = llm.mock.stats();
    let served = stats["served"].as_u64().unwrap_or(0).max(1);
    let tokens_per_record = stats["tokens"].as_f64().unwrap_or(0.0) / a.records as f64;
    let by_rpm = a.rpm as f64 / 60.0 * a.batch as f64;
    let by_tpm = a.tpm as f64 / 60.0 / tokens_per_record.max(1.0);
    let by_latency =
        a.concurrency as f64 * a.batch as f64 / (a.latency_ms as f64 / 1000.0).max(0.001);
    let max = by_rpm.min(by_tpm).min(by_latency);
    let rate = a.records as f64 / secs;
    println!(
        "records: {}  batch: {}  concurrency: {}  latency: {} ms  rpm: {}  tpm: {}",
        a.records, a.batch, a.concurrency, a.latency_ms, a.rpm, a.tpm
    );
    println!(
        "limits allow: {by_rpm:.0} rec/s by RPM, {by_tpm:.0} rec/s by TPM ({tokens_per_record:.0} tokens/record), {by_latency:.0} rec/s by latency x concurrency"
    );
    println!("theoretical max: {max:.1} records/s");
    println!("measured:        {rate:.1} records/s in {secs:.1} s ({served} requests)");
    println!("ratio:           {:.0} %", rate / max * 100.0);
    println!("429s:            {}", stats["throttled"]);
    Ok(())
}
