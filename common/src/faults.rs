//! Fault injection for tests: named points in the workers' delivery paths that fail on chosen
//! occurrences. Production passes [`Faults::none`], for which every check is one atomic load.
//!
//! Points (each counted from 1 in the order the process reaches it):
//!
//! * `enricher.publish.before`: a publish fails before anything is sent;
//! * `enricher.publish.reply`: a publish reaches JetStream but its acknowledgement is lost;
//! * `enricher.ack`: the ack of a record chunk is lost (the chunk comes back after the ack wait);
//! * `enricher.batch.panic`: a batch task panics (a bug);
//! * `writer.ack`: the ack of a committed batch is lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The faults to inject.
#[derive(Debug, Default)]
pub struct Faults {
    active: AtomicBool,
    plan: Mutex<HashMap<&'static str, (u64, Vec<u64>)>>,
}

impl Faults {
    /// No fault at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Fails `point` on the given occurrences (1-based).
    pub fn at(self, point: &'static str, occurrences: &[u64]) -> Self {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(point, (0, occurrences.to_vec()));
        self.active.store(true, Ordering::SeqCst);
        self
    }

    /// Counts one pass through `point`; true when this one must fail.
    pub fn fail(&self, point: &'static str) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        let mut plan = self
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((count, at)) = plan.get_mut(point) else {
            return false;
        };
        *count += 1;
        let fail = at.contains(count);
        if fail {
            tracing::warn!(point, occurrence = *count, "injected fault");
        }
        fail
    }

    /// How many times `point` was passed.
    pub fn passes(&self, point: &'static str) -> u64 {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(point)
            .map_or(0, |(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_occurrences_fail() {
        let f = Faults::none().at("p", &[2, 3]);
        let got: Vec<bool> = (0..4).map(|_| f.fail("p")).collect();
        assert_eq!(got, vec![false, true, true, false]);
        assert!(!f.fail("other"));
        assert_eq!(f.passes("p"), 4);
        assert!(!Faults::none().fail("p"));
    }
}
