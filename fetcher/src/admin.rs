//! `fetcher cursor show | set | reset`: the one day-2 command of the fetcher's image, which
//! holds the fetch state and the source definitions.
//!
//! A move takes the source's run lease first (a run in progress keeps its source: the
//! command says who holds it), fences the cursor like a run does, writes the new one, and
//! records the move on `tardis.runs.<source>` — a `fetch_runs` row with outcome `cursor_set`
//! or `cursor_reset`, where the cursor was, where it is now and who moved it.

use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tardis_common::cli::{self, Table};
use tardis_common::messages::{self, Cursor, FETCH_RUN_VERSION, FetchRun, RunOutcome};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;

use crate::config::{Command, Config, CursorCommand};
use crate::state::{self, Acquired, CursorState, FetchState};

/// A cursor for people.
fn describe(cursor: Option<&Cursor>) -> String {
    match cursor {
        None => "none (next run: the written checkpoint, else initial_lookback)".into(),
        Some(Cursor::Position {
            updated_at,
            id,
            since,
        }) => {
            let at = since.clone().unwrap_or_else(|| updated_at.to_rfc3339());
            if id.is_empty() {
                at
            } else {
                format!("{at} #{id}")
            }
        }
        Some(Cursor::Token { token }) => format!("token {}", cli::cut(token, 40)),
    }
}

pub async fn cursor(config: Config) -> anyhow::Result<ExitCode> {
    let Command::Cursor(command) = config.command.clone() else {
        anyhow::bail!("not a cursor command");
    };
    let client = cli::connect_nats(&config.common.nats, "tardis-fetcher-cursor").await?;
    let js = async_nats::jetstream::new(client.clone());
    let names = &config.common.names;
    let store = js
        .get_key_value(names.fetch_state_bucket())
        .await
        .map_err(|e| anyhow::anyhow!("the fetch-state bucket {} is not readable ({e}): has a fetcher run with this TARDIS_PREFIX yet?", names.fetch_state_bucket()))?;
    let leases = js
        .create_or_update_key_value(state::lease_bucket_config(
            names.fetch_lease_bucket(),
            config.lease_ttl,
            config.common.streams.replicas,
        ))
        .await
        .map_err(|e| anyhow::anyhow!("opening the fetch-lease bucket: {e}"))?;
    let fetch_state = FetchState::new(store, leases.clone(), config.lease_ttl);
    let code = match command {
        CursorCommand::Show { sources, json } => {
            let wanted: Vec<String> = if sources.is_empty() {
                config
                    .sources
                    .sources
                    .iter()
                    .map(|s| s.name.clone())
                    .collect()
            } else {
                sources
            };
            let mut table = Table::new(&["SOURCE", "CURSOR", "PUBLISHED", "SAVED", "RUN NOW"]);
            for source in wanted {
                let saved = fetch_state.load_cursor(&source).await?;
                let holder = match leases.get(state::lease_key(&source, false)).await {
                    Ok(Some(bytes)) => serde_json::from_slice::<state::Lease>(&bytes).ok(),
                    _ => None,
                };
                if json {
                    println!(
                        "{}",
                        json!({"source": source, "state": saved, "lease": holder})
                    );
                    continue;
                }
                table.row(vec![
                    source.clone(),
                    describe(saved.as_ref().and_then(|s| s.cursor.as_ref())),
                    saved
                        .as_ref()
                        .map_or("0".into(), |s| s.published_total.to_string()),
                    saved.as_ref().map_or("-".into(), |s| {
                        s.updated_at.format("%Y-%m-%d %H:%M:%S").to_string()
                    }),
                    holder.map_or("-".into(), |l| format!("{} ({})", l.run_id, l.holder)),
                ]);
            }
            if !json {
                print!("{}", table.render());
            }
            ExitCode::SUCCESS
        }
        CursorCommand::Set {
            source,
            updated_at,
            id,
            token,
            by,
            yes,
        } => {
            let to = match (updated_at, token) {
                (Some(text), _) => {
                    let at = chrono::DateTime::parse_from_rfc3339(text.trim())
                        .map_err(|e| anyhow::anyhow!("--updated-at {text:?}: {e}"))?
                        .to_utc();
                    Some(Cursor::Position {
                        updated_at: at,
                        id: id.unwrap_or_default(),
                        since: Some(text.trim().to_string()),
                    })
                }
                (None, Some(token)) => Some(Cursor::Token { token }),
                (None, None) => anyhow::bail!("give --updated-at or --token"),
            };
            move_cursor(&config, &js, &fetch_state, &source, to, &by, yes).await?
        }
        CursorCommand::Reset { source, by, yes } => {
            move_cursor(&config, &js, &fetch_state, &source, None, &by, yes).await?
        }
    };
    let _drained = client.drain().await.is_ok();
    Ok(code)
}

async fn move_cursor(
    config: &Config,
    js: &async_nats::jetstream::Context,
    fetch_state: &FetchState,
    source: &str,
    to: Option<Cursor>,
    by: &str,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let run_id = format!(
        "cursor-{}-{:04x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    );
    let holder = format!("fetcher cursor ({by})");
    let lease = match fetch_state
        .acquire(&state::lease_key(source, false), &holder, &run_id)
        .await?
    {
        Acquired::Yes(lease) => lease,
        Acquired::No(other) => anyhow::bail!(
            "{source} is being fetched now (run {}, {}): try again when the run ends",
            other.run_id,
            other.holder
        ),
    };
    let result = async {
        let (before, mut held) = fetch_state.fence_cursor(source).await?;
        let from = before.as_ref().and_then(|s| s.cursor.clone());
        let reset = to.is_none();
        let what = if reset {
            format!(
                "Reset the cursor of {source} (now {})? The next run starts from initial_lookback.",
                describe(from.as_ref())
            )
        } else {
            format!(
                "Move the cursor of {source} from {} to {}?",
                describe(from.as_ref()),
                describe(to.as_ref())
            )
        };
        if !yes && !cli::confirm(&what) {
            anyhow::bail!("not confirmed: the cursor did not move (pass --yes when there is no terminal to ask on)");
        }
        let state = CursorState {
            cursor: to.clone(),
            published_total: before.as_ref().map_or(0, |s| s.published_total),
            updated_at: Utc::now(),
            reset,
        };
        fetch_state.save_cursor(&mut held, &state).await?;
        anyhow::Ok(from)
    }
    .await;
    let _released = fetch_state.release(&lease).await.is_ok();
    let from = result?;
    let record = FetchRun {
        schema_version: FETCH_RUN_VERSION,
        run_id: run_id.clone(),
        source: source.to_string(),
        started_at: now,
        finished_at: Utc::now(),
        records: 0,
        pages: 0,
        chunks: 0,
        bytes: 0,
        outcome: if to.is_none() {
            RunOutcome::CursorReset
        } else {
            RunOutcome::CursorSet
        },
        error: None,
        cursor_after: to.clone(),
        warnings: Vec::new(),
        out_of_order: 0,
        cursor_before: from.clone(),
        note: Some(format!("moved by {by} with `fetcher cursor`")),
    };
    publish_durably(
        js,
        &config.common.names.runs_subject(source),
        &record.msg_id(),
        messages::encode(&record)?.into(),
        Duration::from_secs(30),
        &CancellationToken::new(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the cursor moved, but recording the move failed: {e}"))?;
    println!(
        "{source}: cursor {} -> {} (recorded in fetch_runs as {} by {by})",
        describe(from.as_ref()),
        if to.is_none() {
            "none (next run: initial_lookback)".to_string()
        } else {
            describe(to.as_ref())
        },
        record.outcome.as_str()
    );
    Ok(ExitCode::SUCCESS)
}
