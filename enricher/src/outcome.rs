//! A record chunk's outcome as messages, pure: each record enriched or dead ([`decide`]), in
//! one `EnrichedChunk`, or in parts `k/n` of consecutive records when that is larger than the
//! NATS max payload ([`outcome_messages`]); a record whose outcome alone cannot fit is
//! dead-lettered with that reason.

use chrono::Utc;
use tardis_common::messages::{
    self, DeadRecord, ENRICHED_CHUNK_VERSION, EnrichedChunk, EnrichedRecord, RecordChunk,
    SourceRecord,
};

use crate::enrich::Outcome;

/// What became of one record of a chunk.
#[derive(Debug, Clone)]
pub enum Decision {
    Enriched(EnrichedRecord),
    Dead(DeadRecord),
}

/// Each of a chunk's `records` (in chunk order, taken from the chunk: their payloads move
/// into the decisions instead of being copied) enriched or dead.
pub fn decide(
    records: Vec<SourceRecord>,
    outcomes: Vec<Option<Outcome>>,
    model: &str,
    prompt_version: &str,
    now: chrono::DateTime<Utc>,
) -> Vec<Decision> {
    records
        .into_iter()
        .zip(outcomes)
        .map(|(record, outcome)| match outcome {
            Some(Outcome::Enriched { enrichment, usage }) => Decision::Enriched(enriched(
                record,
                enrichment,
                model,
                prompt_version,
                usage,
                now,
                0.0,
            )),
            Some(Outcome::Reused {
                enrichment,
                enriched_at,
                saved_usd,
            }) => Decision::Enriched(EnrichedRecord {
                reused: true,
                ..enriched(
                    record,
                    enrichment,
                    model,
                    prompt_version,
                    Default::default(),
                    enriched_at,
                    saved_usd,
                )
            }),
            Some(Outcome::Dead {
                reason,
                attempts,
                last_error,
            }) => Decision::Dead(DeadRecord {
                record,
                reason,
                attempts,
                last_error,
                failed_at: now,
            }),
            // Only complete chunks are finalized, so this is a bug: say so rather than drop it.
            None => Decision::Dead(DeadRecord {
                record,
                reason: "internal error: no outcome was recorded for this record".into(),
                attempts: 0,
                last_error: None,
                failed_at: now,
            }),
        })
        .collect()
}

/// `record` with its enrichment (made at `at`, for `usage`; `saved_usd` when reused).
fn enriched(
    record: SourceRecord,
    enrichment: Box<serde_json::value::RawValue>,
    model: &str,
    prompt_version: &str,
    usage: tardis_common::messages::Usage,
    at: chrono::DateTime<Utc>,
    saved_usd: f64,
) -> EnrichedRecord {
    EnrichedRecord {
        id: record.id,
        updated_at: record.updated_at,
        payload: record.payload,
        // The text the chunk carries: the writer stores it as is.
        enrichment,
        model: model.to_string(),
        prompt_version: prompt_version.to_string(),
        usage,
        enriched_at: at,
        content_key: record.content_key,
        reused: false,
        saved_usd,
    }
}

/// The message holding `decisions` (records `k`-th of `n` parts of `chunk`).
fn assemble(
    chunk: &RecordChunk,
    decisions: &[Decision],
    part: Option<(u32, u32)>,
) -> EnrichedChunk {
    assemble_owned(chunk, decisions.to_vec(), part)
}

/// [`assemble`], taking the decisions.
fn assemble_owned(
    chunk: &RecordChunk,
    decisions: Vec<Decision>,
    part: Option<(u32, u32)>,
) -> EnrichedChunk {
    let mut records = Vec::with_capacity(decisions.len());
    let mut dead = Vec::new();
    for d in decisions {
        match d {
            Decision::Enriched(r) => records.push(r),
            Decision::Dead(r) => dead.push(r),
        }
    }
    let last = part.is_none_or(|(k, n)| k == n);
    EnrichedChunk {
        schema_version: ENRICHED_CHUNK_VERSION,
        source: chunk.source.clone(),
        chunk_id: chunk.chunk_id.clone(),
        run_id: chunk.run_id.clone(),
        chunk_seq: chunk.chunk_seq,
        records,
        dead,
        // The checkpoint moves with the last part only.
        cursor_after: if last {
            chunk.cursor_after.clone()
        } else {
            None
        },
        fetched_at: chunk.fetched_at,
        part,
    }
}

/// Why an outcome cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("encoding failed: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("one record's outcome is larger than the NATS max payload of {max} bytes")]
    RecordTooLarge { max: usize },
}

/// Each decision as one that fits alone in `limit` bytes: an enriched record too large to
/// publish is dead-lettered with that reason (the record's fault); a dead record too large
/// keeps the head of its payload.
fn fit_each(
    chunk: &RecordChunk,
    decisions: &[Decision],
    limit: usize,
) -> Result<Vec<Decision>, SplitError> {
    let mut out = Vec::with_capacity(decisions.len());
    for d in decisions {
        let size = messages::encode(&assemble(chunk, std::slice::from_ref(d), Some((1, 1))))?.len();
        if size <= limit {
            out.push(d.clone());
            continue;
        }
        let (record, attempts, now) = match d {
            Decision::Enriched(r) => (
                tardis_common::messages::SourceRecord {
                    id: r.id.clone(),
                    updated_at: r.updated_at,
                    payload: r.payload.clone(),
                    content_key: None,
                    prior: None,
                },
                1,
                r.enriched_at,
            ),
            Decision::Dead(r) => (r.record.clone(), r.attempts, r.failed_at),
        };
        let reason =
            format!("the record's outcome is {size} bytes, more than the NATS max payload allows");
        let mut dead = DeadRecord {
            record,
            reason: reason.clone(),
            attempts,
            last_error: Some(reason),
            failed_at: now,
        };
        let alone = |dead: &DeadRecord| {
            messages::encode(&assemble(
                chunk,
                &[Decision::Dead(dead.clone())],
                Some((1, 1)),
            ))
            .map(|b| b.len())
        };
        if alone(&dead)? > limit {
            let text = dead.record.payload.get();
            let head: String = text.chars().take(4096).collect();
            let stub =
                serde_json::json!({"truncated": true, "original_bytes": text.len(), "head": head});
            dead.record.payload = serde_json::value::RawValue::from_string(stub.to_string())?;
        }
        out.push(Decision::Dead(dead));
    }
    Ok(out)
}

/// One message of a chunk's outcome and its encoding (what is published).
#[derive(Debug)]
pub struct OutcomeMessage {
    pub message: EnrichedChunk,
    pub bytes: Vec<u8>,
}

impl OutcomeMessage {
    fn encode(message: EnrichedChunk) -> Result<Self, SplitError> {
        // The records' payloads are most of the message: size the buffer once.
        let capacity = message
            .records
            .iter()
            .map(|r| r.payload.get().len() + r.id.len() + 400)
            .chain(
                message
                    .dead
                    .iter()
                    .map(|d| d.record.payload.get().len() + d.reason.len() + 400),
            )
            .sum::<usize>()
            + 512;
        let mut bytes = Vec::with_capacity(capacity);
        serde_json::to_writer(&mut bytes, &message)?;
        Ok(Self { message, bytes })
    }
}

/// The outcome of `chunk` as one message, or, when that is larger than `max_payload`, as the
/// fewest parts (2, 4, 8, ...) that each fit. Part `k` of `n` always holds the same records
/// of the chunk (consecutive, by position), so two rounds that split alike decide each record
/// in the same message id. Each record is encoded once when the whole outcome fits (the
/// common case); only an outcome too large for one message is measured record by record:
/// a record too large for any message is dead-lettered, then the outcome is one message if it
/// fits now, else cut in parts.
pub fn outcome_messages(
    chunk: &RecordChunk,
    decisions: Vec<Decision>,
    max_payload: usize,
) -> Result<Vec<OutcomeMessage>, SplitError> {
    // Leave room for headers.
    let limit = max_payload.saturating_sub(1024);
    let dead_at: Vec<bool> = decisions
        .iter()
        .map(|d| matches!(d, Decision::Dead(_)))
        .collect();
    let whole = OutcomeMessage::encode(assemble_owned(chunk, decisions, None))?;
    if whole.bytes.len() <= limit {
        return Ok(vec![whole]);
    }
    // Too large: the decisions back in chunk order, then each record measured alone.
    let (mut records, mut dead) = (
        whole.message.records.into_iter(),
        whole.message.dead.into_iter(),
    );
    let decisions: Vec<Decision> = dead_at
        .iter()
        .filter_map(|&is_dead| {
            if is_dead {
                dead.next().map(Decision::Dead)
            } else {
                records.next().map(Decision::Enriched)
            }
        })
        .collect();
    let fitted = fit_each(chunk, &decisions, limit)?;
    let decisions = fitted.as_slice();
    // With the records too large for any message dead-lettered (the head of their payload
    // kept), the outcome may fit one message after all.
    let whole = OutcomeMessage::encode(assemble(chunk, decisions, None))?;
    if whole.bytes.len() <= limit {
        return Ok(vec![whole]);
    }
    let mut n = 2usize;
    while n / 2 < decisions.len() {
        let per = decisions.len().div_ceil(n);
        let mut parts = Vec::with_capacity(n);
        for k in 0..n {
            let from = (k * per).min(decisions.len());
            let to = ((k + 1) * per).min(decisions.len());
            let part = OutcomeMessage::encode(assemble(
                chunk,
                &decisions[from..to],
                Some((k as u32 + 1, n as u32)),
            ))?;
            if part.bytes.len() > limit {
                break;
            }
            parts.push(part);
        }
        if parts.len() == n {
            return Ok(parts);
        }
        n *= 2;
    }
    Err(SplitError::RecordTooLarge { max: max_payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use tardis_common::messages::{SCHEMA_VERSION, SourceRecord, Usage};

    fn chunk(n: usize, size: usize) -> RecordChunk {
        let records: Vec<SourceRecord> = (0..n)
            .map(|i| SourceRecord {
                id: i.to_string(),
                updated_at: None,
                payload: RawValue::from_string(format!("{{\"t\":\"{}\"}}", "x".repeat(size)))
                    .unwrap(),
                content_key: None,
                prior: None,
            })
            .collect();
        RecordChunk {
            schema_version: SCHEMA_VERSION,
            source: "s".into(),
            chunk_id: messages::chunk_id("s", &records),
            run_id: "r".into(),
            chunk_seq: 0,
            records,
            cursor_after: Some(tardis_common::messages::Cursor::Token { token: "t".into() }),
            fetched_at: Utc::now(),
        }
    }

    fn outcomes(n: usize) -> Vec<Option<Outcome>> {
        (0..n)
            .map(|i| {
                Some(if i % 3 == 1 {
                    Outcome::Dead {
                        reason: "bad".into(),
                        attempts: 3,
                        last_error: None,
                    }
                } else {
                    Outcome::Enriched {
                        enrichment: serde_json::value::RawValue::from_string(
                            r#"{"sentiment":"positive"}"#.into(),
                        )
                        .unwrap(),
                        usage: Usage::default(),
                    }
                })
            })
            .collect()
    }

    #[test]
    fn every_record_is_in_the_one_outcome_message() {
        let c = chunk(6, 10);
        let d = decide(c.records.clone(), outcomes(6), "m", "p", Utc::now());
        let msgs = outcome_messages(&c, d, 1 << 20).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0].message.records.len() + msgs[0].message.dead.len(),
            6
        );
        assert_eq!(msgs[0].message.dead.len(), 2);
        assert_eq!(msgs[0].message.msg_id(), format!("enr:s:{}", c.chunk_id));
        assert!(msgs[0].message.cursor_after.is_some());
    }

    #[test]
    fn an_outcome_too_large_is_cut_in_parts_by_position() {
        let c = chunk(8, 3000);
        let d = decide(c.records.clone(), outcomes(8), "m", "p", Utc::now());
        let msgs = outcome_messages(&c, d, 10_000).unwrap();
        assert_eq!(msgs.len(), 4, "two records of ~3 KB per part");
        let ids: Vec<Vec<String>> = msgs
            .iter()
            .map(|m| {
                let mut ids: Vec<String> = m.message.records.iter().map(|r| r.id.clone()).collect();
                ids.extend(m.message.dead.iter().map(|d| d.record.id.clone()));
                ids.sort();
                ids
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                vec!["0", "1"],
                vec!["2", "3"],
                vec!["4", "5"],
                vec!["6", "7"]
            ]
        );
        assert_eq!(
            msgs[3].message.msg_id(),
            format!("enr:s:{}:4/4", c.chunk_id)
        );
        assert!(msgs[..3].iter().all(|m| m.message.cursor_after.is_none()));
        assert!(
            msgs[3].message.cursor_after.is_some(),
            "the last part moves the checkpoint"
        );
        // Another round with other decisions cuts the same way.
        let mut other = outcomes(8);
        other.reverse();
        let d2 = decide(c.records.clone(), other, "m", "p", Utc::now());
        let again = outcome_messages(&c, d2, 10_000).unwrap();
        assert_eq!(again.len(), 4);
        for (a, b) in msgs.iter().zip(&again) {
            assert_eq!(a.message.msg_id(), b.message.msg_id());
        }
    }

    #[test]
    fn a_chunk_of_one_record_too_large_is_decided_in_one_message() {
        // The fetcher cuts chunks by the max payload: a large record comes alone.
        let c = chunk(1, 20_000);
        let d = decide(c.records.clone(), outcomes(1), "m", "p", Utc::now());
        let msgs = outcome_messages(&c, d, 10_000).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message.msg_id(), format!("enr:s:{}", c.chunk_id));
        assert_eq!(msgs[0].message.dead.len(), 1);
        assert!(msgs[0].bytes.len() <= 10_000);
    }

    #[test]
    fn an_outcome_that_fits_once_a_record_is_cut_down_stays_one_message() {
        // Two small records and one too large: once that one is dead-lettered with the head
        // of its payload, the outcome fits one message, as it always did (same message id).
        let mut c = chunk(3, 10);
        c.records[1].payload =
            RawValue::from_string(format!("{{\"t\":\"{}\"}}", "x".repeat(20_000))).unwrap();
        let d = decide(c.records.clone(), outcomes(3), "m", "p", Utc::now());
        let msgs = outcome_messages(&c, d, 10_000).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message.msg_id(), format!("enr:s:{}", c.chunk_id));
        assert_eq!(
            msgs[0].message.records.len() + msgs[0].message.dead.len(),
            3
        );
    }

    #[test]
    fn a_record_whose_outcome_cannot_fit_is_dead_lettered_not_retried_forever() {
        let c = chunk(2, 20_000);
        let d = decide(c.records.clone(), outcomes(2), "m", "p", Utc::now());
        let msgs = outcome_messages(&c, d, 10_000).unwrap();
        let dead: Vec<&DeadRecord> = msgs.iter().flat_map(|m| m.message.dead.iter()).collect();
        assert_eq!(dead.len(), 2);
        assert!(
            dead[0].reason.contains("NATS max payload"),
            "{}",
            dead[0].reason
        );
        assert!(dead[0].record.payload.get().contains("\"truncated\":true"));
        for m in &msgs {
            assert!(m.bytes.len() <= 10_000);
            assert_eq!(m.bytes, messages::encode(&m.message).unwrap());
        }
    }
}
