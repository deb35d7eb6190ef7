//! Batching records across chunks, as a policy apart from the pipeline: a batch takes records
//! until it holds `LLM_BATCH_SIZE`, its estimated prompt would pass `LLM_MAX_INPUT_TOKENS`,
//! or `ENRICH_BATCH_LINGER` has passed since its first record. Ids must be unique within a
//! request (the model answers by id); records of different sources may share one, so such a
//! record waits for the next batch, as does a record that would pass the token budget.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::enrich::Item;

/// The limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub max_records: usize,
    pub max_tokens: u32,
    pub linger: Duration,
}

/// A batch being filled.
#[derive(Debug)]
pub struct Batch {
    items: Vec<Item>,
    tokens: u32,
    ids: HashSet<String>,
}

impl Batch {
    pub fn new(first: Item) -> Self {
        Self {
            tokens: first.tokens,
            ids: HashSet::from([first.id.clone()]),
            items: vec![first],
        }
    }

    /// Adds `item`; gives it back when it does not fit (it then starts the next batch).
    #[must_use]
    pub fn add(&mut self, item: Item, rule: &Rule) -> Option<Item> {
        if self.is_full(rule)
            || self.tokens.saturating_add(item.tokens) > rule.max_tokens
            || self.ids.contains(&item.id)
        {
            return Some(item);
        }
        self.tokens += item.tokens;
        self.ids.insert(item.id.clone());
        self.items.push(item);
        None
    }

    pub fn is_full(&self, rule: &Rule) -> bool {
        self.items.len() >= rule.max_records
    }

    pub fn into_items(self) -> Vec<Item> {
        self.items
    }
}

/// The next batch from `rx` (starting with `carry`, the record the last batch gave back);
/// `None` when the channel is closed and nothing is left.
pub async fn next_batch(
    rx: &mut mpsc::UnboundedReceiver<Item>,
    carry: &mut Option<Item>,
    rule: &Rule,
) -> Option<Vec<Item>> {
    let first = match carry.take() {
        Some(i) => i,
        None => rx.recv().await?,
    };
    let deadline = tokio::time::Instant::now() + rule.linger;
    let mut batch = Batch::new(first);
    while !batch.is_full(rule) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => {
                if let Some(item) = batch.add(item, rule) {
                    *carry = Some(item);
                    break;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch.into_items())
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::enrich::ItemKey;

    fn item(id: &str, tokens: u32) -> Item {
        Item {
            key: ItemKey { chunk: 1, index: 0 },
            source: "s".into(),
            id: id.into(),
            payload: RawValue::from_string("{}".into()).unwrap(),
            tokens,
            attempts: 0,
            last_error: None,
            errors: Vec::new(),
        }
    }

    fn ids(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.id.as_str()).collect()
    }

    const RULE: Rule = Rule {
        max_records: 3,
        max_tokens: 100,
        linger: Duration::from_millis(100),
    };

    #[test]
    fn a_batch_stops_at_its_size_its_token_budget_and_a_repeated_id() {
        let mut b = Batch::new(item("1", 10));
        assert!(b.add(item("2", 10), &RULE).is_none());
        assert!(b.add(item("1", 10), &RULE).is_some(), "an id twice");
        assert!(
            b.add(item("3", 81), &RULE).is_some(),
            "over the token budget"
        );
        assert!(b.add(item("3", 80), &RULE).is_none());
        assert!(b.is_full(&RULE));
        assert!(b.add(item("4", 1), &RULE).is_some(), "full");
        assert_eq!(ids(&b.into_items()), ["1", "2", "3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_goes_after_the_linger_and_a_refused_record_starts_the_next() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut carry = None;
        tx.send(item("1", 10)).unwrap();
        tx.send(item("2", 10)).unwrap();
        let started = tokio::time::Instant::now();
        let first = next_batch(&mut rx, &mut carry, &RULE).await.unwrap();
        assert_eq!(ids(&first), ["1", "2"], "partial");
        assert_eq!(
            started.elapsed(),
            RULE.linger,
            "sent when the linger is over"
        );
        tx.send(item("3", 10)).unwrap();
        tx.send(item("3", 10)).unwrap();
        let second = next_batch(&mut rx, &mut carry, &RULE).await.unwrap();
        assert_eq!(ids(&second), ["3"]);
        assert_eq!(carry.as_ref().map(|i| i.id.as_str()), Some("3"));
        drop(tx);
        let third = next_batch(&mut rx, &mut carry, &RULE).await.unwrap();
        assert_eq!(ids(&third), ["3"], "the carried record first");
        assert!(next_batch(&mut rx, &mut carry, &RULE).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 1..=5 {
            tx.send(item(&i.to_string(), 1)).unwrap();
        }
        let started = tokio::time::Instant::now();
        let b = next_batch(&mut rx, &mut None, &RULE).await.unwrap();
        assert_eq!(ids(&b), ["1", "2", "3"]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
