//! The enricher's configuration: the common sections plus the LLM endpoint.

use std::time::Duration;

use tardis_common::Secret;
use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader};
use tardis_common::telemetry::TelemetrySettings;
use url::Url;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub llm: LlmSettings,
}

/// The OpenAI-compatible chat-completions endpoint.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `PROCESSOR_ENDPOINT`: the full URL of `/chat/completions` (as in the legacy ConfigMap).
    pub endpoint: Url,
    /// `LLM_API_KEY`, or the legacy `HOLYSHEEP_API_KEY`; optional for local providers.
    pub api_key: Option<Secret<String>>,
    /// `LLM_MODEL`, default `deepseek-v3.2`.
    pub model: String,
    /// `LLM_BATCH_SIZE`: records per request, default 20.
    pub batch_size: u32,
    /// `LLM_TIMEOUT`: one request, default 60 s.
    pub timeout: Duration,
}

impl LlmSettings {
    pub const DEFAULT_MODEL: &'static str = "deepseek-v3.2";

    pub fn read(r: &mut Reader<'_>) -> Self {
        let endpoint = match r.string("PROCESSOR_ENDPOINT") {
            None => {
                r.problem(
                    "PROCESSOR_ENDPOINT",
                    "is not set",
                    "set it to the full chat-completions URL, for example PROCESSOR_ENDPOINT=https://api.holysheep.ai/v1/chat/completions",
                );
                None
            }
            Some(_) => r.http_url(
                "PROCESSOR_ENDPOINT",
                "https://api.holysheep.ai/v1/chat/completions",
            ),
        };
        Self {
            endpoint: endpoint.unwrap_or_else(|| {
                Url::parse("http://127.0.0.1/chat/completions").expect("placeholder URL parses")
            }),
            api_key: r
                .secret("LLM_API_KEY")
                .or_else(|| r.secret("HOLYSHEEP_API_KEY")),
            model: r
                .string("LLM_MODEL")
                .unwrap_or_else(|| Self::DEFAULT_MODEL.to_string()),
            batch_size: r.positive_u32("LLM_BATCH_SIZE", 20),
            timeout: r.duration("LLM_TIMEOUT", Duration::from_secs(60)),
        }
    }
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let llm = LlmSettings::read(&mut r);
        r.finish()?;
        Ok(Self { common, llm })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
