//! Cutting a page into chunks: at most `CHUNK_SIZE` records and at most the server's
//! maximum payload in bytes.

use tardis_common::messages::SourceRecord;

/// Bytes kept free in every message for the envelope, the cursor and the headers.
pub const ENVELOPE_RESERVE: usize = 4096;

/// The bytes a record takes in an encoded chunk (payload, id, time and JSON punctuation).
pub fn record_size(r: &SourceRecord) -> usize {
    r.payload.get().len() + r.id.len() + 96
}

/// Splits `records` into groups of at most `max_records` and at most `max_bytes` bytes (as
/// estimated by [`record_size`] plus [`ENVELOPE_RESERVE`]). A record too large to fit any
/// message alone is returned separately, so the caller can dead-letter it.
pub fn split(
    records: Vec<SourceRecord>,
    max_records: usize,
    max_bytes: usize,
) -> (Vec<Vec<SourceRecord>>, Vec<SourceRecord>) {
    let budget = max_bytes.saturating_sub(ENVELOPE_RESERVE).max(1);
    let max_records = max_records.max(1);
    let mut chunks = Vec::new();
    let mut oversized = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for r in records {
        let size = record_size(&r);
        if size > budget {
            oversized.push(r);
            continue;
        }
        if !current.is_empty() && (current.len() >= max_records || bytes + size > budget) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(r);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    (chunks, oversized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn rec(id: usize, payload_len: usize) -> SourceRecord {
        SourceRecord {
            id: id.to_string(),
            updated_at: None,
            payload: RawValue::from_string(format!("\"{}\"", "x".repeat(payload_len))).unwrap(),
            content_key: None,
            prior: None,
        }
    }

    #[test]
    fn by_count() {
        let (chunks, big) = split((0..7).map(|i| rec(i, 10)).collect(), 3, 1 << 20);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        assert!(big.is_empty());
        let ids: Vec<String> = chunks.concat().into_iter().map(|r| r.id).collect();
        assert_eq!(
            ids,
            (0..7).map(|i| i.to_string()).collect::<Vec<_>>(),
            "order is kept"
        );
    }

    #[test]
    fn by_bytes() {
        // Each record ~1100 bytes; 8 KiB messages leave 4 KiB: 3 per chunk.
        let (chunks, _) = split((0..7).map(|i| rec(i, 1000)).collect(), 1000, 8192);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        for c in &chunks {
            assert!(c.iter().map(record_size).sum::<usize>() <= 8192 - ENVELOPE_RESERVE);
        }
    }

    #[test]
    fn oversized_records_are_set_apart() {
        let (chunks, big) = split(vec![rec(0, 10), rec(1, 10_000), rec(2, 10)], 10, 8192);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), 2);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].id, "1");
    }

    #[test]
    fn empty_input() {
        let (chunks, big) = split(vec![], 10, 8192);
        assert!(chunks.is_empty() && big.is_empty());
    }
}
