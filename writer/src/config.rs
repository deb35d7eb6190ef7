//! The writer's configuration: the common sections plus Postgres.

use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader};
use tardis_common::postgres::PostgresSettings;
use tardis_common::telemetry::TelemetrySettings;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub postgres: PostgresSettings,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let postgres = PostgresSettings::read(&mut r);
        r.finish()?;
        Ok(Self { common, postgres })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
