//! `writer status`: per source, where fetching and writing stand and what is waiting or dead;
//! today's LLM tokens and dollars; per stage, the work left and the replicas seen.

use std::collections::BTreeMap;
use std::process::ExitCode;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tardis_common::cli::{self, Table, cut};
use tardis_common::nats::{ConsumerKind, StreamKind};

use crate::config::Config;

/// A cursor (as stored in JSON) for people: `2026-12-01T10:00:00Z #123`, or a token.
fn describe_cursor(cursor: &Value) -> String {
    match cursor.get("kind").and_then(Value::as_str) {
        Some("position") => format!(
            "{} #{}",
            cursor
                .get("since")
                .or_else(|| cursor.get("updated_at"))
                .and_then(Value::as_str)
                .unwrap_or("?"),
            cursor.get("id").and_then(Value::as_str).unwrap_or("?")
        ),
        Some("token") => format!(
            "token {}",
            cut(
                cursor.get("token").and_then(Value::as_str).unwrap_or(""),
                24
            )
        ),
        _ => "-".into(),
    }
}

#[derive(Debug, Default, serde::Serialize)]
struct SourceStatus {
    source: String,
    fetched_through: Option<Value>,
    published_total: Option<u64>,
    written_through: Option<Value>,
    records_written: Option<i64>,
    last_run: Option<Value>,
    chunks_waiting_enrich: u64,
    chunks_waiting_write: u64,
    dead_letters_open: BTreeMap<String, i64>,
}

pub async fn run(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let pg = cli::connect_postgres(&config.postgres).await?;
    let nats = cli::connect_nats(&config.common.nats, "tardis-writer-status").await?;
    let js = jetstream::new(nats.clone());
    let names = &config.common.names;
    let mut sources: BTreeMap<String, SourceStatus> = BTreeMap::new();
    fn get<'a>(sources: &'a mut BTreeMap<String, SourceStatus>, s: &str) -> &'a mut SourceStatus {
        sources
            .entry(s.to_string())
            .or_insert_with(|| SourceStatus {
                source: s.to_string(),
                ..Default::default()
            })
    }
    for r in pg
        .query(
            "SELECT source, cursor, records_written FROM source_checkpoints",
            &[],
        )
        .await?
    {
        let s = get(&mut sources, r.get(0));
        s.written_through = r.get(1);
        s.records_written = Some(r.get(2));
    }
    for r in pg
        .query(
            "SELECT DISTINCT ON (source) source, run_id, outcome, started_at, finished_at, records, error
               FROM fetch_runs WHERE outcome NOT IN ('cursor_set', 'cursor_reset')
              ORDER BY source, started_at DESC",
            &[],
        )
        .await?
    {
        get(&mut sources, r.get(0)).last_run = Some(json!({
            "run_id": r.get::<_, String>(1), "outcome": r.get::<_, String>(2),
            "started_at": r.get::<_, DateTime<Utc>>(3), "finished_at": r.get::<_, DateTime<Utc>>(4),
            "records": r.get::<_, i64>(5), "error": r.get::<_, Option<String>>(6),
        }));
    }
    for r in pg
        .query(
            "SELECT source, stage, count(*) FROM dead_letters WHERE resolved_at IS NULL GROUP BY 1, 2",
            &[],
        )
        .await?
    {
        get(&mut sources, r.get(0))
            .dead_letters_open
            .insert(r.get(1), r.get(2));
    }
    // The fetch cursors ("published through").
    if let Ok(store) = js.get_key_value(names.fetch_state_bucket()).await {
        let mut keys = store
            .keys()
            .await
            .map_err(|e| anyhow::anyhow!("listing the fetch cursors: {e}"))?;
        let mut wanted = Vec::new();
        while let Some(key) = keys.next().await {
            wanted.push(key.map_err(|e| anyhow::anyhow!("listing the fetch cursors: {e}"))?);
        }
        for key in wanted {
            let Some(source) = key.strip_prefix("cursor.") else {
                continue;
            };
            if let Ok(Some(bytes)) = store.get(&key).await
                && let Ok(state) = serde_json::from_slice::<Value>(&bytes)
            {
                let s = get(&mut sources, source);
                s.fetched_through = state.get("cursor").cloned().filter(|c| !c.is_null());
                s.published_total = state.get("published_total").and_then(Value::as_u64);
            }
        }
    }
    // Chunks waiting per source in the records and enriched streams.
    for (kind, enrich) in [(StreamKind::Records, true), (StreamKind::Enriched, false)] {
        let Ok(stream) = js.get_stream(names.stream(kind)).await else {
            continue;
        };
        let mut subjects = stream
            .info_with_subjects(names.stream_subjects(kind))
            .await
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", names.stream(kind)))?;
        while let Some(item) = subjects.next().await {
            let (subject, count) =
                item.map_err(|e| anyhow::anyhow!("reading {}: {e}", names.stream(kind)))?;
            let source = subject.rsplit('.').next().unwrap_or("").to_string();
            let s = get(&mut sources, &source);
            if enrich {
                s.chunks_waiting_enrich = count as u64;
            } else {
                s.chunks_waiting_write = count as u64;
            }
        }
    }
    // Today (UTC): rows written today, what their enrichment cost, what reuse saved.
    let cost: Vec<Value> = pg
        .query(
            "SELECT source, model, count(*), count(*) FILTER (WHERE reused),
                    coalesce(sum(prompt_tokens + completion_tokens), 0)::int8,
                    coalesce(sum(cost_usd), 0)::float8, coalesce(sum(saved_usd), 0)::float8
               FROM records WHERE written_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
              GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let records: i64 = r.get(2);
            let usd: f64 = r.get(5);
            json!({
                "source": r.get::<_, String>(0), "model": r.get::<_, String>(1),
                "records": records, "reused": r.get::<_, i64>(3), "tokens": r.get::<_, i64>(4),
                "usd": usd, "saved_usd": r.get::<_, f64>(6),
                "usd_per_1000_records": if records > 0 { usd * 1000.0 / records as f64 } else { 0.0 },
            })
        })
        .collect();
    // Per stage: the work left (what KEDA scales on) and the replicas seen.
    let seen = tardis_common::nats::presence::seen(&js, names)
        .await
        .unwrap_or_default();
    let fetching = match js.get_key_value(names.fetch_lease_bucket()).await {
        Ok(leases) => match leases.keys().await {
            Ok(keys) => keys.filter(|k| std::future::ready(k.is_ok())).count().await,
            Err(_) => 0,
        },
        Err(_) => 0,
    };
    let mut stages = Vec::new();
    for (stage, kind, component) in [
        ("enrich", ConsumerKind::Enricher, "enricher"),
        ("write", ConsumerKind::Writer, "writer"),
        ("dead letters", ConsumerKind::WriterDlq, "writer"),
        ("runs", ConsumerKind::WriterRuns, "writer"),
    ] {
        let left = match js.get_stream(names.stream(kind.stream())).await {
            Ok(stream) => match stream.consumer_info(names.consumer(kind)).await {
                Ok(info) => Some(info.num_pending + info.num_ack_pending as u64),
                Err(_) => None,
            },
            Err(_) => None,
        };
        stages.push(json!({
            "stage": stage, "consumer": names.consumer(kind), "work_left_messages": left,
            "replicas_seen": seen.get(component).copied().unwrap_or(0),
        }));
    }
    stages.insert(
        0,
        json!({"stage": "fetch", "consumer": null, "work_left_messages": null, "replicas_seen": fetching}),
    );
    let _drained = nats.drain().await.is_ok();

    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "generated_at": Utc::now(),
                "sources": sources.values().collect::<Vec<_>>(),
                "today": cost,
                "stages": stages,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "SOURCE",
        "FETCHED THROUGH",
        "WRITTEN THROUGH",
        "LAST RUN",
        "WAITING (ENRICH/WRITE CHUNKS)",
        "DEAD LETTERS (OPEN)",
    ]);
    for s in sources.values() {
        let run = s.last_run.as_ref().map_or("-".to_string(), |r| {
            format!(
                "{} {} ({} records)",
                r["outcome"].as_str().unwrap_or("?"),
                r["finished_at"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
                r["records"]
            )
        });
        let dead = if s.dead_letters_open.is_empty() {
            "0".to_string()
        } else {
            s.dead_letters_open
                .iter()
                .map(|(stage, n)| format!("{stage} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t.row(vec![
            s.source.clone(),
            s.fetched_through
                .as_ref()
                .map_or("-".into(), describe_cursor),
            s.written_through
                .as_ref()
                .map_or("-".into(), describe_cursor),
            run,
            format!("{} / {}", s.chunks_waiting_enrich, s.chunks_waiting_write),
            dead,
        ]);
    }
    print!("{}", t.render());
    println!();
    let mut c = Table::new(&[
        "TODAY (UTC)",
        "MODEL",
        "ROWS WRITTEN",
        "REUSED",
        "LLM TOKENS",
        "USD",
        "USD / 1,000 RECORDS",
        "SAVED USD",
    ]);
    for row in &cost {
        c.row(vec![
            row["source"].as_str().unwrap_or("").into(),
            row["model"].as_str().unwrap_or("").into(),
            row["records"].to_string(),
            row["reused"].to_string(),
            row["tokens"].to_string(),
            format!("{:.6}", row["usd"].as_f64().unwrap_or(0.0)),
            format!("{:.6}", row["usd_per_1000_records"].as_f64().unwrap_or(0.0)),
            format!("{:.6}", row["saved_usd"].as_f64().unwrap_or(0.0)),
        ]);
    }
    if c.is_empty() {
        println!("no rows written today (UTC)");
    } else {
        print!("{}", c.render());
    }
    println!();
    let mut st = Table::new(&["STAGE", "WORK LEFT (MESSAGES)", "REPLICAS SEEN"]);
    for s in &stages {
        st.row(vec![
            s["stage"].as_str().unwrap_or("").into(),
            s["work_left_messages"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
            if s["stage"] == "fetch" {
                format!("{} running", s["replicas_seen"])
            } else {
                s["replicas_seen"].to_string()
            },
        ]);
    }
    print!("{}", st.render());
    Ok(ExitCode::SUCCESS)
}
