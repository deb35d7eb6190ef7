//! A fleet of enricher processes against one mock provider: records published straight into
//! the records stream, replicas started and stopped at will (bench-fleet, fleet tests).

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tardis_common::messages::{self, RecordChunk, SCHEMA_VERSION, SourceRecord};
use tardis_common::nats::{Names, StreamKind, StreamSettings, Topology, publish_durably};
use tokio_util::sync::CancellationToken;

use super::{Captured, bins, free_port};

/// Publishes `records` records of source `source` in chunks of `per_chunk`; returns the chunks.
pub async fn publish_records(
    js: &async_nats::jetstream::Context,
    names: &Names,
    source: &str,
    records: usize,
    per_chunk: usize,
) -> Result<u64> {
    let payloads = (0..records).map(|i| {
        (
            format!("{source}-{i}"),
            json!({"id": i, "event": "review", "message": format!("Customer {i} says the new dashboard is great but export is slow")}).to_string(),
        )
    });
    publish_payloads(js, names, source, payloads.collect(), per_chunk).await
}

/// Publishes `(id, JSON)` records of source `source` in chunks of `per_chunk`; returns the
/// chunks.
pub async fn publish_payloads(
    js: &async_nats::jetstream::Context,
    names: &Names,
    source: &str,
    payloads: Vec<(String, String)>,
    per_chunk: usize,
) -> Result<u64> {
    Topology::new(names.clone(), StreamSettings::default())
        .provision(js, &[StreamKind::Records, StreamKind::Enriched], &[], false)
        .await?;
    let mut chunks = 0u64;
    for (seq, group) in payloads.chunks(per_chunk.max(1)).enumerate() {
        let batch: Vec<SourceRecord> = group
            .iter()
            .map(|(id, json)| {
                Ok(SourceRecord {
                    id: id.clone(),
                    updated_at: None,
                    payload: serde_json::value::RawValue::from_string(json.clone())?,
                    content_key: None,
                    prior: None,
                })
            })
            .collect::<Result<_>>()?;
        let chunk = RecordChunk {
            schema_version: SCHEMA_VERSION,
            source: source.into(),
            chunk_id: messages::chunk_id(source, &batch),
            run_id: format!("{source}-run"),
            chunk_seq: seq as u64,
            records: batch,
            cursor_after: None,
            fetched_at: chrono::Utc::now(),
        };
        publish_durably(
            js,
            &names.records_subject(source),
            &chunk.msg_id(),
            messages::encode(&chunk)?.into(),
            Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await?;
        chunks += 1;
    }
    Ok(chunks)
}

/// One enricher replica as a process, with `env` on top of the connection settings.
pub fn spawn_enricher(
    nats_url: &str,
    prefix: &str,
    endpoint: &str,
    env: &[(&str, String)],
) -> Result<Captured> {
    let mut cmd = Command::new(bins::bin("enricher")?);
    cmd.env_clear()
        .env("NATS_URL", nats_url)
        .env("TARDIS_PREFIX", prefix)
        .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .env("PROCESSOR_ENDPOINT", endpoint)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Captured::spawn(cmd)
}

/// Messages in the enriched stream (one per record chunk, unless a chunk was split in parts).
pub async fn enriched_messages(js: &async_nats::jetstream::Context, names: &Names) -> Result<u64> {
    let mut stream = js.get_stream(names.stream(StreamKind::Enriched)).await?;
    Ok(stream.info().await?.state.messages)
}
