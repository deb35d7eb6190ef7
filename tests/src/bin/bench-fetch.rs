//! Benchmark: N records from demo-source through the fetcher into JetStream.
//!
//! `cargo run --release -p tardis-tests --bin bench-fetch -- [N ...]` (default 100000 1000000)
//!
//! For each N: a fresh demo-source holding exactly N `market_data` records, one `fetcher run`
//! (release build, a real process) into a real nats-server, timed; its peak RSS is read from
//! `/proc/<pid>/status` (VmHWM, the kernel's high-water mark) while it runs. Prints one line
//! per N and checks that exactly N records were published.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use devtools::demo_source::{DemoConfig, Running};
use tardis_common::messages::FetchRun;
use tardis_tests::bench::peak_rss_kib;
use tardis_tests::harness::{NatsServer, bins, free_port};

async fn last_run(nats_url: &str, prefix: &str) -> Result<FetchRun> {
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let names = tardis_common::nats::Names::with_prefix(prefix);
    let mut stream = js
        .get_stream(names.stream(tardis_common::nats::StreamKind::Runs))
        .await?;
    let last = stream.info().await?.state.last_sequence;
    let msg = stream.get_raw_message(last).await?;
    Ok(tardis_common::messages::decode(&msg.payload)?)
}

async fn bench(nats: &NatsServer, n: u64) -> Result<(f64, u64)> {
    // One hour of history at whatever rate gives N records, five records per updated_at.
    let demo = Running::start(DemoConfig {
        backlog: n,
        rate: (n as f64 / 3600.0).max(1.0),
        tie_group: 5,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    let prefix = format!("bench{n}");
    let sources = serde_json::json!([{
        "name": "market_data", "url": demo.url("/v2/market/quotes"), "auth_type": "bearer", "initial_lookback": "2h", "max_pages": 100000
    }]);
    let mut child = Command::new(bins::bin("fetcher")?)
        .arg("run")
        .env_clear()
        .env("NATS_URL", nats.url())
        .env("TARDIS_PREFIX", &prefix)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .env("DATA_SOURCES", sources.to_string())
        .env("DATA_API_KEY", "your-data-source-api-key")
        .env("CHUNK_SIZE", "1000")
        .env("TARDIS_STREAM_MAX_BYTES", "-1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let started = tokio::time::Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).ok();
        }
        bail!("fetcher failed for N={n}: {err}");
    }
    let run = last_run(&nats.url(), &prefix).await?;
    if run.records != n {
        bail!(
            "expected {n} records published, the run reports {}",
            run.records
        );
    }
    Ok((elapsed, peak))
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.replace('_', "")
                .parse()
                .context("arguments are record counts")
        })
        .collect::<Result<_>>()?;
    let sizes = if sizes.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        sizes
    };
    let nats = NatsServer::start().await?;
    println!(
        "{:>10}  {:>9}  {:>10}  {:>13}",
        "records", "seconds", "records/s", "peak RSS MiB"
    );
    for n in sizes {
        let (secs, peak_kib) = bench(&nats, n).await?;
        println!(
            "{n:>10}  {secs:>9.2}  {:>10.0}  {:>13.1}",
            n as f64 / secs,
            peak_kib as f64 / 1024.0
        );
    }
    Ok(())
}
