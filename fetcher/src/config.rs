//! The fetcher's configuration: the command line (each flag also settable by an environment
//! variable), the common sections, the sources, and optionally Postgres (read-only, for the
//! written checkpoint).

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader};

use crate::sources::SourcesConfig;
use tardis_common::postgres::PostgresSettings;
use tardis_common::telemetry::TelemetrySettings;

/// Tardis fetcher: collects records from HTTP APIs into NATS JetStream.
#[derive(Debug, Clone, Parser)]
#[command(name = "fetcher", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

/// The command line as typed: values are checked by the configuration reader, so a bad one
/// exits 64 with the same kind of message as a bad environment variable.
#[derive(Debug, Clone, Subcommand, PartialEq, Eq)]
pub enum CliCommand {
    /// One pass over the selected sources (default: all), then exit: 0 when every source
    /// succeeded (or was skipped because another fetcher holds it), 1 when one failed, 3 when
    /// one stopped at max_pages.
    Run {
        /// A source to fetch (repeatable).
        #[arg(long = "source", env = "FETCH_SOURCES", value_delimiter = ',')]
        sources: Vec<String>,
    },
    /// Stay up and run each source on its own schedule.
    Daemon {
        /// Also run every source once at start, before waiting for its schedule.
        #[arg(long, env = "FETCH_RUN_AT_START")]
        run_at_start: bool,
    },
    /// Fetch a historical window of one source without moving its cursor.
    Backfill {
        #[arg(long, env = "BACKFILL_SOURCE")]
        source: String,
        /// Start of the window (RFC 3339), inclusive.
        #[arg(long, env = "BACKFILL_SINCE")]
        since: String,
        /// End of the window (RFC 3339), exclusive; default: no end.
        #[arg(long, env = "BACKFILL_UNTIL")]
        until: Option<String>,
    },
    /// Show, set or reset a source's fetch cursor (what the next run starts after).
    #[command(subcommand)]
    Cursor(CursorCommand),
}

/// `fetcher cursor ...`.
#[derive(Debug, Clone, Subcommand, PartialEq, Eq)]
pub enum CursorCommand {
    /// Each source's cursor, records published and whether a run holds it.
    Show {
        /// Only these sources (default: all configured).
        sources: Vec<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a source's cursor: the next run fetches what follows it.
    Set {
        source: String,
        /// The `updated_at` to continue after (RFC 3339, sent to the source as written).
        #[arg(long = "updated-at", conflicts_with = "token")]
        updated_at: Option<String>,
        /// With --updated-at: the id of the last record at that time (records at that time
        /// with a larger id are still fetched); default: none, so all of them are.
        #[arg(long)]
        id: Option<String>,
        /// An opaque continuation token instead (cursor pagination).
        #[arg(long)]
        token: Option<String>,
        /// Who moves it, recorded in fetch_runs.
        #[arg(long, default_value = "an operator")]
        by: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Forget a source's cursor: the next run starts from its initial_lookback.
    Reset {
        source: String,
        /// Who resets it, recorded in fetch_runs.
        #[arg(long, default_value = "an operator")]
        by: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// What to do, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// One pass over the selected sources (default: all).
    Run { sources: Vec<String> },
    /// Each source on its own schedule.
    Daemon { run_at_start: bool },
    /// A historical window of one source, cursor untouched.
    Backfill {
        source: String,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    },
    /// `fetcher cursor ...` (a day-2 command: runs once and prints).
    Cursor(CursorCommand),
}

impl Default for Command {
    fn default() -> Self {
        Command::Run {
            sources: Vec::new(),
        }
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.to_utc())
        .map_err(|e| format!("is not an RFC 3339 time ({e}): {s:?}"))
}

impl CliCommand {
    /// The checked command; every bad value is a problem for `r`.
    fn check(self, r: &mut Reader<'_>) -> Command {
        match self {
            CliCommand::Run { sources } => Command::Run { sources },
            CliCommand::Daemon { run_at_start } => Command::Daemon { run_at_start },
            CliCommand::Cursor(c) => {
                if let CursorCommand::Set {
                    updated_at, token, ..
                } = &c
                {
                    match (updated_at, token) {
                        (None, None) => r.problem(
                            "fetcher cursor set",
                            "needs --updated-at or --token",
                            "for example fetcher cursor set market_data --updated-at 2026-12-01T00:00:00Z",
                        ),
                        (Some(t), _) if parse_time(t).is_err() => r.problem(
                            "--updated-at",
                            format!("is not an RFC 3339 time: {t:?}"),
                            "for example --updated-at 2026-12-01T00:00:00Z",
                        ),
                        _ => {}
                    }
                }
                Command::Cursor(c)
            }
            CliCommand::Backfill {
                source,
                since,
                until,
            } => {
                let mut time = |key: &str, value: &str| match parse_time(value) {
                    Ok(t) => Some(t),
                    Err(problem) => {
                        r.problem(
                            key,
                            problem,
                            format!(
                                "give an RFC 3339 time, for example {key} 2026-01-01T00:00:00Z"
                            ),
                        );
                        None
                    }
                };
                let since_t = time("--since (BACKFILL_SINCE)", &since);
                let until_t = until
                    .as_deref()
                    .and_then(|u| time("--until (BACKFILL_UNTIL)", u));
                Command::Backfill {
                    source,
                    since: since_t.unwrap_or(DateTime::<Utc>::MIN_UTC),
                    until: until_t,
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub sources: SourcesConfig,
    /// Present when `DATABASE_URL` or `PGHOST` is set.
    pub postgres: Option<PostgresSettings>,
    /// `FETCH_LEASE_TTL`: how long a run lease lasts without renewal (default 60 s).
    pub lease_ttl: Duration,
    pub command: Command,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Self::from_env_with(env, Command::default())
    }

    /// The configuration for the command line as typed: a bad flag value is reported with
    /// the environment's problems (exit 64).
    pub fn from_cli(env: &dyn Env, cli: Option<CliCommand>) -> Result<Self, ConfigError> {
        let Some(cli) = cli else {
            return Self::from_env(env);
        };
        let mut r = Reader::new(env);
        let command = cli.check(&mut r);
        match (r.finish(), Self::from_env_with(env, command)) {
            (Ok(()), result) => result,
            (Err(mut cli_problems), Err(env_problems)) => {
                cli_problems.problems.extend(env_problems.problems);
                Err(cli_problems)
            }
            (Err(cli_problems), Ok(_)) => Err(cli_problems),
        }
    }

    /// The configuration for `command` (validated against the sources).
    pub fn from_env_with(env: &dyn Env, command: Command) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let sources = SourcesConfig::read(&mut r);
        let postgres = (r.string("DATABASE_URL").is_some() || r.string("PGHOST").is_some())
            .then(|| PostgresSettings::read(&mut r));
        let lease_ttl = r.duration("FETCH_LEASE_TTL", Duration::from_secs(60));
        let known = |name: &str| sources.sources.is_empty() || sources.source(name).is_some();
        let names = || {
            sources
                .sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &command {
            Command::Run { sources: wanted } => {
                for w in wanted.iter().filter(|w| !known(w)) {
                    r.problem(
                        "--source",
                        format!("unknown source {w:?}"),
                        format!("use one of {}", names()),
                    );
                }
            }
            Command::Backfill {
                source,
                since,
                until,
            } => {
                if !known(source) {
                    r.problem(
                        "--source",
                        format!("unknown source {source:?}"),
                        format!("use one of {}", names()),
                    );
                }
                if until.is_some_and(|u| u <= *since) {
                    r.problem(
                        "--until",
                        "must be later than --since",
                        "for example --since 2026-01-01T00:00:00Z --until 2026-02-01T00:00:00Z",
                    );
                }
            }
            Command::Daemon { .. } => {}
            Command::Cursor(c) => {
                let wanted: Vec<&String> = match c {
                    CursorCommand::Show { sources, .. } => sources.iter().collect(),
                    CursorCommand::Set { source, .. } | CursorCommand::Reset { source, .. } => {
                        vec![source]
                    }
                };
                for w in wanted.into_iter().filter(|w| !known(w)) {
                    r.problem(
                        "fetcher cursor",
                        format!("unknown source {w:?}"),
                        format!("use one of {}", names()),
                    );
                }
            }
        }
        r.finish()?;
        Ok(Self {
            common,
            sources,
            postgres,
            lease_ttl,
            command,
        })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
