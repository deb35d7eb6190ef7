//! The messages that cross NATS: the only types the workers exchange.
//!
//! Every envelope is JSON with a `schema_version`. A worker decodes only the versions it
//! knows ([`SCHEMA_VERSION`]); anything else is a [`DecodeError::UnsupportedVersion`] — the
//! message goes to the dead-letter stream with that reason instead of being misread.
//!
//! Every publish carries a deterministic `Nats-Msg-Id` ([`RecordChunk::msg_id`] and
//! friends), so a retried or re-run publish is dropped by JetStream's duplicate window.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The envelope version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A message type carried over NATS.
pub trait Envelope: Serialize + DeserializeOwned {
    /// What the message is, for errors (`"record chunk"`).
    const KIND: &'static str;
    /// The version this build writes.
    const VERSION: u32 = SCHEMA_VERSION;
    /// The oldest version this build still reads.
    const OLDEST: u32 = SCHEMA_VERSION;
    fn schema_version(&self) -> u32;
}

/// The version of [`EnrichedChunk`] this build writes: 2 added [`EnrichedChunk::dead`]. The
/// writer reads 1 and 2; upgrade writers before enrichers.
pub const ENRICHED_CHUNK_VERSION: u32 = 2;

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "{kind} has schema_version {found}, this build reads only version {supported}; upgrade the consumer or replay with a matching build"
    )]
    UnsupportedVersion {
        kind: &'static str,
        found: u64,
        supported: u32,
    },
    #[error("{kind} has no schema_version")]
    MissingVersion { kind: &'static str },
    #[error("{kind} is not valid JSON for its schema: {source}")]
    Invalid {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Decodes an envelope of a version this build reads; for anything else, says why from its
/// `schema_version` (missing, newer, older) or its JSON.
pub fn decode<T: Envelope>(bytes: &[u8]) -> Result<T, DecodeError> {
    // The common case in one pass: a message of a version this build reads. Anything else
    // is read again by the probe below, which says why it cannot be taken.
    if let Ok(message) = serde_json::from_slice::<T>(bytes)
        && (T::OLDEST..=T::VERSION).contains(&message.schema_version())
    {
        return Ok(message);
    }
    #[derive(Deserialize)]
    struct Probe {
        schema_version: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|source| DecodeError::Invalid {
        kind: T::KIND,
        source,
    })?;
    match probe.schema_version {
        None => return Err(DecodeError::MissingVersion { kind: T::KIND }),
        Some(v) => match v.as_u64() {
            Some(n) if (u64::from(T::OLDEST)..=u64::from(T::VERSION)).contains(&n) => {}
            Some(n) => {
                return Err(DecodeError::UnsupportedVersion {
                    kind: T::KIND,
                    found: n,
                    supported: T::VERSION,
                });
            }
            None => return Err(DecodeError::MissingVersion { kind: T::KIND }),
        },
    }
    serde_json::from_slice(bytes).map_err(|source| DecodeError::Invalid {
        kind: T::KIND,
        source,
    })
}

/// Encodes an envelope.
pub fn encode<T: Envelope>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(message)
}

/// Where a source's incremental fetch stands: the position *after* the last record handed on.
///
/// `(updated_at, id)` rather than a bare timestamp, so records sharing one `updated_at` are
/// never skipped or repeated; or the API's own opaque token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cursor {
    /// The last record by `(updated_at, id)`.
    Position {
        updated_at: DateTime<Utc>,
        id: String,
        /// `updated_at` exactly as the source wrote it (`"2026-11-30T10:00:39.000Z"`, `1764496839`),
        /// sent back as `since` unchanged: a source comparing strings would otherwise skip
        /// records (`"…39Z" > "…39.500Z"`). Absent in cursors written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    /// An opaque continuation token from the API.
    Token { token: String },
}

/// One record as fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The record's id in its source (numbers are written as their decimal text).
    pub id: String,
    /// The source's last-modified time, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// The record as the source sent it: its JSON text from the page, only the whitespace
    /// between tokens left out (numbers, escapes and key order as written).
    pub payload: Box<RawValue>,
    /// A hash of the record's content as its source defines it: the payload without its
    /// `updated_at` field and the source's `ignore_fields`, keys in any order. Absent from
    /// fetchers older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_key: Option<String>,
    /// The stored enrichment of this same content, when the fetcher found one; the enricher
    /// reuses it instead of asking the LLM again when its prompt version and model are its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<Box<Prior>>,
}

impl PartialEq for SourceRecord {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.updated_at == other.updated_at
            && self.payload.get() == other.payload.get()
            && self.content_key == other.content_key
            && self.prior == other.prior
    }
}

/// A stored enrichment of a record's content (from the writer's `records` row whose
/// `content_key` is the record's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prior {
    pub enrichment: serde_json::Value,
    pub model: String,
    pub prompt_version: String,
    /// When the enrichment was made (by the LLM, not reused).
    pub enriched_at: DateTime<Utc>,
    /// What it cost when it was made, in USD: what reusing it saves.
    pub cost_usd: f64,
}

/// A chunk of records from one fetch run (`tardis.records.<source>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordChunk {
    pub schema_version: u32,
    pub source: String,
    /// Content-derived id ([`chunk_id`]): the same records fetched again get the same id,
    /// whatever the run, so JetStream drops the republished chunk.
    pub chunk_id: String,
    pub run_id: String,
    /// 0-based position of this chunk in its run.
    pub chunk_seq: u64,
    pub records: Vec<SourceRecord>,
    /// The fetch cursor once this chunk is durably queued.
    pub cursor_after: Option<Cursor>,
    pub fetched_at: DateTime<Utc>,
}

impl Envelope for RecordChunk {
    const KIND: &'static str = "record chunk";
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl RecordChunk {
    /// The `Nats-Msg-Id`.
    pub fn msg_id(&self) -> String {
        format!("rec:{}:{}", self.source, self.chunk_id)
    }
}

/// The content-derived id of a chunk: a SHA-256 over the source and each record's
/// `(id, updated_at)`, so re-fetching the same versions of the same records yields the same
/// id in any run, and a newer version of any record yields a new one.
pub fn chunk_id(source: &str, records: &[SourceRecord]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    for r in records {
        h.update([0u8]);
        h.update(r.id.as_bytes());
        h.update([0u8]);
        match &r.updated_at {
            Some(t) => h.update(
                t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
                    .as_bytes(),
            ),
            None => h.update(r.payload.get().as_bytes()),
        }
    }
    hex::encode(&h.finalize()[..16])
}

/// Token usage of one record: its share of its batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// One enriched record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrichedRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    pub payload: Box<RawValue>,
    /// The validated enrichment object (default: sentiment, category, summary), kept as the
    /// JSON text the enricher wrote (on the wire, an inline object: the schema's fields in its
    /// order, each value's text as the model wrote it): the
    /// writer sends it as `jsonb` without building a `Value` of it.
    pub enrichment: Box<RawValue>,
    pub model: String,
    pub prompt_version: String,
    pub usage: Usage,
    /// When the enrichment was made; for a reused one, when it was first made.
    pub enriched_at: DateTime<Utc>,
    /// The record's [`SourceRecord::content_key`], stored for the next lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_key: Option<String>,
    /// The enrichment is a stored one of the same content, reused without an LLM call
    /// (`usage` is then zero and `saved_usd` what it cost when it was made).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    #[serde(default, skip_serializing_if = "is_no_money")]
    pub saved_usd: f64,
}

fn is_no_money(v: &f64) -> bool {
    *v == 0.0
}

impl PartialEq for EnrichedRecord {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.updated_at == other.updated_at
            && self.payload.get() == other.payload.get()
            && self.enrichment.get() == other.enrichment.get()
            && self.model == other.model
            && self.prompt_version == other.prompt_version
            && self.usage == other.usage
            && self.enriched_at == other.enriched_at
            && self.content_key == other.content_key
            && self.reused == other.reused
            && self.saved_usd == other.saved_usd
    }
}

/// The outcome of one record chunk (`tardis.enriched.<source>`): every record of the chunk is
/// either in `records` (enriched) or in `dead` (given up on), in this one message. It is the
/// unit of atomicity of the enricher's output: published once per record chunk under one
/// `Nats-Msg-Id`, so whichever round of enrichment publishes first decides every record of
/// the chunk, and the writer stores both parts in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrichedChunk {
    pub schema_version: u32,
    pub source: String,
    /// The `chunk_id` of the record chunk this was enriched from.
    pub chunk_id: String,
    pub run_id: String,
    pub chunk_seq: u64,
    pub records: Vec<EnrichedRecord>,
    /// The chunk's records that could not be enriched (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead: Vec<DeadRecord>,
    pub cursor_after: Option<Cursor>,
    pub fetched_at: DateTime<Utc>,
    /// Which part of the record chunk this is, when its outcome did not fit in one message:
    /// `(k, n)` for part k of n (1-based; the parts hold consecutive records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<(u32, u32)>,
}

/// A record of an [`EnrichedChunk`] that was given up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadRecord {
    pub record: SourceRecord,
    /// Why, for humans.
    pub reason: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub failed_at: DateTime<Utc>,
}

impl Envelope for EnrichedChunk {
    const KIND: &'static str = "enriched chunk";
    const VERSION: u32 = ENRICHED_CHUNK_VERSION;
    const OLDEST: u32 = 1;
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl EnrichedChunk {
    /// The `Nats-Msg-Id` of the outcome of one record chunk (or of one part of it).
    pub fn msg_id(&self) -> String {
        match self.part {
            None => format!("enr:{}:{}", self.source, self.chunk_id),
            Some((k, n)) => format!("enr:{}:{}:{k}/{n}", self.source, self.chunk_id),
        }
    }

    /// The dead records as dead letters of stage `enrich`.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .map(|d| DeadLetter {
                schema_version: SCHEMA_VERSION,
                source: self.source.clone(),
                stage: Stage::Enrich,
                chunk_id: self.chunk_id.clone(),
                run_id: self.run_id.clone(),
                record: d.record.clone(),
                reason: d.reason.clone(),
                attempts: d.attempts,
                last_error: d.last_error.clone(),
                failed_at: d.failed_at,
            })
            .collect()
    }
}

/// The stage at which a record was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Fetch,
    Enrich,
    Write,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Enrich => "enrich",
            Stage::Write => "write",
        }
    }
}

/// A record that could not be processed (`tardis.dlq.<stage>.<source>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub source: String,
    pub stage: Stage,
    /// The `chunk_id` of the chunk the record came in.
    pub chunk_id: String,
    pub run_id: String,
    pub record: SourceRecord,
    /// Why it was given up on, for humans.
    pub reason: String,
    pub attempts: u32,
    /// The last error, with secrets redacted.
    pub last_error: Option<String>,
    pub failed_at: DateTime<Utc>,
}

impl Envelope for DeadLetter {
    const KIND: &'static str = "dead letter";
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl DeadLetter {
    /// A message that could not be decoded at `stage`: its text (the first 64 KiB) becomes
    /// the record's payload, so nothing is lost and the reason says why.
    pub fn undecodable(
        stage: Stage,
        subject: &str,
        payload: &[u8],
        stream_sequence: u64,
        reason: &str,
    ) -> DeadLetter {
        let source = subject.rsplit('.').next().unwrap_or("unknown").to_string();
        let text: String = String::from_utf8_lossy(payload)
            .chars()
            .take(65_536)
            .collect();
        let payload =
            RawValue::from_string(serde_json::Value::String(text).to_string()).unwrap_or_default();
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            source,
            stage,
            chunk_id: format!("undecodable-{stream_sequence}"),
            run_id: String::new(),
            record: SourceRecord {
                id: format!("message-{stream_sequence}"),
                updated_at: None,
                payload,
                content_key: None,
                prior: None,
            },
            reason: format!("the message could not be read: {reason}"),
            attempts: 1,
            last_error: Some(reason.to_string()),
            failed_at: Utc::now(),
        }
    }

    pub fn msg_id(&self) -> String {
        format!(
            "dlq:{}:{}:{}:{}",
            self.stage.as_str(),
            self.source,
            self.chunk_id,
            self.record.id
        )
    }
}

/// How a fetch run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Succeeded,
    Failed,
    /// Another fetcher held the source's lease.
    Skipped,
    /// Stopped by shutdown; what was published stays published and the cursor says so.
    Interrupted,
    /// Stopped before the last page (`max_pages`); what was read is published, the rest is
    /// not. The report says whether the next run continues from here or starts over.
    Incomplete,
    /// Not a run: an operator set the source's cursor (`fetcher cursor set`; version 2).
    CursorSet,
    /// Not a run: an operator reset the source's cursor (`fetcher cursor reset`; version 2).
    CursorReset,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed => "failed",
            RunOutcome::Skipped => "skipped",
            RunOutcome::Interrupted => "interrupted",
            RunOutcome::Incomplete => "incomplete",
            RunOutcome::CursorSet => "cursor_set",
            RunOutcome::CursorReset => "cursor_reset",
        }
    }
}

/// A fetch run report (`tardis.runs.<source>`), persisted by the writer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRun {
    pub schema_version: u32,
    pub run_id: String,
    pub source: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub records: u64,
    pub pages: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub outcome: RunOutcome,
    /// What went wrong, with secrets redacted.
    pub error: Option<String>,
    pub cursor_after: Option<Cursor>,
    /// What the run noticed without failing (disorder, a full page with no next page).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Records that came after a record with a later `(updated_at, id)` in the same run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub out_of_order: u64,
    /// A cursor move: where the cursor was before (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_before: Option<Cursor>,
    /// A cursor move: who moved it and why (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The version of [`FetchRun`] that records a cursor move (`cursor_set`, `cursor_reset`, with
/// `cursor_before` and `note`); run reports are still written as version 1, so writers older
/// than it read them. Upgrade writers before moving cursors with a newer fetcher.
pub const FETCH_RUN_VERSION: u32 = 2;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Envelope for FetchRun {
    const KIND: &'static str = "fetch run";
    const VERSION: u32 = FETCH_RUN_VERSION;
    const OLDEST: u32 = 1;
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl FetchRun {
    pub fn msg_id(&self) -> String {
        format!("run:{}:{}", self.source, self.run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn record(id: &str) -> SourceRecord {
        SourceRecord {
            id: id.into(),
            updated_at: Some(ts("2026-11-01T10:00:00Z")),
            payload: RawValue::from_string(format!(r#"{{"id":"{id}","price":1.5,"tags":["a"]}}"#))
                .unwrap(),
            content_key: None,
            prior: None,
        }
    }

    fn chunk() -> RecordChunk {
        let records = vec![record("1"), record("2")];
        RecordChunk {
            schema_version: SCHEMA_VERSION,
            source: "market_data".into(),
            chunk_id: chunk_id("market_data", &records),
            run_id: "run-1".into(),
            chunk_seq: 3,
            records,
            cursor_after: Some(Cursor::Position {
                updated_at: ts("2026-11-01T10:00:00Z"),
                id: "2".into(),
                since: None,
            }),
            fetched_at: ts("2026-11-01T10:05:00Z"),
        }
    }

    fn round_trip<T: Envelope + PartialEq + std::fmt::Debug>(m: &T) {
        let bytes = encode(m).unwrap();
        let back: T = decode(&bytes).unwrap();
        assert_eq!(&back, m);
    }

    #[test]
    fn an_enriched_records_enrichment_is_carried_as_the_enrichers_text() {
        // The wire format is the one a `serde_json::Value` field wrote: the object inline,
        // compact; decoded, it is the same text, which the writer sends as jsonb unparsed.
        let text = r#"{"sentiment":"positive","category":"quote","summary":"up"}"#;
        let wire = format!(
            r#"{{"id":"1","payload":{{"id":1}},"enrichment":{text},"model":"m","prompt_version":"v1","usage":{{"prompt_tokens":1,"completion_tokens":2,"cost_usd":0.5}},"enriched_at":"2026-11-01T10:06:00Z"}}"#
        );
        let mut r: EnrichedRecord = serde_json::from_str(&wire).unwrap();
        assert_eq!(r.enrichment.get(), text);
        assert_eq!(serde_json::to_string(&r).unwrap(), wire);
        // What the enricher writes (`to_raw_value` of the validated object) is what a `Value`
        // field wrote: the record's text equals its re-serialization through `Value`.
        let v = serde_json::json!({"sentiment": "neutral", "category": "a \"b\" é", "summary": "x y", "score": 1.5});
        r.enrichment = serde_json::value::to_raw_value(&v).unwrap();
        let wire = serde_json::to_string(&r).unwrap();
        let through_value = serde_json::to_string(&serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(wire, through_value);
        assert!(wire.contains(&format!(
            r#""enrichment":{}"#,
            serde_json::to_string(&v).unwrap()
        )));
    }

    #[test]
    fn every_envelope_round_trips() {
        let c = chunk();
        round_trip(&c);
        let enriched = EnrichedChunk {
            schema_version: ENRICHED_CHUNK_VERSION,
            source: c.source.clone(),
            chunk_id: c.chunk_id.clone(),
            run_id: c.run_id.clone(),
            chunk_seq: c.chunk_seq,
            records: vec![EnrichedRecord {
                id: "1".into(),
                updated_at: None,
                payload: RawValue::from_string("{\"id\":1}".into()).unwrap(),
                enrichment: RawValue::from_string(
                    r#"{"sentiment":"positive","category":"quote","summary":"up"}"#.into(),
                )
                .unwrap(),
                model: "deepseek-v3.2".into(),
                prompt_version: "v1-abc".into(),
                usage: Usage {
                    prompt_tokens: 12,
                    completion_tokens: 7,
                    cost_usd: 0.000_008,
                },
                enriched_at: ts("2026-11-01T10:06:00Z"),
                content_key: None,
                reused: false,
                saved_usd: 0.0,
            }],
            dead: vec![DeadRecord {
                record: record("2"),
                reason: "no valid enrichment after 3 attempts".into(),
                attempts: 3,
                last_error: Some("sentiment: not one of the allowed values".into()),
                failed_at: ts("2026-11-01T10:06:00Z"),
            }],
            cursor_after: Some(Cursor::Token {
                token: "abc".into(),
            }),
            fetched_at: c.fetched_at,
            part: None,
        };
        round_trip(&enriched);
        let dead = DeadLetter {
            schema_version: SCHEMA_VERSION,
            source: "user_events".into(),
            stage: Stage::Enrich,
            chunk_id: "c".into(),
            run_id: "r".into(),
            record: record("9"),
            reason: "invalid enrichment".into(),
            attempts: 3,
            last_error: Some(
                "sentiment: \"great\" is not one of positive, neutral, negative".into(),
            ),
            failed_at: ts("2026-11-01T10:07:00Z"),
        };
        round_trip(&dead);
        let run = FetchRun {
            schema_version: SCHEMA_VERSION,
            run_id: "r".into(),
            source: "user_events".into(),
            started_at: ts("2026-11-01T10:00:00Z"),
            finished_at: ts("2026-11-01T10:01:00Z"),
            records: 10,
            pages: 1,
            chunks: 1,
            bytes: 1234,
            outcome: RunOutcome::Failed,
            error: Some("HTTP 401 from https://api.example.com/v2/events".into()),
            cursor_after: None,
            warnings: vec![],
            out_of_order: 0,
            cursor_before: None,
            note: None,
        };
        round_trip(&run);
    }

    #[test]
    fn payload_is_kept_byte_for_byte() {
        let c = chunk();
        let bytes = encode(&c).unwrap();
        let back: RecordChunk = decode(&bytes).unwrap();
        assert_eq!(
            back.records[0].payload.get(),
            r#"{"id":"1","price":1.5,"tags":["a"]}"#
        );
    }

    #[test]
    fn future_schema_version_is_a_clear_error() {
        let mut v = serde_json::to_value(chunk()).unwrap();
        v["schema_version"] = serde_json::json!(2);
        v["something_new"] = serde_json::json!({"x": 1});
        let err = decode::<RecordChunk>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "record chunk has schema_version 2, this build reads only version 1; upgrade the consumer or replay with a matching build"
        );
    }

    #[test]
    fn enriched_chunks_of_version_1_and_2_are_read_and_3_is_refused() {
        let v1 = r#"{"schema_version":1,"source":"s","chunk_id":"c","run_id":"r","chunk_seq":0,"records":[],"cursor_after":null,"fetched_at":"2026-11-01T10:00:00Z"}"#;
        let c: EnrichedChunk = decode(v1.as_bytes()).unwrap();
        assert!(c.dead.is_empty() && c.part.is_none());
        assert_eq!(c.msg_id(), "enr:s:c");
        let v3 = v1.replace("\"schema_version\":1", "\"schema_version\":3");
        let e = decode::<EnrichedChunk>(v3.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("reads only version 2"), "{e}");
        let part = EnrichedChunk {
            part: Some((2, 4)),
            ..c
        };
        assert_eq!(part.msg_id(), "enr:s:c:2/4");
    }

    #[test]
    fn missing_version_and_garbage_are_errors_not_panics() {
        assert!(matches!(
            decode::<RecordChunk>(br#"{"source":"x"}"#),
            Err(DecodeError::MissingVersion { .. })
        ));
        assert!(matches!(
            decode::<RecordChunk>(br#"{"schema_version":"one"}"#),
            Err(DecodeError::MissingVersion { .. })
        ));
        assert!(matches!(
            decode::<RecordChunk>(b"\xff\x00"),
            Err(DecodeError::Invalid { .. })
        ));
        assert!(matches!(
            decode::<RecordChunk>(br#"{"schema_version":1,"source":"x"}"#),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn chunk_ids_depend_on_content_not_on_the_run() {
        let a = chunk();
        let mut b = chunk();
        b.run_id = "another-run".into();
        b.chunk_seq = 0;
        b.chunk_id = chunk_id(&b.source, &b.records);
        assert_eq!(
            a.msg_id(),
            b.msg_id(),
            "a re-run fetching the same versions is a duplicate"
        );
        b.records[1].updated_at = Some(ts("2026-11-02T00:00:00Z"));
        b.chunk_id = chunk_id(&b.source, &b.records);
        assert_ne!(a.msg_id(), b.msg_id(), "a newer version is new data");
        assert_ne!(chunk_id("other", &a.records), a.chunk_id);
        assert_eq!(a.chunk_id.len(), 32);
    }
}
