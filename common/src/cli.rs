//! What the day-2 commands share (`writer status`, `writer dlq`, `writer reenrich`,
//! `fetcher cursor`): a `main` that prints results on stdout and errors on stderr (no JSON log
//! lines), connections that fail within seconds with a message naming what could not be
//! reached (never a secret), confirmations, and plain-text tables.

use std::future::Future;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env, ProcessEnv};
use crate::nats::NatsSettings;
use crate::postgres::PostgresSettings;

/// How long a command waits for NATS or Postgres before it says it cannot reach them.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a command: its configuration from the environment (exit 64 naming each problem), then
/// `run`; an error is printed as `<component> <command>: <error>` with exit 1.
pub fn main<C, F, Fut>(
    component: &str,
    command: &str,
    load: impl FnOnce(&dyn Env) -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let config = match load(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{component} {command}: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{component} {command}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{component} {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A NATS connection within [`CONNECT_TIMEOUT`], or an error naming the servers.
pub async fn connect_nats(
    settings: &NatsSettings,
    client_name: &str,
) -> anyhow::Result<async_nats::Client> {
    let cancel = CancellationToken::new();
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        settings.connect(client_name, None, &cancel),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => anyhow::bail!(
            "cannot reach NATS at {}: {e}; check NATS_URL and that the server runs",
            settings.display_servers()
        ),
        Err(_) => anyhow::bail!(
            "cannot reach NATS at {} within {} s; check NATS_URL and that the server runs",
            settings.display_servers(),
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// A Postgres connection within [`CONNECT_TIMEOUT`], or an error naming the server (never the
/// password).
pub async fn connect_postgres(
    settings: &PostgresSettings,
) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = settings
        .pool()
        .map_err(|e| anyhow::anyhow!("cannot configure Postgres: {}", crate::error::chain(&e)))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, pool.get()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => anyhow::bail!(
            "cannot reach Postgres at {}: {}; check DATABASE_URL or PGHOST, PGPORT and DB_PASSWORD, and that the server runs",
            settings.display_target(),
            crate::error::chain(&e)
        ),
        Err(_) => anyhow::bail!(
            "cannot reach Postgres at {} within {} s; check DATABASE_URL or PGHOST and PGPORT, and that the server runs",
            settings.display_target(),
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// Whether stdout is a terminal (progress bars and prompts), not a pipe or a log collector.
pub fn on_terminal() -> bool {
    std::io::stdout().is_terminal() && std::io::stdin().is_terminal()
}

/// Asks `question` on a terminal and reads yes or no; without a terminal, the answer is no
/// (pass `--yes` in scripts).
pub fn confirm(question: &str) -> bool {
    if !on_terminal() {
        return false;
    }
    print!("{question} [y/N] ");
    let _flushed = std::io::stdout().flush().is_ok();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// A plain-text table: a header, rows, columns as wide as their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line ending with a newline; cells padded on the right.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                width[i] = width[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut text = String::new();
            for (i, w) in width.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == columns {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.header);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// `text` cut to `max` characters, with `…` when it was longer.
pub fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let mut t = Table::new(&["source", "records", "note"]);
        t.row(vec!["market_data".into(), "5".into(), "".into()]);
        t.row(vec!["a".into(), "12345".into(), "x y".into()]);
        assert_eq!(
            t.render(),
            "source       records  note\nmarket_data  5\na            12345    x y\n"
        );
    }

    #[test]
    fn cut_keeps_short_text_and_marks_a_cut() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
