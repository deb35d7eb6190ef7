//! The writer's configuration: the command line, the common sections, Postgres and batching.

use std::time::Duration;

use clap::{Parser, Subcommand};
use tardis_common::app::ComponentConfig;
use tardis_common::config::{CommonConfig, ConfigError, Env, Reader};
use tardis_common::postgres::PostgresSettings;
use tardis_common::telemetry::TelemetrySettings;

/// Tardis writer: persists enriched records, dead letters and fetch runs in Postgres.
#[derive(Debug, Clone, Parser)]
#[command(name = "writer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand, PartialEq, Default)]
pub enum Command {
    /// Consume and write until SIGTERM (the default).
    #[default]
    Run,
    /// Apply the database migrations, then exit.
    Migrate,
    /// Where every source and stage stands: cursors, checkpoints, last runs, work in flight,
    /// dead letters, today's tokens and dollars, lag and replicas.
    Status {
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list them, show one, replay them after a fix.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Re-enrich stored records (read from Postgres, not fetched again), for a new prompt,
    /// schema or model: prints what it selected and the estimated cost, then publishes.
    Reenrich(ReenrichArgs),
}

impl Command {
    /// Whether this is a day-2 command (run once, print, exit) rather than the worker.
    pub fn is_admin(&self) -> bool {
        !matches!(self, Command::Run | Command::Migrate)
    }

    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Run => "run",
            Command::Migrate => "migrate",
            Command::Status { .. } => "status",
            Command::Dlq(DlqCommand::List { .. }) => "dlq list",
            Command::Dlq(DlqCommand::Show { .. }) => "dlq show",
            Command::Dlq(DlqCommand::Replay { .. }) => "dlq replay",
            Command::Reenrich(_) => "reenrich",
        }
    }
}

/// Which dead letters a `dlq` command takes.
#[derive(Debug, Clone, clap::Args, PartialEq, Eq, Default)]
pub struct DlqFilter {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only this stage: fetch, enrich or write.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only letters whose reason contains this text (any case).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only letters last seen at or after this time (RFC 3339, or an age such as 24h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only letters last seen before this time (RFC 3339, or an age such as 1h).
    #[arg(long)]
    pub until: Option<String>,
    /// Only these records (repeat the flag for several).
    #[arg(long = "record-id")]
    pub record_ids: Vec<String>,
}

#[derive(Debug, Clone, Subcommand, PartialEq, Eq)]
pub enum DlqCommand {
    /// List open dead letters (with --all, resolved ones too), newest first.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Resolved letters too.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters of one record, with their payloads.
    Show {
        source: String,
        record_id: String,
        /// Only this stage.
        #[arg(long)]
        stage: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay open dead letters of the enrich or write stage through enrichment again (after
    /// a prompt or schema fix). Each is marked replayed, so it is never replayed twice unless
    /// it failed again since; a replayed record that is written resolves its letter.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print what would be replayed, replay nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Which stored records `reenrich` takes, and how fast.
#[derive(Debug, Clone, clap::Args, PartialEq, Default)]
pub struct ReenrichArgs {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only rows enriched with this prompt version.
    #[arg(long = "prompt-version")]
    pub prompt_version: Option<String>,
    /// Only rows not enriched with this prompt version (the new one: what is left to redo).
    #[arg(long = "not-prompt-version")]
    pub not_prompt_version: Option<String>,
    /// Only rows enriched by this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only rows enriched at or after this time (RFC 3339, or an age such as 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Only rows enriched before this time (RFC 3339, or an age such as 1h).
    #[arg(long)]
    pub until: Option<String>,
    /// `enrichment.<field>=<value>` or `payload.<field>=<value>` (repeat for several; values
    /// are bound as parameters, never spliced into SQL).
    #[arg(long = "where")]
    pub filters: Vec<String>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<i64>,
    /// Records per second published.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Records per chunk.
    #[arg(long, default_value_t = 100)]
    pub chunk: usize,
    /// Print the selection and its estimated cost, publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub postgres: PostgresSettings,
    /// `WRITER_BATCH_MESSAGES`: messages per transaction at most, default 100.
    pub batch_messages: usize,
    /// `WRITER_BATCH_BYTES`: bytes of messages per transaction at most, default 4 MiB (never
    /// below the NATS server's `max_payload`).
    pub batch_bytes: usize,
    /// `WRITER_BATCH_WAIT`: how long to gather a batch, default 200 ms.
    pub batch_wait: Duration,
    /// `WRITER_CONCURRENCY`: batches of records written at once (loops, each with its own
    /// connection and transaction), default 2: one batch is read and staged while another
    /// commits, and the merge work is spread over Postgres's cores.
    pub concurrency: usize,
    /// `WRITER_MAX_DELIVER`: deliveries before a message that cannot be written is dead-lettered, default 5.
    pub max_deliver: i64,
    /// `WRITER_ACK_WAIT`: how long a pulled message may go without an ack or an in-progress
    /// heartbeat before JetStream redelivers it, default 15 s. The writer sends a heartbeat
    /// every third of it while a batch is being written, so this bounds only how long a
    /// crashed writer's messages wait.
    pub ack_wait: Duration,
    /// The StatefulSet ordinal, from `HOSTNAME` (`writer-2` → 2); 0 elsewhere.
    pub ordinal: u32,
    /// `WRITER_TEST_CRASH_AFTER_COMMIT`: abort right after the first commit, before acking
    /// (a crash-test hook; never set it in production).
    pub crash_after_commit: bool,
    pub command: Command,
    /// `writer migrate` only: the optional least-privilege roles ([`crate::roles`]).
    pub roles: RolesSettings,
}

/// `TARDIS_DB_ROLES` (default false) and the roles' passwords, `TARDIS_<ROLE>_DB_PASSWORD`.
#[derive(Debug, Clone, Default)]
pub struct RolesSettings {
    pub create: bool,
    pub passwords: Vec<(&'static str, tardis_common::secret::Secret<String>)>,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Self::from_env_with(env, Command::Run)
    }

    pub fn from_env_with(env: &dyn Env, command: Command) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let common = CommonConfig::read(&mut r, crate::COMPONENT);
        let mut postgres = PostgresSettings::read(&mut r);
        // A stuck lock or a forgotten transaction can never hold a batch forever. Migrations
        // keep the server's defaults (they may take longer).
        let statement_timeout = r.duration("WRITER_STATEMENT_TIMEOUT", Duration::from_secs(60));
        let idle_timeout = r.duration(
            "WRITER_IDLE_IN_TRANSACTION_TIMEOUT",
            Duration::from_secs(60),
        );
        if command == Command::Run {
            postgres.statement_timeout = Some(statement_timeout);
            postgres.idle_in_transaction_timeout = Some(idle_timeout);
        }
        let batch_messages = r.positive_u32("WRITER_BATCH_MESSAGES", 100) as usize;
        let batch_bytes = r.positive_u32("WRITER_BATCH_BYTES", 4 << 20) as usize;
        let batch_wait = r.duration("WRITER_BATCH_WAIT", Duration::from_millis(200));
        let concurrency = r.positive_u32("WRITER_CONCURRENCY", 2) as usize;
        // Every loop holds a connection while it writes; the dead-letter and run loops, the
        // checkpoint exporter and the reachability watcher need theirs.
        if command == Command::Run && concurrency + 4 > postgres.pool_size {
            r.problem(
                "WRITER_CONCURRENCY",
                format!(
                    "is {concurrency}, but DB_POOL_SIZE is {}: the writer needs a connection per record loop and 4 more",
                    postgres.pool_size
                ),
                format!(
                    "lower WRITER_CONCURRENCY or set DB_POOL_SIZE to at least {}",
                    concurrency + 4
                ),
            );
        }
        let max_deliver = i64::from(r.positive_u32("WRITER_MAX_DELIVER", 5));
        let ack_wait = r.duration("WRITER_ACK_WAIT", Duration::from_secs(15));
        let ordinal = r
            .string("HOSTNAME")
            .and_then(|h| h.rsplit('-').next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        let crash_after_commit = r.bool("WRITER_TEST_CRASH_AFTER_COMMIT", false);
        let mut roles = RolesSettings::default();
        if command == Command::Migrate {
            roles.create = r.bool("TARDIS_DB_ROLES", false);
            for role in crate::roles::ROLES {
                if let Some(password) = r.secret(role.password_env) {
                    if !roles.create {
                        r.problem(
                            role.password_env,
                            "is set but TARDIS_DB_ROLES is not true, so no role would get it",
                            "set TARDIS_DB_ROLES=true for `writer migrate` to create the roles",
                        );
                    }
                    roles.passwords.push((role.name, password));
                }
            }
        }
        r.finish()?;
        Ok(Self {
            common,
            postgres,
            batch_messages,
            batch_bytes,
            batch_wait,
            concurrency,
            max_deliver,
            ack_wait,
            ordinal,
            crash_after_commit,
            command,
            roles,
        })
    }
}

impl ComponentConfig for Config {
    fn telemetry(&self) -> &TelemetrySettings {
        &self.common.telemetry
    }
}
