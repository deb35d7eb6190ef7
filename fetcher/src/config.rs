//! The fetcher's configuration: the common sections plus the sources.

use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader, SourcesConfig};
use tardis_common::telemetry::TelemetrySettings;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub sources: SourcesConfig,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let sources = SourcesConfig::read(&mut r);
        r.finish()?;
        Ok(Self { common, sources })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
