//! What a replica has not written to the fleet's budget yet: the answers it got (their
//! settlement: tokens, calibration, the provider's headers) and, while the fleet is
//! unmetered, the requests it sent. Pure: how each changes the shared state, and which must
//! be written at once; when they are written is [`crate::fleet::Budget`]'s business.

use crate::budget::{Ceiling, Cost, FleetState, Grant, RateHeaders};

/// How a granted request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answered {
    /// A 2xx with the provider's usage, if any.
    Ok {
        usage: Option<(u64, u64)>,
        headers: RateHeaders,
    },
    /// A 429.
    Throttled(RateHeaders),
    /// Anything else (the charge stands).
    Other,
}

/// What waits to be written to the shared state.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deferred {
    Answer(Settlement),
    /// A request sent unmetered: counted in the fleet's measured rate.
    Sent {
        tokens: f64,
        at: f64,
    },
}

impl Deferred {
    pub(crate) fn apply(&self, state: &mut FleetState, ceiling: &Ceiling, now: f64) {
        match self {
            Self::Answer(s) => s.apply(state, ceiling, now),
            // Counted in the window in force when written (never before its start).
            Self::Sent { tokens, .. } => state.count_unmetered(now, *tokens),
        }
    }

    pub(crate) fn at(&self) -> f64 {
        match self {
            Self::Answer(s) => s.at,
            Self::Sent { at, .. } => *at,
        }
    }

    pub(crate) fn holds(&self) -> bool {
        matches!(self, Self::Answer(s) if s.hold)
    }
}

pub(crate) fn holds(deferred: &[Deferred]) -> u32 {
    deferred.iter().filter(|d| d.holds()).count() as u32
}

/// An answer not yet written to the shared state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settlement {
    pub(crate) cost: Cost,
    pub(crate) grant: Grant,
    /// The provider's usage (a 2xx that reported it).
    pub(crate) usage: Option<(u64, u64)>,
    pub(crate) headers: RateHeaders,
    pub(crate) throttled: bool,
    /// When the answer came.
    pub(crate) at: f64,
    /// It ends the fleet's being unmetered (a 429, a limit spent or newly announced): this
    /// replica sends nothing unmetered until it is written.
    pub(crate) hold: bool,
}

impl Settlement {
    /// Applied when written (`now`). A 2xx answered before the fleet's last rate cut is
    /// applied as of its own time, so it cannot count toward growing the cut rate again.
    pub(crate) fn apply(&self, state: &mut FleetState, ceiling: &Ceiling, now: f64) {
        if self.throttled {
            state.throttled(now, self.grant.send_at, ceiling, &self.headers);
            return;
        }
        state.settle(ceiling, self.cost, self.grant.tokens, self.usage);
        let at = if self.at <= state.decreased_at {
            self.at
        } else {
            now
        };
        state.succeeded(at, ceiling, &self.headers);
    }

    /// Every replica must hear of it now, not with this one's next request: a 429, or the
    /// provider saying a limit is spent.
    pub(crate) fn urgent(&self) -> bool {
        self.throttled
            || self.headers.remaining_requests.is_some_and(|r| r < 1.0)
            || self.headers.remaining_tokens.is_some_and(|t| t < 1.0)
    }
}
