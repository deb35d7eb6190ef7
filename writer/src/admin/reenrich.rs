//! `writer reenrich`: stored records enriched again, without fetching them again.
//!
//! It counts what the selection holds and what those records cost when they were enriched
//! (the stored tokens and dollars per record), prints the estimate, asks (or `--yes`), then
//! publishes the records from Postgres as record chunks of a new run (`reenrich-<time>-<n>`)
//! at `--rate` records per second, with no stored enrichment attached: the enrichers send
//! them to the LLM and the writer replaces each row's enrichment with the newer one (the
//! row's content is unchanged). Each chunk carries the oldest fetch time of its records, so a
//! newer version of a record fetched meanwhile is never overwritten by its re-enrichment.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt as _, pin_mut};
use serde_json::json;
use tardis_common::cli::{self, Table};
use tardis_common::messages::{self, RecordChunk, SCHEMA_VERSION, SourceRecord};
use tardis_common::nats::publish_durably;
use tokio_util::sync::CancellationToken;

use super::select;
use crate::config::{Config, ReenrichArgs};

/// What a selection holds, by source, prompt version and model.
struct Group {
    source: String,
    prompt_version: String,
    model: String,
    records: i64,
    tokens_per_record: f64,
    usd_per_record: f64,
}

pub async fn run(config: &Config, args: ReenrichArgs) -> anyhow::Result<ExitCode> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        anyhow::bail!("--rate must be a positive number of records per second");
    }
    if args.chunk == 0 {
        anyhow::bail!("--chunk must be at least 1");
    }
    let selection = select::records(&args, Utc::now())?;
    let limit: i64 = args.limit.unwrap_or(i64::MAX);
    let client = cli::connect_postgres(&config.postgres).await?;
    // What the records cost when they were last paid for: a reused row's saved_usd is that.
    let groups: Vec<Group> = client
        .query(
            &format!(
                "SELECT source, prompt_version, model, count(*),
                        coalesce(avg(prompt_tokens + completion_tokens) FILTER (WHERE NOT reused), 0)::float8,
                        coalesce(avg(cost_usd + saved_usd), 0)::float8
                   FROM (SELECT * FROM records WHERE {} ORDER BY source, record_id LIMIT ${}) r
                  GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                selection.sql(),
                selection.next()
            ),
            &selection.refs(&[&limit]),
        )
        .await?
        .iter()
        .map(|r| Group {
            source: r.get(0),
            prompt_version: r.get(1),
            model: r.get(2),
            records: r.get(3),
            tokens_per_record: r.get(4),
            usd_per_record: r.get(5),
        })
        .collect();
    let total: i64 = groups.iter().map(|g| g.records).sum();
    if total == 0 {
        println!("no stored records match");
        return Ok(ExitCode::SUCCESS);
    }
    let estimate: f64 = groups
        .iter()
        .map(|g| g.records as f64 * g.usd_per_record)
        .sum();
    let mut table = Table::new(&[
        "SOURCE",
        "PROMPT VERSION",
        "MODEL",
        "RECORDS",
        "TOKENS/RECORD",
        "USD/RECORD",
        "ESTIMATE USD",
    ]);
    for g in &groups {
        table.row(vec![
            g.source.clone(),
            g.prompt_version.clone(),
            g.model.clone(),
            g.records.to_string(),
            format!("{:.0}", g.tokens_per_record),
            format!("{:.8}", g.usd_per_record),
            format!("{:.6}", g.records as f64 * g.usd_per_record),
        ]);
    }
    print!("{}", table.render());
    let eta = Duration::from_secs_f64(total as f64 / args.rate);
    println!(
        "{total} records, estimated ${estimate:.6} at the measured cost per record; publishing takes {} at {} records/s (enrichment follows at the fleet's pace)",
        humantime::format_duration(Duration::from_secs(eta.as_secs())),
        args.rate
    );
    if args.dry_run {
        println!("dry run: nothing published");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.yes
        && !cli::confirm(&format!(
            "Re-enrich {total} records for about ${estimate:.4}?"
        ))
    {
        anyhow::bail!(
            "not confirmed: nothing published (pass --yes when there is no terminal to ask on)"
        );
    }
    let nats = cli::connect_nats(&config.common.nats, "tardis-writer-reenrich").await?;
    let js = async_nats::jetstream::new(nats.clone());
    let run_id = format!(
        "reenrich-{}-{:04x}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    );
    let progress = Progress::new(total as u64, &run_id);
    let rows = client
        .query_raw(
            &format!(
                "SELECT source, record_id, source_updated_at, payload::text, content_key, fetched_at
                   FROM records WHERE {} ORDER BY source, record_id LIMIT ${}",
                selection.sql(),
                selection.next()
            ),
            selection.refs(&[&limit]),
        )
        .await?;
    pin_mut!(rows);
    let started = tokio::time::Instant::now();
    let cancel = CancellationToken::new();
    let mut published = 0u64;
    let mut seq = 0u64;
    let mut pending: Vec<(SourceRecord, DateTime<Utc>)> = Vec::with_capacity(args.chunk);
    let mut pending_source = String::new();
    loop {
        let next = rows.next().await.transpose()?;
        let flush = match &next {
            None => !pending.is_empty(),
            Some(row) => {
                pending.len() >= args.chunk
                    || (!pending.is_empty() && row.get::<_, &str>(0) != pending_source)
            }
        };
        if flush {
            let n = pending.len() as u64;
            let chunk = chunk_of(&pending_source, &run_id, seq, std::mem::take(&mut pending))?;
            publish_durably(
                &js,
                &config.common.names.records_subject(&chunk.source),
                &chunk.msg_id(),
                messages::encode(&chunk)?.into(),
                Duration::from_secs(30),
                &cancel,
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "publishing failed after {published} records: {e}; run the command again with --not-prompt-version <the new version> to continue"
                )
            })?;
            seq += 1;
            published += n;
            progress.update(published, started.elapsed());
            // At most --rate records a second.
            let due = Duration::from_secs_f64(published as f64 / args.rate);
            tokio::time::sleep_until(started + due).await;
        }
        let Some(row) = next else { break };
        pending_source = row.get(0);
        let record = SourceRecord {
            id: row.get(1),
            updated_at: row.get(2),
            payload: serde_json::value::RawValue::from_string(row.get(3))?,
            content_key: row.get(4),
            prior: None,
        };
        pending.push((record, row.get(5)));
    }
    progress.finish(published, started.elapsed());
    let _drained = nats.drain().await.is_ok();
    println!(
        "published {published} records in {seq} chunks (run {run_id}); rows are replaced as the enrichers finish them — follow with `writer status`"
    );
    Ok(ExitCode::SUCCESS)
}

/// A chunk of the run: its id from the run and its records (a new run re-enriches again);
/// its fetch time the oldest of its records'.
fn chunk_of(
    source: &str,
    run_id: &str,
    seq: u64,
    records: Vec<(SourceRecord, DateTime<Utc>)>,
) -> anyhow::Result<RecordChunk> {
    let fetched_at = records
        .iter()
        .map(|(_, f)| *f)
        .min()
        .unwrap_or_else(Utc::now);
    let records: Vec<SourceRecord> = records.into_iter().map(|(r, _)| r).collect();
    Ok(RecordChunk {
        schema_version: SCHEMA_VERSION,
        source: source.to_string(),
        chunk_id: messages::chunk_id(&format!("{source}/{run_id}"), &records),
        run_id: run_id.to_string(),
        chunk_seq: seq,
        records,
        cursor_after: None,
        fetched_at,
    })
}

/// A progress bar on a terminal; a JSON line every five seconds and at the end otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    run_id: String,
    last_line: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Progress {
    fn new(total: u64, run_id: &str) -> Self {
        let bar = cli::on_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records  {per_sec}  eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            total,
            run_id: run_id.to_string(),
            last_line: std::sync::Mutex::new(None),
        }
    }

    fn line(&self, published: u64, elapsed: Duration, done: bool) {
        let rate = published as f64 / elapsed.as_secs_f64().max(0.001);
        let left = self.total.saturating_sub(published) as f64 / rate.max(1e-9);
        println!(
            "{}",
            json!({
                "event": if done { "reenrich finished" } else { "reenrich progress" },
                "run_id": self.run_id, "published": published, "total": self.total,
                "records_per_second": (rate * 10.0).round() / 10.0,
                "eta_seconds": if done { 0.0 } else { left.round() },
            })
        );
    }

    fn update(&self, published: u64, elapsed: Duration) {
        if let Some(bar) = &self.bar {
            bar.set_position(published);
            return;
        }
        let mut last = self
            .last_line
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5)) {
            *last = Some(now);
            self.line(published, elapsed, false);
        }
    }

    fn finish(&self, published: u64, elapsed: Duration) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => self.line(published, elapsed, true),
        }
    }
}
