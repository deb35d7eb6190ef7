//! Benchmark: N records through the enricher against mock-llm with a latency and RPM/TPM
//! limits.
//!
//! `cargo run --release -p tardis-tests --bin bench-enrich -- [--records N] [--latency-ms L]
//!  [--rpm R] [--tpm T] [--batch B] [--concurrency C]`
//!
//! Publishes N records (chunks of 100) into a fresh records stream, runs one `enricher`
//! (release build, a real process) with client-side limits equal to the provider's, and
//! prints records/s, the theoretical maximum the limits allow, their ratio and the 429s.
//!
//! `bench-enrich -- --overhead [--records N]` measures what a record costs in tokens instead:
//! the demo source's records (about 134 characters of JSON) through the enricher at the
//! default batch and at batches of 1, 5, 20 and 50, against mock-llm (no limits), and prints
//! per batch the whole prompt's characters per character of the records' JSON (the prompt
//! overhead), and tokens per record against the floor: the record's own tokens plus its own
//! result's (about four characters a token, as the mock counts).

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use devtools::mock_llm::{MockConfig, Running as MockLlm};
use tardis_common::nats::{Names, StreamKind};
use tardis_tests::harness::fleet::publish_records;
use tardis_tests::harness::{Captured, NatsServer, bins, free_port};

struct Args {
    overhead: bool,
    records: usize,
    latency_ms: u64,
    rpm: u64,
    tpm: u64,
    batch: u64,
    concurrency: u64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        overhead: false,
        records: 3000,
        latency_ms: 300,
        rpm: 600,
        tpm: 400_000,
        batch: 20,
        concurrency: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--overhead" {
            a.overhead = true;
            continue;
        }
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
    if a.overhead {
        return overhead(a.records.min(2000)).await;
    }
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

/// Tokens per record against the floor, for demo records, per batch size.
async fn overhead(records: usize) -> Result<()> {
    let nats = NatsServer::start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let demo = devtools::demo_source::Demo::new(
        devtools::demo_source::DemoConfig::default(),
        chrono::Utc::now(),
    );
    let payloads: Vec<(String, String)> = (1..=records as u64)
        .map(|i| {
            let kind = if i % 2 == 0 {
                devtools::demo_source::Kind::MarketData
            } else {
                devtools::demo_source::Kind::UserEvents
            };
            (i.to_string(), demo.record(kind, i).to_string())
        })
        .collect();
    let mean = payloads.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / records as f64;
    println!("{records} demo records, {mean:.0} characters of JSON each on average");
    println!(
        "{:>7} {:>9} {:>17} {:>14} {:>14} {:>8}",
        "batch", "requests", "prompt/records", "tokens/record", "floor/record", "ratio"
    );
    for (label, batch) in [
        ("1", Some(1)),
        ("5", Some(5)),
        ("20", Some(20)),
        ("default", None),
        ("50", Some(50)),
    ] {
        let llm = MockLlm::start(MockConfig::default()).await?;
        let prefix = format!("benchoverhead{label}");
        let names = Names::with_prefix(&prefix);
        let chunks = tardis_tests::harness::fleet::publish_payloads(
            &js,
            &names,
            "demo",
            payloads.clone(),
            100,
        )
        .await?;
        let mut cmd = Command::new(bins::bin("enricher")?);
        cmd.env_clear()
            .env("NATS_URL", nats.url())
            .env("TARDIS_PREFIX", &prefix)
            .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
            .env("PROCESSOR_ENDPOINT", llm.endpoint())
            .env("ENRICH_BATCH_LINGER", "200ms")
            .env("RUST_LOG", "warn");
        if let Some(b) = batch {
            cmd.env("LLM_BATCH_SIZE", b.to_string());
        }
        let enricher = Captured::spawn(cmd)?;
        let started = tokio::time::Instant::now();
        let mut stream = js.get_stream(names.stream(StreamKind::Enriched)).await?;
        while stream.info().await?.state.messages < chunks {
            if started.elapsed() > Duration::from_secs(600) {
                bail!("not finished after 10 minutes:\n{}", enricher.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::spawn_blocking(move || enricher.terminate()).await??;
        let stats = llm.mock.stats();
        let n = |k: &str| stats[k].as_f64().unwrap_or(0.0);
        let served = n("records_served").max(1.0);
        let per_record = (n("prompt_tokens") + n("completion_tokens")) / served;
        let floor = ((n("record_chars") + n("result_chars")) / 4.0) / served;
        println!(
            "{label:>7} {:>9} {:>16.2}x {:>14.1} {:>14.1} {:>7.2}x",
            n("served"),
            n("prompt_chars") / n("record_chars").max(1.0),
            per_record,
            floor,
            per_record / floor.max(1e-9)
        );
    }
    Ok(())
}
