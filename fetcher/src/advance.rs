//! When the fetch cursor may move: the policy that keeps a run cut short from skipping records.
//!
//! * A **sorted** source (records in `(updated_at, id)` order, the default) moves the cursor
//!   after every published chunk to the last record of that chunk: everything before it has
//!   been handed over, so a run cut short (max pages, error, SIGTERM, lost lease) continues
//!   where it stopped.
//! * An **unsorted** source (declared with `"order": "unsorted"`, or detected) moves the
//!   cursor only when a run has read every page, to the last record of the whole run. A run
//!   cut short leaves it where the run started, and the next run reads from there again (the
//!   chunks it publishes again are dropped as duplicates by JetStream, or are identical
//!   replays for the writer).
//! * Disorder is a record that comes after a record with a later `(updated_at, id)` in the
//!   same run. From the first one on, the source is handled as unsorted for the rest of the
//!   run, and the cursor goes back to where the run started: the chunks published before
//!   may have moved it past records that are still to come.

use crate::sources::Order;
use tardis_common::messages::{Cursor, SourceRecord};

use crate::cursor;

/// The cursor policy of one incremental run.
#[derive(Debug, Clone)]
pub struct Advance {
    declared_unsorted: bool,
    disorder_seen: bool,
    start: Option<Cursor>,
    updated_at_pointer: Option<String>,
    /// The last record by `(updated_at, id)` seen so far in the run.
    seen_max: Option<Cursor>,
    out_of_order: u64,
}

/// What [`Advance::observe`] found on a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    InOrder,
    /// The run's first out-of-order record is on this page: roll the cursor back to the start.
    FirstDisorder,
    /// More disorder (already handled).
    Disorder,
}

impl Advance {
    pub fn new(order: Order, start: Option<Cursor>, updated_at_pointer: Option<String>) -> Self {
        Self {
            declared_unsorted: order == Order::Unsorted,
            disorder_seen: false,
            start,
            updated_at_pointer,
            seen_max: None,
            out_of_order: 0,
        }
    }

    /// Looks at a page's records in the order the source sent them (before any filtering).
    pub fn observe(&mut self, records: &[SourceRecord]) -> Observed {
        let mut found = 0;
        let mut running: Option<(chrono::DateTime<chrono::Utc>, &str)> = None;
        let seen = match &self.seen_max {
            Some(Cursor::Position { updated_at, id, .. }) => Some((*updated_at, id.as_str())),
            _ => None,
        };
        for r in records {
            let Some(t) = r.updated_at else { continue };
            let here = (t, r.id.as_str());
            let max = match (seen, running) {
                (Some(a), Some(b)) => Some(
                    if cursor::compare_positions((&a.0, a.1), (&b.0, b.1)).is_ge() {
                        a
                    } else {
                        b
                    },
                ),
                (a, b) => a.or(b),
            };
            match max {
                Some(m) if cursor::compare_positions((&here.0, here.1), (&m.0, m.1)).is_lt() => {
                    found += 1;
                }
                _ => running = Some(here),
            }
        }
        if running.is_some() {
            self.seen_max = cursor::later(
                self.seen_max.take(),
                cursor::max_position(records, self.updated_at_pointer.as_deref()),
            );
        }
        self.out_of_order += found;
        match (found, self.disorder_seen) {
            (0, _) => Observed::InOrder,
            (_, true) => Observed::Disorder,
            (_, false) => {
                self.disorder_seen = true;
                if self.declared_unsorted {
                    Observed::Disorder
                } else {
                    Observed::FirstDisorder
                }
            }
        }
    }

    /// Whether the run handles the source as unsorted (declared, or disorder seen).
    pub fn unsorted(&self) -> bool {
        self.declared_unsorted || self.disorder_seen
    }

    /// Records seen out of order in this run.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// The cursor the run started from.
    pub fn start(&self) -> Option<&Cursor> {
        self.start.as_ref()
    }

    /// The cursor after publishing `group`, the cursor being `current` before it.
    pub fn after_chunk(&self, current: Option<Cursor>, group: &[SourceRecord]) -> Option<Cursor> {
        if self.unsorted() {
            current
        } else {
            cursor::later(
                current,
                cursor::max_position(group, self.updated_at_pointer.as_deref()),
            )
        }
    }

    /// The cursor once the run has read every page: for an unsorted source, the last record of
    /// the run; for a sorted one, what the chunks already moved it to (`current`).
    pub fn at_end(&self, current: Option<Cursor>) -> Option<Cursor> {
        if self.unsorted() {
            cursor::later(self.start.clone(), self.seen_max.clone())
        } else {
            current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::value::RawValue;

    fn rec(id: u32, second: u32) -> SourceRecord {
        let text = format!("2026-01-01T00:00:{second:02}.000Z");
        SourceRecord {
            id: id.to_string(),
            updated_at: Some(DateTime::parse_from_rfc3339(&text).unwrap().to_utc()),
            payload: RawValue::from_string(format!(r#"{{"id":{id},"updated_at":"{text}"}}"#))
                .unwrap(),
            content_key: None,
            prior: None,
        }
    }

    fn id_of(c: &Option<Cursor>) -> Option<String> {
        match c {
            Some(Cursor::Position { id, .. }) => Some(id.clone()),
            _ => None,
        }
    }

    fn start() -> Option<Cursor> {
        Some(Cursor::Position {
            updated_at: DateTime::<Utc>::MIN_UTC,
            id: "0".into(),
            since: Some("start".into()),
        })
    }

    #[test]
    fn a_sorted_source_moves_the_cursor_with_every_chunk() {
        let mut a = Advance::new(Order::Sorted, start(), Some("/updated_at".into()));
        let page = [rec(1, 1), rec(2, 2), rec(3, 2)];
        assert_eq!(a.observe(&page), Observed::InOrder);
        let c = a.after_chunk(start(), &page[..2]);
        assert_eq!(id_of(&c), Some("2".into()));
        let c = a.after_chunk(c, &page[2..]);
        assert_eq!(id_of(&c), Some("3".into()));
        assert!(
            matches!(&c, Some(Cursor::Position { since: Some(s), .. }) if s == "2026-01-01T00:00:02.000Z")
        );
        assert_eq!(a.observe(&[rec(4, 3)]), Observed::InOrder);
        assert_eq!(a.out_of_order(), 0);
        assert_eq!(
            id_of(&a.at_end(c)),
            Some("3".into()),
            "sorted: as the chunks left it"
        );
    }

    #[test]
    fn disorder_is_detected_across_and_within_pages() {
        let mut a = Advance::new(Order::Sorted, start(), Some("/updated_at".into()));
        assert_eq!(a.observe(&[rec(1, 5), rec(2, 6)]), Observed::InOrder);
        assert!(!a.unsorted());
        assert_eq!(a.observe(&[rec(3, 4)]), Observed::FirstDisorder);
        assert!(a.unsorted());
        assert_eq!(a.observe(&[rec(4, 9), rec(5, 1)]), Observed::Disorder);
        assert_eq!(a.out_of_order(), 2);
        let mut b = Advance::new(Order::Sorted, None, None);
        assert_eq!(
            b.observe(&[rec(9, 9), rec(8, 9)]),
            Observed::FirstDisorder,
            "same time, smaller id"
        );
    }

    #[test]
    fn an_unsorted_source_moves_the_cursor_only_after_every_page() {
        let mut a = Advance::new(Order::Unsorted, start(), Some("/updated_at".into()));
        let page = [rec(7, 30), rec(1, 10), rec(5, 20)];
        assert_eq!(
            a.observe(&page),
            Observed::Disorder,
            "declared: no roll-back needed"
        );
        assert_eq!(
            a.after_chunk(start(), &page),
            start(),
            "chunks never move it"
        );
        a.observe(&[rec(2, 15)]);
        let end = a.at_end(start());
        assert_eq!(id_of(&end), Some("7".into()), "the whole run's last record");
        assert!(
            matches!(&end, Some(Cursor::Position { since: Some(s), .. }) if s == "2026-01-01T00:00:30.000Z")
        );
        let empty = Advance::new(Order::Unsorted, start(), None);
        assert_eq!(empty.at_end(start()), start(), "nothing read: stays");
    }

    #[test]
    fn records_without_times_are_not_disorder() {
        let mut a = Advance::new(Order::Sorted, None, None);
        let untimed = SourceRecord {
            id: "x".into(),
            updated_at: None,
            payload: RawValue::from_string("{}".into()).unwrap(),
            content_key: None,
            prior: None,
        };
        assert_eq!(
            a.observe(&[rec(1, 5), untimed, rec(2, 6)]),
            Observed::InOrder
        );
    }
}
