//! demo-source: serves the legacy source API (see `devtools::demo_source`).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use devtools::demo_source::{self, Demo, DemoConfig, Faults};

/// Serves the legacy source API for `market_data` and `user_events` with generated records.
#[derive(Debug, Parser)]
#[command(name = "demo-source", version, about)]
struct Args {
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// The credential both sources expect (bearer for market_data, X-API-Key for user_events).
    #[arg(
        long,
        env = "DATA_API_KEY",
        default_value = "your-data-source-api-key",
        hide_env_values = true
    )]
    api_key: String,
    /// Records per source that exist at start.
    #[arg(long, env = "DEMO_BACKLOG", default_value_t = 200)]
    backlog: u64,
    /// New records per second per source.
    #[arg(long, env = "DEMO_RATE", default_value_t = 2.0)]
    rate: f64,
    /// Records sharing one updated_at.
    #[arg(long, env = "DEMO_TIE_GROUP", default_value_t = 5)]
    tie_group: u64,
    /// Serve only the backlog: no new records.
    #[arg(long, env = "DEMO_FROZEN")]
    frozen: bool,
    #[arg(long, env = "DEMO_THROTTLE_EVERY")]
    throttle_every: Option<u64>,
    #[arg(long, env = "DEMO_RETRY_AFTER", default_value_t = 1)]
    retry_after: u64,
    #[arg(long, env = "DEMO_FAIL_EVERY")]
    fail_every: Option<u64>,
    #[arg(long, env = "DEMO_MALFORMED_EVERY")]
    malformed_every: Option<u64>,
    #[arg(long, env = "DEMO_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().json().init();
    let a = Args::parse();
    anyhow::ensure!(a.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(a.tie_group > 0, "--tie-group must be positive");
    let config = DemoConfig {
        api_key: a.api_key,
        backlog: a.backlog,
        rate: a.rate,
        tie_group: a.tie_group,
        frozen: a.frozen,
        faults: Faults {
            throttle_every: a.throttle_every,
            retry_after_secs: a.retry_after,
            fail_every: a.fail_every,
            malformed_every: a.malformed_every,
            latency_ms: a.latency_ms,
        },
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    tracing::info!(addr = %a.listen, backlog = config.backlog, rate = config.rate, "demo-source listening");
    let shutdown = devtools::shutdown_on_signal()?;
    demo_source::serve(
        listener,
        Arc::new(Demo::new(config, chrono::Utc::now())),
        shutdown,
    )
    .await?;
    Ok(())
}
