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
//! the demo source's records in requests built by the enricher's protocol code at batches of
//! 1, 5, 20, the default and 50, answered by mock-llm's answer function; it prints per batch
//! the whole prompt's characters per character of the records' JSON (the prompt overhead),
//! and tokens per record against the floor: the record's own tokens plus its own result's
//! (four characters a token, as the mock and the budget estimate count).

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
        return overhead(a.records.clamp(100, 100_000)).await;
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

/// Tokens per record against the floor, for demo records, per batch size: the requests are
/// built by the enricher's own protocol code (system prompt, user message, request body) and
/// answered by mock-llm's answer function, so what is counted is exactly what would be sent
/// and received; tokens are counted as the mock and the enricher's budget estimate them
/// (four characters a token).
async fn overhead(records: usize) -> Result<()> {
    use enricher::protocol;
    let env: std::collections::HashMap<String, String> = [(
        "PROCESSOR_ENDPOINT".to_string(),
        "http://127.0.0.1:9/v1/chat/completions".to_string(),
    )]
    .into();
    let mut reader = tardis_common::config::Reader::new(&env);
    let settings = enricher::config::LlmSettings::read(&mut reader);
    reader.finish()?;
    let schema = enricher::schema::EnrichmentSchema::default();
    let system = protocol::system_prompt(None, &schema);
    let demo = devtools::demo_source::Demo::new(
        devtools::demo_source::DemoConfig::default(),
        chrono::Utc::now(),
    );
    let payloads: Vec<(String, Box<serde_json::value::RawValue>)> = (1..=records as u64)
        .map(|i| {
            let kind = if i % 2 == 0 {
                devtools::demo_source::Kind::MarketData
            } else {
                devtools::demo_source::Kind::UserEvents
            };
            let json = demo.record(kind, i).to_string();
            Ok((
                i.to_string(),
                serde_json::value::RawValue::from_string(json)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mean = payloads.iter().map(|(_, p)| p.get().len()).sum::<usize>() as f64 / records as f64;
    println!(
        "{records} demo records, {mean:.0} characters of JSON each; system prompt {} characters; default batch {}",
        system.len(),
        settings.batch_size
    );
    println!(
        "{:>7} {:>9} {:>15} {:>14} {:>13} {:>7}",
        "batch", "requests", "prompt/records", "tokens/record", "floor/record", "ratio"
    );
    let tokens = |chars: usize| chars.div_ceil(4);
    for (label, batch) in [
        ("1".to_string(), 1),
        ("5".to_string(), 5),
        ("20".to_string(), 20),
        (
            format!("{} (default)", settings.batch_size),
            settings.batch_size as usize,
        ),
        ("50".to_string(), 50),
    ] {
        let (mut requests, mut prompt_chars, mut record_chars) = (0usize, 0usize, 0usize);
        let (mut sent_tokens, mut floor_tokens) = (0usize, 0usize);
        for group in payloads.chunks(batch) {
            let pairs: Vec<(&str, &serde_json::value::RawValue)> = group
                .iter()
                .map(|(id, p)| (id.as_str(), p.as_ref()))
                .collect();
            let user = protocol::user_message(&pairs);
            let body = protocol::request_body(
                &settings.model,
                &system,
                &user,
                settings.temperature,
                settings.max_tokens_per_record * group.len() as u32 + 50,
                settings.response_format,
                &schema,
            );
            let answer = devtools::mock_llm::good_answer(&body.to_value());
            let content = answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default();
            // The answer must be one the enricher reads; each result's own text is counted.
            protocol::results(content, &schema).map_err(anyhow::Error::msg)?;
            let parsed: serde_json::Value = serde_json::from_str(content)?;
            let results = parsed["results"].as_array().cloned().unwrap_or_default();
            requests += 1;
            prompt_chars += system.len() + user.len();
            let own: usize = group.iter().map(|(_, p)| p.get().len()).sum();
            record_chars += own;
            sent_tokens += tokens(system.len() + user.len()) + tokens(content.len());
            floor_tokens += group
                .iter()
                .map(|(_, p)| tokens(p.get().len()))
                .sum::<usize>()
                + results
                    .iter()
                    .map(|r| tokens(r.to_string().len()))
                    .sum::<usize>();
        }
        let per_record = sent_tokens as f64 / records as f64;
        let floor = floor_tokens as f64 / records as f64;
        println!(
            "{label:>7} {requests:>9} {:>14.3}x {per_record:>14.1} {floor:>13.1} {:>6.2}x",
            prompt_chars as f64 / record_chars as f64,
            per_record / floor
        );
    }
    Ok(())
}
