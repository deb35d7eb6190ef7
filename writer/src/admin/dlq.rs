//! `writer dlq list | show | replay`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tardis_common::cli::{self, Table, cut};
use tardis_common::messages::{self, RecordChunk, SCHEMA_VERSION, SourceRecord};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;

use super::select;
use crate::config::{Config, DlqCommand, DlqFilter};
use crate::store::REPLAY_RUN_PREFIX;

/// Records per replayed chunk.
const REPLAY_CHUNK: usize = 100;

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List {
            filter,
            all,
            limit,
            json,
        } => list(config, &filter, all, limit, json).await,
        DlqCommand::Show {
            source,
            record_id,
            stage,
            json,
        } => show(config, &source, &record_id, stage.as_deref(), json).await,
        DlqCommand::Replay {
            filter,
            dry_run,
            yes,
        } => replay(config, &filter, dry_run, yes).await,
    }
}

fn state(replayed: Option<DateTime<Utc>>, replays: i32, resolved: Option<DateTime<Utc>>) -> String {
    match (resolved, replayed) {
        (Some(at), _) => format!("resolved {}", at.format("%Y-%m-%d %H:%M")),
        (None, Some(at)) => format!("replayed {} (x{replays})", at.format("%Y-%m-%d %H:%M")),
        (None, None) => "open".into(),
    }
}

async fn list(
    config: &Config,
    filter: &DlqFilter,
    all: bool,
    limit: i64,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let selection = select::dead_letters(filter, !all, Utc::now())?;
    let client = cli::connect_postgres(&config.postgres).await?;
    let sql = format!(
        "SELECT stage, source, record_id, occurrences, attempts, last_seen, reason, replayed_at, replays, resolved_at, resolution
           FROM dead_letters WHERE {} ORDER BY last_seen DESC, source, record_id LIMIT ${}",
        selection.sql(),
        selection.next()
    );
    let rows = client.query(&sql, &selection.refs(&[&limit])).await?;
    if as_json {
        for r in &rows {
            println!(
                "{}",
                json!({
                    "stage": r.get::<_, String>(0), "source": r.get::<_, String>(1),
                    "record_id": r.get::<_, String>(2), "occurrences": r.get::<_, i32>(3),
                    "attempts": r.get::<_, i32>(4), "last_seen": r.get::<_, DateTime<Utc>>(5),
                    "reason": r.get::<_, String>(6), "replayed_at": r.get::<_, Option<DateTime<Utc>>>(7),
                    "replays": r.get::<_, i32>(8), "resolved_at": r.get::<_, Option<DateTime<Utc>>>(9),
                    "resolution": r.get::<_, Option<String>>(10),
                })
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no {}dead letters match", if all { "" } else { "open " });
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "LAST SEEN",
        "STAGE",
        "SOURCE",
        "RECORD",
        "TIMES",
        "STATE",
        "REASON",
    ]);
    for r in &rows {
        table.row(vec![
            r.get::<_, DateTime<Utc>>(5)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
            r.get(0),
            r.get(1),
            cut(&r.get::<_, String>(2), 24),
            r.get::<_, i32>(3).to_string(),
            state(r.get(7), r.get(8), r.get(9)),
            cut(&r.get::<_, String>(6), 90),
        ]);
    }
    print!("{}", table.render());
    if rows.len() as i64 == limit {
        println!("(the newest {limit}; --limit N for more)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(
    config: &Config,
    source: &str,
    record_id: &str,
    stage: Option<&str>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let stage = stage.map(select::stage).transpose()?;
    let client = cli::connect_postgres(&config.postgres).await?;
    let rows = client
        .query(
            "SELECT stage, reason, last_error, attempts, occurrences, first_seen, last_seen, chunk_id, run_id,
                    replayed_at, replays, resolved_at, resolution, source_updated_at, payload, raw IS NOT NULL
               FROM dead_letters WHERE source = $1 AND record_id = $2 AND ($3::text IS NULL OR stage = $3)
              ORDER BY last_seen DESC",
            &[&source, &record_id, &stage],
        )
        .await?;
    if rows.is_empty() {
        anyhow::bail!("no dead letter of record {record_id:?} of source {source:?}");
    }
    for r in &rows {
        let payload: Option<Value> = r.get(14);
        if as_json {
            println!(
                "{}",
                json!({
                    "stage": r.get::<_, String>(0), "source": source, "record_id": record_id,
                    "reason": r.get::<_, String>(1), "last_error": r.get::<_, Option<String>>(2),
                    "attempts": r.get::<_, i32>(3), "occurrences": r.get::<_, i32>(4),
                    "first_seen": r.get::<_, DateTime<Utc>>(5), "last_seen": r.get::<_, DateTime<Utc>>(6),
                    "chunk_id": r.get::<_, Option<String>>(7), "run_id": r.get::<_, Option<String>>(8),
                    "replayed_at": r.get::<_, Option<DateTime<Utc>>>(9), "replays": r.get::<_, i32>(10),
                    "resolved_at": r.get::<_, Option<DateTime<Utc>>>(11), "resolution": r.get::<_, Option<String>>(12),
                    "source_updated_at": r.get::<_, Option<DateTime<Utc>>>(13), "payload": payload,
                })
            );
            continue;
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let time = |v: Option<DateTime<Utc>>| v.map_or("-".into(), |t| t.to_rfc3339());
        println!("stage        {}", r.get::<_, String>(0));
        println!("record       {source} / {record_id}");
        println!("reason       {}", r.get::<_, String>(1));
        println!("last error   {}", opt(r.get(2)));
        println!(
            "attempts     {} (seen {} times, first {}, last {})",
            r.get::<_, i32>(3),
            r.get::<_, i32>(4),
            r.get::<_, DateTime<Utc>>(5).to_rfc3339(),
            r.get::<_, DateTime<Utc>>(6).to_rfc3339()
        );
        println!("updated_at   {}", time(r.get(13)));
        println!("chunk, run   {}, {}", opt(r.get(7)), opt(r.get(8)));
        println!("state        {}", state(r.get(9), r.get(10), r.get(11)));
        if let Some(how) = r.get::<_, Option<String>>(12) {
            println!("resolution   {how}");
        }
        match payload {
            Some(p) => println!(
                "payload\n{}",
                serde_json::to_string_pretty(&p).unwrap_or_default()
            ),
            None if r.get::<_, bool>(15) => {
                println!("payload      (not JSON: kept as raw bytes in dead_letters.raw)")
            }
            None => println!("payload      -"),
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// One letter to replay.
struct Letter {
    stage: String,
    source: String,
    record_id: String,
    occurrences: i32,
    updated_at: Option<DateTime<Utc>>,
    payload: String,
    reason: String,
}

async fn replay(
    config: &Config,
    filter: &DlqFilter,
    dry_run: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    if filter.stage.as_deref().map(select::stage).transpose()? == Some("fetch") {
        anyhow::bail!(
            "fetch-stage dead letters are records too large for NATS and hold only their head: fetch them again with `fetcher backfill` once the source or TARDIS_MAX_PAYLOAD allows"
        );
    }
    let selection = select::dead_letters(filter, true, Utc::now())?;
    let mut pg = cli::connect_postgres(&config.postgres).await?;
    let eligible = "stage IN ('enrich', 'write') AND payload IS NOT NULL
                    AND (replayed_at IS NULL OR last_seen > replayed_at)";
    let skipped: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM dead_letters WHERE {} AND NOT ({eligible})",
                selection.sql()
            ),
            &selection.refs(&[]),
        )
        .await?
        .get(0);
    let tx = pg.transaction().await?;
    // Locked until the replay is recorded: a second replay at the same time waits, then finds
    // them replayed.
    let rows = tx
        .query(
            &format!(
                "SELECT stage, source, record_id, occurrences, source_updated_at, payload::text, reason
                   FROM dead_letters WHERE {} AND {eligible}
                  ORDER BY source, record_id FOR UPDATE",
                selection.sql()
            ),
            &selection.refs(&[]),
        )
        .await?;
    let letters: Vec<Letter> = rows
        .iter()
        .map(|r| Letter {
            stage: r.get(0),
            source: r.get(1),
            record_id: r.get(2),
            occurrences: r.get(3),
            updated_at: r.get(4),
            payload: r.get(5),
            reason: r.get(6),
        })
        .collect();
    if skipped > 0 {
        println!(
            "{skipped} matching letters are skipped: fetch-stage, without a JSON payload, or replayed and not failed again since"
        );
    }
    if letters.is_empty() {
        println!("nothing to replay");
        return Ok(ExitCode::SUCCESS);
    }
    let mut by_source: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &letters {
        *by_source.entry(&l.source).or_default() += 1;
    }
    let summary = by_source
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if dry_run {
        let mut table = Table::new(&["STAGE", "SOURCE", "RECORD", "REASON"]);
        for l in &letters {
            table.row(vec![
                l.stage.clone(),
                l.source.clone(),
                cut(&l.record_id, 24),
                cut(&l.reason, 90),
            ]);
        }
        print!("{}", table.render());
        println!(
            "dry run: {} letters would be replayed ({summary})",
            letters.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !yes
        && !cli::confirm(&format!(
            "Replay {} dead letters ({summary}) through enrichment?",
            letters.len()
        ))
    {
        anyhow::bail!(
            "not confirmed: nothing replayed (pass --yes when there is no terminal to ask on)"
        );
    }
    let nats = cli::connect_nats(&config.common.nats, "tardis-writer-dlq-replay").await?;
    let js = async_nats::jetstream::new(nats.clone());
    let cancel = CancellationToken::new();
    let mut chunks = 0;
    for (source, group) in group_by_source(&letters) {
        for part in group.chunks(REPLAY_CHUNK) {
            let chunk = replay_chunk(source, part)?;
            publish_durably(
                &js,
                &config.common.names.records_subject(source),
                &chunk.msg_id(),
                messages::encode(&chunk)?.into(),
                Duration::from_secs(30),
                &cancel,
            )
            .await
            .map_err(|e| anyhow::anyhow!("publishing the replay of {source} failed: {e}; nothing is marked replayed, run it again"))?;
            chunks += 1;
        }
    }
    let keys: (Vec<String>, Vec<String>, Vec<String>) = letters.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut st, mut so, mut id), l| {
            st.push(l.stage.clone());
            so.push(l.source.clone());
            id.push(l.record_id.clone());
            (st, so, id)
        },
    );
    tx.execute(
        "UPDATE dead_letters d SET replayed_at = now(), replays = d.replays + 1
           FROM unnest($1::text[], $2::text[], $3::text[]) AS k(stage, source, record_id)
          WHERE d.stage = k.stage AND d.source = k.source AND d.record_id = k.record_id",
        &[&keys.0, &keys.1, &keys.2],
    )
    .await?;
    tx.commit().await?;
    let _drained = nats.drain().await.is_ok();
    println!(
        "replayed {} dead letters in {chunks} chunks ({summary}); each is resolved when its record is written (`writer dlq list --all`), or open again if it fails again",
        letters.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn group_by_source(letters: &[Letter]) -> Vec<(&str, Vec<&Letter>)> {
    let mut out: BTreeMap<&str, Vec<&Letter>> = BTreeMap::new();
    for l in letters {
        out.entry(&l.source).or_default().push(l);
    }
    out.into_iter().collect()
}

/// The record chunk of a replay: its id comes from the letters and how often each failed, so
/// running the same replay again (after a crash before it was recorded) publishes the same
/// message, which JetStream drops; a letter that failed again gets a new one.
fn replay_chunk(source: &str, letters: &[&Letter]) -> anyhow::Result<RecordChunk> {
    let mut h = Sha256::new();
    for l in letters {
        h.update(l.stage.as_bytes());
        h.update([0]);
        h.update(l.record_id.as_bytes());
        h.update([0]);
        h.update(l.occurrences.to_be_bytes());
    }
    let run_id = format!("{REPLAY_RUN_PREFIX}{}", &hex::encode(h.finalize())[..16]);
    let records = letters
        .iter()
        .map(|l| {
            Ok(SourceRecord {
                id: l.record_id.clone(),
                updated_at: l.updated_at,
                payload: serde_json::value::RawValue::from_string(l.payload.clone())?,
                content_key: None,
                prior: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordChunk {
        schema_version: SCHEMA_VERSION,
        source: source.to_string(),
        chunk_id: messages::chunk_id(&format!("{source}/{run_id}"), &records),
        run_id,
        chunk_seq: 0,
        records,
        cursor_after: None,
        fetched_at: Utc::now(),
    })
}
