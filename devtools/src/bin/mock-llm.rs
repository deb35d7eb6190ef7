//! mock-llm: an OpenAI-compatible chat-completions server (see `devtools::mock_llm`).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use devtools::mock_llm::{self, Mock, MockConfig};

/// Serves `POST /v1/chat/completions` with deterministic enrichments and switchable faults.
#[derive(Debug, Parser)]
#[command(name = "mock-llm", version, about)]
struct Args {
    #[arg(long, env = "MOCK_LISTEN", default_value = "0.0.0.0:8082")]
    listen: SocketAddr,
    #[arg(long, env = "MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Requests per minute; more get 429.
    #[arg(long, env = "MOCK_RPM")]
    rpm: Option<u64>,
    /// Tokens per minute; more get 429.
    #[arg(long, env = "MOCK_TPM")]
    tpm: Option<u64>,
    #[arg(long, env = "MOCK_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    #[arg(long, env = "MOCK_INVALID_JSON_RATE", default_value_t = 0.0)]
    invalid_json_rate: f64,
    #[arg(long, env = "MOCK_TRUNCATE_RATE", default_value_t = 0.0)]
    truncate_rate: f64,
    #[arg(long, env = "MOCK_DROP_ID_RATE", default_value_t = 0.0)]
    drop_id_rate: f64,
    #[arg(long, env = "MOCK_INVENT_ID_RATE", default_value_t = 0.0)]
    invent_id_rate: f64,
    /// Records containing this text always get an invalid result.
    #[arg(long, env = "MOCK_POISON")]
    poison: Option<String>,
    /// Require `Authorization: Bearer <key>`.
    #[arg(long, env = "MOCK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().json().init();
    let a = Args::parse();
    let config = MockConfig {
        latency_ms: a.latency_ms,
        rpm: a.rpm,
        tpm: a.tpm,
        window_secs: None,
        fail_rate: a.fail_rate,
        invalid_json_rate: a.invalid_json_rate,
        truncate_rate: a.truncate_rate,
        drop_id_rate: a.drop_id_rate,
        invent_id_rate: a.invent_id_rate,
        poison: a.poison,
        poison_calls: None,
        api_key: a.api_key,
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    tracing::info!(addr = %a.listen, "mock-llm listening");
    let shutdown = devtools::shutdown_on_signal()?;
    mock_llm::serve(listener, Arc::new(Mock::new(config)), shutdown).await?;
    Ok(())
}
