//! The fleet's LLM budget over NATS (I/O): the schedule of [`crate::budget`] lives in one
//! entry of the KV bucket `TARDIS_LLM_BUDGET` (file storage, history 1), keyed by model and
//! endpoint, and every replica updates it by compare-and-set.
//!
//! * **Metered** (a rate in force — configured, announced by the provider or cut to after a
//!   429 — or a pause): a request costs one small KV write, its reservation (a request that had
//!   to wait for its slot reads the entry again before it is sent), none per record.
//! * **Unmetered** (no limit known, no pause): a request needs no slot. It is sent at once and
//!   only counted; the count rides on the replica's next write like a settlement. That holds
//!   while the replica's view of the entry is younger than [`FRESH_FOR`] (else it reads it
//!   first), so a 429 or a limit announced anywhere meters every replica within that time.
//!   A 2xx answer that announces a limit the fleet does not run under yet is written at once.
//! * A 2xx answer's settlement (its tokens, the calibration, the provider's headers) rides on
//!   the replica's next update, or is written by itself after [`DEFER_FOR`] or once
//!   [`MAX_DEFERRED`] have piled up; an answer saying a limit is spent and a 429 are written
//!   at once (with what waits before them).
//!
//! Each compare-and-set is a synced JetStream write: with two per request, and a replica's
//! own concurrent requests racing each other on one revision, the budget cost nats-server
//! and the enricher more CPU than the records did. A replica's updates therefore go one at a
//! time.
//!
//! If the bucket cannot be reached, [`Budget::admit`] waits and retries (no request goes out
//! unbudgeted, nor unmetered on a view older than [`FRESH_FOR`]); writing answers is best effort: three tries (and at most [`BEST_EFFORT_WAIT`]
//! behind a reservation of this replica's), then they wait for the next update or another try
//! [`DEFER_FOR`] later (at most [`MAX_KEPT`] of them, the newest); those still waiting when the
//! process exits are lost.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::budget::{Ceiling, Cost, FleetState, Grant, RateHeaders};
pub use crate::fleet_store::{BudgetStore, KvStore, MemoryStore, Put, bucket_config, budget_key};
use crate::metrics::EnrichMetrics;

/// Wall-clock milliseconds: the system clock, or one that follows Tokio's (paused) time.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    Tokio {
        epoch_ms: f64,
        at: tokio::time::Instant,
    },
}

impl Clock {
    pub fn tokio() -> Self {
        Self::Tokio {
            epoch_ms: 1.0e12,
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> f64 {
        match self {
            Self::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            Self::Tokio { epoch_ms, at } => epoch_ms + at.elapsed().as_secs_f64() * 1000.0,
        }
    }
}

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

/// At most this many 2xx settlements and unmetered sends wait for the replica's next update.
pub const MAX_DEFERRED: usize = 16;
/// ... and 2xx settlements for no longer than this: then they are written by themselves.
pub const DEFER_FOR: Duration = Duration::from_secs(2);
/// How old a replica's view of the shared state may be for a request to go out unmetered
/// without reading it again; also the longest an unmetered send waits to be counted.
pub const FRESH_FOR: Duration = Duration::from_millis(250);
/// How long a settlement waits for this replica's update in progress (a reservation retrying
/// through a KV outage) before it gives up for now.
pub const BEST_EFFORT_WAIT: Duration = Duration::from_secs(1);
/// Answers kept through failed writes (the newest).
pub const MAX_KEPT: usize = 64;

/// What waits to be written to the shared state.
#[derive(Debug, Clone, Copy)]
enum Deferred {
    Answer(Settlement),
    /// A request sent unmetered: counted in the fleet's measured rate.
    Sent {
        tokens: f64,
        at: f64,
    },
}

impl Deferred {
    fn apply(&self, state: &mut FleetState, ceiling: &Ceiling, now: f64) {
        match self {
            Self::Answer(s) => s.apply(state, ceiling, now),
            // Counted in the window in force when written (never before its start).
            Self::Sent { tokens, .. } => state.count_unmetered(now, *tokens),
        }
    }

    fn at(&self) -> f64 {
        match self {
            Self::Answer(s) => s.at,
            Self::Sent { at, .. } => *at,
        }
    }
}

/// An answer not yet written to the shared state.
#[derive(Debug, Clone, Copy)]
struct Settlement {
    cost: Cost,
    grant: Grant,
    /// The provider's usage (a 2xx that reported it).
    usage: Option<(u64, u64)>,
    headers: RateHeaders,
    throttled: bool,
    /// When the answer came.
    at: f64,
}

impl Settlement {
    /// Applied when written (`now`). A 2xx answered before the fleet's last rate cut is
    /// applied as of its own time, so it cannot count toward growing the cut rate again.
    fn apply(&self, state: &mut FleetState, ceiling: &Ceiling, now: f64) {
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
    fn urgent(&self) -> bool {
        self.throttled
            || self.headers.remaining_requests.is_some_and(|r| r < 1.0)
            || self.headers.remaining_tokens.is_some_and(|t| t < 1.0)
    }
}

/// A replica's view of the shared state.
#[derive(Debug, Default)]
struct View {
    /// The state as last read or written, its revision, and when (clock ms).
    seen: Option<(FleetState, u64, f64)>,
    /// Reads of an older revision are ignored: a read that began before this replica's own
    /// write (or before it learned its view was out of date) must not bring the old one back.
    floor: u64,
}

/// One replica's handle on the fleet's budget.
pub struct Budget {
    store: Arc<dyn BudgetStore>,
    ceiling: Ceiling,
    clock: Clock,
    cached: Mutex<View>,
    /// 2xx settlements and unmetered sends waiting to ride on the next update (oldest first).
    deferred: Mutex<Vec<Deferred>>,
    updating: tokio::sync::Mutex<()>,
    /// This replica's grants in the last minute (ms, tokens), for its share.
    mine: Mutex<VecDeque<(f64, f64)>>,
    metrics: Option<EnrichMetrics>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("store", &self.store)
            .field("ceiling", &self.ceiling)
            .finish_non_exhaustive()
    }
}

impl Budget {
    pub fn new(
        store: Arc<dyn BudgetStore>,
        ceiling: Ceiling,
        clock: Clock,
        metrics: Option<EnrichMetrics>,
    ) -> Self {
        Self {
            store,
            ceiling,
            clock,
            cached: Mutex::new(View::default()),
            deferred: Mutex::new(Vec::new()),
            updating: tokio::sync::Mutex::new(()),
            mine: Mutex::new(VecDeque::new()),
            metrics,
        }
    }

    pub fn ceiling(&self) -> &Ceiling {
        &self.ceiling
    }

    /// Applies `change` to the shared state by compare-and-set; `None` if the store failed
    /// `tries` times in a row (`0`: never give up).
    async fn update<R>(
        &self,
        tries: u32,
        mut change: impl FnMut(&mut FleetState, f64) -> R,
    ) -> Option<R> {
        // One update at a time per replica: its concurrent requests would otherwise race
        // each other on the same cached revision, and every loser pays a load and a retry.
        let _one_at_a_time = if tries == 0 {
            self.updating.lock().await
        } else {
            // Best effort: not for long behind a reservation retrying through an outage.
            match tokio::time::timeout(BEST_EFFORT_WAIT, self.updating.lock()).await {
                Ok(guard) => guard,
                Err(_) => return None,
            }
        };
        let mut failures = 0u32;
        let mut reload = false;
        loop {
            // The view is kept while the write is under way, so unmetered requests need not
            // read the state meanwhile.
            let current = match self.seen().filter(|_| !reload) {
                Some((state, revision, _)) => Ok(Some((state, revision))),
                None => {
                    let loaded = self.store.load().await;
                    if let Ok(Some((state, revision))) = &loaded {
                        self.remember(state.clone(), *revision, self.clock.now_ms(), false);
                    }
                    loaded
                }
            };
            reload = false;
            let error = match current {
                Ok(current) => {
                    let (mut state, revision) = match current {
                        Some((s, r)) => (s, Some(r)),
                        None => (FleetState::default(), None),
                    };
                    let now = self.clock.now_ms();
                    let result = change(&mut state, now);
                    match self.store.put(&state, revision).await {
                        Ok(Put::Stored(rev)) => {
                            self.observe(&state, now);
                            self.remember(state, rev, now, true);
                            return Some(result);
                        }
                        Ok(Put::Conflict) => {
                            reload = true;
                            continue;
                        }
                        Err(e) => {
                            self.forget();
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            failures += 1;
            self.store.recover().await;
            if tries > 0 && failures >= tries {
                warn!(error = %error, "updating the fleet's LLM budget failed; skipped");
                return None;
            }
            let wait = Duration::from_millis(100 * u64::from(failures.min(20)));
            warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "the fleet's LLM budget (NATS KV) is unavailable; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits for this request's slot in the fleet's schedule. A slot that a 429 elsewhere
    /// paused the fleet over while this request waited is given up for a new one.
    pub async fn admit(self: &Arc<Self>, cost: Cost) -> Grant {
        loop {
            let (grant, waited) = self.admit_once(cost).await;
            if waited {
                // It waited: look at the shared state again before sending.
                if let Ok(Some((state, revision))) = self.store.load().await {
                    let paused = state.paused_until > grant.send_at + 1.0;
                    self.remember(state, revision, self.clock.now_ms(), false);
                    if paused {
                        continue;
                    }
                }
            }
            return grant;
        }
    }

    /// Reserves a slot (or, unmetered, none) and sleeps until it; whether it had to wait.
    async fn admit_once(self: &Arc<Self>, cost: Cost) -> (Grant, bool) {
        let ceiling = self.ceiling;
        let grant = match self.unmetered(cost).await {
            Some(grant) => grant,
            None => {
                // The settlements waiting here ride on this reservation (one write for both);
                // taken, so that two updates at once never apply the same settlement twice.
                let settled = self.take_deferred();
                self.update(0, |s, now| {
                    for d in &settled {
                        d.apply(s, &ceiling, now);
                    }
                    s.reserve(now, &ceiling, cost)
                })
                .await
                .unwrap_or(Grant {
                    send_at: 0.0,
                    tokens: 0.0,
                })
            }
        };
        let now = self.clock.now_ms();
        {
            let mut mine = self
                .mine
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            mine.push_back((grant.send_at, grant.tokens));
            while mine.front().is_some_and(|(t, _)| *t < now - 60_000.0) {
                mine.pop_front();
            }
        }
        if let Some(m) = &self.metrics {
            m.budget_used.with_label_values(&["requests"]).inc();
            m.budget_used
                .with_label_values(&["tokens"])
                .inc_by(grant.tokens.max(0.0) as u64);
        }
        let wait = ((grant.send_at - now) / 1000.0).max(0.0);
        if let Some(m) = &self.metrics {
            m.budget_wait.observe(wait);
        }
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
        }
        (grant, wait > 0.0)
    }

    /// A grant without a reservation, when the fleet is unmetered by a view of the shared
    /// state younger than [`FRESH_FOR`] (read again if older); `None`: reserve a slot (a
    /// configured limit, a view that says metered, no view, or a read that failed). The send
    /// is counted by the next write, within [`FRESH_FOR`]. The grant's `send_at` is the time
    /// of the view it was decided on: a 429 to it cannot cut a rate cut after that view.
    async fn unmetered(self: &Arc<Self>, cost: Cost) -> Option<Grant> {
        if self.ceiling.rpm.is_some() || self.ceiling.tpm.is_some() {
            return None;
        }
        let now = self.clock.now_ms();
        // A replica's first request is always a reservation: it writes the state if none is.
        let (mut state, _, mut at) = self.seen()?;
        // Metered stays metered (a rate once in force never goes back to none; a pause is
        // waited out on the schedule): no read for it.
        if !state.unmetered(now, &self.ceiling) {
            return None;
        }
        if now - at >= FRESH_FOR.as_secs_f64() * 1000.0 {
            // Not readable: reserve, which waits for the store (nothing goes out on an old view).
            let (loaded, revision) = self.store.load().await.ok()??;
            if !self.remember(loaded.clone(), revision, now, false) {
                return None;
            }
            (state, at) = (loaded, now);
            if !state.unmetered(now, &self.ceiling) {
                return None;
            }
        }
        let tokens = state.charge(&self.ceiling, cost);
        self.defer(Deferred::Sent { tokens, at: now });
        Some(Grant {
            send_at: at,
            tokens,
        })
    }

    /// Keeps an unmetered send for the next write: at once (in the background) if
    /// [`MAX_DEFERRED`] are waiting, else within [`FRESH_FOR`], so the fleet's measured rate
    /// (what its first 429 cuts from) is never behind by more.
    fn defer(self: &Arc<Self>, sent: Deferred) {
        let (due, first_sent) = {
            let mut deferred = self
                .deferred
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let first_sent = !deferred.iter().any(|d| matches!(d, Deferred::Sent { .. }));
            deferred.push(sent);
            (deferred.len() >= MAX_DEFERRED, first_sent)
        };
        if due {
            let this = self.clone();
            tokio::spawn(async move { this.write_deferred().await });
        } else if first_sent {
            self.write_later(FRESH_FOR);
        }
    }

    fn seen(&self) -> Option<(FleetState, u64, f64)> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seen
            .clone()
    }

    /// Takes `state` at `revision` as the view: always when this replica `wrote` it, else
    /// only if it is no older than what the replica knows of; whether it was taken.
    fn remember(&self, state: FleetState, revision: u64, at: f64, wrote: bool) -> bool {
        let mut view = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !wrote && revision < view.floor {
            return false;
        }
        view.floor = revision;
        view.seen = Some((state, revision, at));
        true
    }

    /// Drops the view, and any read of its revision still under way: until something newer is
    /// read or written, this replica's requests reserve (they are metered).
    fn forget(&self) {
        let mut view = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, revision, _)) = view.seen.take() {
            view.floor = view.floor.max(revision + 1);
        }
    }

    /// Reports how a granted request ended: settles tokens, calibrates, adapts the rate. A
    /// 2xx is deferred to the next update (see the module docs) unless it is urgent or enough
    /// have waited; a 429 is written at once; anything else changes nothing (the charge
    /// stands).
    pub async fn answered(self: &Arc<Self>, cost: Cost, grant: Grant, how: Answered) {
        let (usage, headers, throttled) = match how {
            Answered::Ok { usage, headers } => (usage, headers, false),
            Answered::Throttled(headers) => (None, headers, true),
            Answered::Other => return,
        };
        let now = self.clock.now_ms();
        let settlement = Settlement {
            cost,
            grant,
            usage,
            headers,
            throttled,
            at: now,
        };
        // A limit announced to a fleet that runs under none must meter it now.
        let announces = self
            .seen()
            .map(|(state, _, _)| state)
            .unwrap_or_default()
            .announces_new_limit(&self.ceiling, &headers);
        let (due, first) = {
            let mut deferred = self
                .deferred
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            deferred.push(Deferred::Answer(settlement));
            let due = settlement.urgent()
                || announces
                || deferred.len() >= MAX_DEFERRED
                || deferred
                    .first()
                    .is_some_and(|d| now - d.at() >= DEFER_FOR.as_secs_f64() * 1000.0);
            (due, deferred.len() == 1)
        };
        if settlement.urgent() || announces {
            // This replica's own requests must not go out unmetered on its view until the
            // write lands: they reserve (behind it) from now on.
            self.forget();
        }
        if due {
            self.write_deferred().await;
        } else if first {
            self.write_later(DEFER_FOR);
        }
    }

    /// Writes the answers waiting here; if that fails they wait for the next update, and are
    /// written by themselves after [`DEFER_FOR`] if none comes.
    async fn write_deferred(self: &Arc<Self>) {
        let ceiling = self.ceiling;
        let settled = self.take_deferred();
        if settled.is_empty() {
            return;
        }
        let done = self
            .update(3, |s, now| {
                for d in &settled {
                    d.apply(s, &ceiling, now);
                }
            })
            .await;
        if done.is_none() {
            // Next time, load afresh.
            self.forget();
            {
                let mut deferred = self
                    .deferred
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut kept = settled;
                kept.append(&mut deferred);
                let excess = kept.len().saturating_sub(MAX_KEPT);
                kept.drain(..excess);
                *deferred = kept;
            }
            self.write_later(DEFER_FOR);
        }
    }

    /// Writes what is still waiting after `delay` (a replica gone idle, a failed write,
    /// unmetered sends).
    fn write_later(self: &Arc<Self>, delay: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(this) = this.upgrade() {
                this.write_deferred().await;
            }
        });
    }

    fn take_deferred(&self) -> Vec<Deferred> {
        std::mem::take(
            &mut *self
                .deferred
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Publishes the fleet's rates, this replica's share of them and the booked-ahead time.
    fn observe(&self, state: &FleetState, now: f64) {
        let Some(m) = &self.metrics else { return };
        let rates = state.rates(&self.ceiling);
        let (mine_requests, mine_tokens) = {
            let mine = self
                .mine
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            mine.iter()
                .filter(|(t, _)| *t >= now - 60_000.0)
                .fold((0.0, 0.0), |(r, k), (_, tokens)| (r + 1.0, k + tokens))
        };
        for (kind, rate, used) in [
            ("requests", rates.rpm, mine_requests),
            ("tokens", rates.tpm, mine_tokens),
        ] {
            match rate {
                Some(r) => {
                    m.budget_fleet.with_label_values(&[kind]).set(r);
                    m.budget_share.with_label_values(&[kind]).set(used / r);
                }
                None => {
                    // Unlimited: no budget to show, and no share of one (absent already is fine).
                    if m.budget_fleet.remove_label_values(&[kind]).is_ok() {
                        tracing::debug!(kind, "the fleet's budget is unlimited now");
                    }
                    if m.budget_share.remove_label_values(&[kind]).is_err() {
                        tracing::trace!(kind, "no share to remove");
                    }
                }
            }
        }
        m.budget_booked.set(state.booked_ahead(now, &self.ceiling));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet_store::BoxFuture;

    fn ceiling(rpm: f64) -> Ceiling {
        Ceiling {
            rpm: Some(rpm),
            tpm: None,
            counts_max_tokens: false,
        }
    }

    const COST: Cost = Cost {
        prompt_estimate: 100,
        records: 1,
        max_tokens: 250,
    };

    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_a_store_share_the_limit() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let clock = Clock::tokio();
        // Four replicas, each asking as fast as it can for a minute.
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let budget = Arc::new(Budget::new(store.clone(), ceiling(120.0), clock, None));
            tasks.push(tokio::spawn(async move {
                let mut n = 0u32;
                while started.elapsed() < Duration::from_secs(60) {
                    budget.admit(COST).await;
                    // Sent within the minute.
                    if started.elapsed() < Duration::from_secs(60) {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        // 120 x 0.97 a minute for the fleet, not 120 per replica.
        assert!((115..=117).contains(&total), "{total} requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_replica_for_the_servers_wait() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let clock = Clock::tokio();
        let a = Arc::new(Budget::new(store.clone(), ceiling(6000.0), clock, None));
        let b = Arc::new(Budget::new(store.clone(), ceiling(6000.0), clock, None));
        let g = a.admit(COST).await;
        a.answered(
            COST,
            g,
            Answered::Throttled(RateHeaders {
                retry_after: Some(Duration::from_secs(5)),
                ..RateHeaders::default()
            }),
        )
        .await;
        let started = tokio::time::Instant::now();
        b.admit(COST).await;
        assert!(started.elapsed() >= Duration::from_millis(4990));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_booked_before_a_429_elsewhere_waits_out_the_pause() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let clock = Clock::tokio();
        let a = Arc::new(Budget::new(store.clone(), ceiling(60.0), clock, None));
        let b = Arc::new(Budget::new(store.clone(), ceiling(60.0), clock, None));
        // A takes the first slot; B's is about a second later.
        let first = a.admit(COST).await;
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.admit(COST).await }
        });
        tokio::task::yield_now().await;
        // A 429 to the first request pauses the fleet for 10 s while the second one waits.
        b.answered(
            COST,
            first,
            Answered::Throttled(RateHeaders {
                retry_after: Some(Duration::from_secs(10)),
                ..RateHeaders::default()
            }),
        )
        .await;
        waiting.await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(10),
            "sent after {:?}, inside the pause",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_costs_one_write_and_its_settlement_rides_on_the_next() {
        let store = Arc::new(MemoryStore::default());
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(6000.0),
            Clock::tokio(),
            None,
        ));
        // The provider counts twice the prompt tokens we estimate.
        let ok = Answered::Ok {
            usage: Some((200, 10)),
            headers: RateHeaders::default(),
        };
        for _ in 0..5 {
            let g = b.admit(COST).await;
            b.answered(COST, g, ok).await;
        }
        let (state, revision) = store.load().await.unwrap().unwrap();
        assert_eq!(revision, 5, "one compare-and-set per request, not two");
        assert!(
            state.prompt_ratio > 1.2,
            "the settlements were applied with the reservations after them: {}",
            state.prompt_ratio
        );
        // An answer that is neither 2xx nor 429 writes nothing.
        let g = b.admit(COST).await;
        b.answered(COST, g, Answered::Other).await;
        assert_eq!(store.load().await.unwrap().unwrap().1, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replicas_own_concurrent_requests_never_conflict() {
        let store = Arc::new(TestStore {
            delay: Duration::from_millis(1),
            ..TestStore::default()
        });
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(600.0),
            Clock::tokio(),
            None,
        ));
        let ok = Answered::Ok {
            usage: Some((100, 10)),
            headers: RateHeaders::default(),
        };
        // LLM_CONCURRENCY 4: four requests at a time, ten each.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let g = b.admit(COST).await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        b.answered(COST, g, ok).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            store
                .inner
                .conflicts
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "a replica's updates queue behind each other instead of racing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn settlements_are_written_once_enough_have_waited() {
        let store = Arc::new(MemoryStore::default());
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(6000.0),
            Clock::tokio(),
            None,
        ));
        let ok = Answered::Ok {
            usage: Some((200, 10)),
            headers: RateHeaders::default(),
        };
        let grants: Vec<Grant> = {
            let mut v = Vec::new();
            for _ in 0..MAX_DEFERRED {
                v.push(b.admit(COST).await);
            }
            v
        };
        for g in grants {
            b.answered(COST, g, ok).await;
        }
        // MAX_DEFERRED reservations, then one write for the MAX_DEFERRED settlements.
        let (state, revision) = store.load().await.unwrap().unwrap();
        assert_eq!(revision, MAX_DEFERRED as u64 + 1);
        assert!(state.prompt_ratio > 1.2, "{}", state.prompt_ratio);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_replicas_settlements_are_written_after_defer_for() {
        let store = Arc::new(MemoryStore::default());
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(6000.0),
            Clock::tokio(),
            None,
        ));
        let g = b.admit(COST).await;
        b.answered(
            COST,
            g,
            Answered::Ok {
                usage: Some((200, 10)),
                headers: RateHeaders::default(),
            },
        )
        .await;
        assert_eq!(store.load().await.unwrap().unwrap().1, 1, "deferred");
        // No more requests from this replica: the settlement is written by itself.
        tokio::time::sleep(DEFER_FOR + Duration::from_millis(10)).await;
        let (state, revision) = store.load().await.unwrap().unwrap();
        assert_eq!(revision, 2);
        assert!(state.prompt_ratio > 1.0, "{}", state.prompt_ratio);
    }

    /// A store in memory that takes `delay` per operation, like a KV round trip, and whose
    /// next `failing` writes fail (a KV outage); while `down`, every operation fails.
    #[derive(Debug, Default)]
    struct TestStore {
        inner: MemoryStore,
        delay: Duration,
        failing: std::sync::atomic::AtomicU32,
        down: std::sync::atomic::AtomicBool,
        loads: std::sync::atomic::AtomicU32,
    }

    impl BudgetStore for TestStore {
        fn load(&self) -> BoxFuture<'_, Result<Option<(FleetState, u64)>, String>> {
            Box::pin(async move {
                self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err("no responders".to_string());
                }
                self.inner.load().await
            })
        }
        fn put<'a>(
            &'a self,
            state: &'a FleetState,
            revision: Option<u64>,
        ) -> BoxFuture<'a, Result<Put, String>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                let down = self
                    .failing
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
                    || self.down.load(std::sync::atomic::Ordering::SeqCst);
                if down {
                    return Err("no responders".to_string());
                }
                self.inner.put(state, revision).await
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_that_could_not_be_written_is_written_when_the_store_is_back() {
        let store = Arc::new(TestStore::default());
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(6000.0),
            Clock::tokio(),
            None,
        ));
        let g = b.admit(COST).await;
        // Three tries fail: the 429 waits instead of being lost.
        store.failing.store(3, std::sync::atomic::Ordering::SeqCst);
        b.answered(
            COST,
            g,
            Answered::Throttled(RateHeaders {
                retry_after: Some(Duration::from_secs(30)),
                ..RateHeaders::default()
            }),
        )
        .await;
        let paused = |s: &FleetState| s.paused_until > 0.0;
        assert!(!paused(&store.inner.load().await.unwrap().unwrap().0));
        tokio::time::sleep(DEFER_FOR + Duration::from_millis(10)).await;
        assert!(
            paused(&store.inner.load().await.unwrap().unwrap().0),
            "written by itself once the store answers"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_saying_the_limit_is_spent_pauses_every_replica_at_once() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let clock = Clock::tokio();
        let a = Arc::new(Budget::new(store.clone(), ceiling(6000.0), clock, None));
        let b = Arc::new(Budget::new(store.clone(), ceiling(6000.0), clock, None));
        let g = a.admit(COST).await;
        a.answered(
            COST,
            g,
            Answered::Ok {
                usage: Some((100, 10)),
                headers: RateHeaders {
                    remaining_requests: Some(0.0),
                    reset_requests: Some(Duration::from_secs(5)),
                    ..RateHeaders::default()
                },
            },
        )
        .await;
        let started = tokio::time::Instant::now();
        b.admit(COST).await;
        assert!(
            started.elapsed() >= Duration::from_millis(4990),
            "{:?}",
            started.elapsed()
        );
    }

    const OK: Answered = Answered::Ok {
        usage: Some((200, 10)),
        headers: RateHeaders {
            retry_after: None,
            limit_requests: None,
            limit_tokens: None,
            remaining_requests: None,
            remaining_tokens: None,
            reset_requests: None,
            reset_tokens: None,
        },
    };

    fn unmetered(store: Arc<dyn BudgetStore>) -> Arc<Budget> {
        Arc::new(Budget::new(store, Ceiling::default(), Clock::tokio(), None))
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmetered_fleet_writes_per_batch_of_requests_and_counts_every_one() {
        let store = Arc::new(MemoryStore::default());
        let b = unmetered(store.clone());
        for _ in 0..100 {
            let g = b.admit(COST).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            b.answered(COST, g, OK).await;
        }
        let writes = store.load().await.unwrap().unwrap().1;
        // The first request's reservation, then one write per MAX_DEFERRED sends and answers.
        assert!(
            writes <= 1 + 200 / MAX_DEFERRED as u64 + 1,
            "{writes} writes for 100 requests"
        );
        // Sends are counted within FRESH_FOR.
        tokio::time::sleep(FRESH_FOR + Duration::from_millis(10)).await;
        let (state, _) = store.load().await.unwrap().unwrap();
        assert_eq!(
            state.window_requests, 100.0,
            "every request counted in the fleet's measured rate"
        );
        assert!(
            state.prompt_ratio > 1.2,
            "and calibrated: {}",
            state.prompt_ratio
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_elsewhere_meters_an_unmetered_replica_within_fresh_for() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let (a, b) = (unmetered(store.clone()), unmetered(store.clone()));
        let g = a.admit(COST).await;
        b.admit(COST).await;
        a.answered(
            COST,
            g,
            Answered::Throttled(RateHeaders {
                retry_after: Some(Duration::from_secs(5)),
                ..RateHeaders::default()
            }),
        )
        .await;
        // B's view may be as old as FRESH_FOR; no older.
        tokio::time::sleep(FRESH_FOR).await;
        let started = tokio::time::Instant::now();
        b.admit(COST).await;
        assert!(
            started.elapsed() >= Duration::from_millis(4990) - FRESH_FOR,
            "sent after {:?}, inside the pause",
            started.elapsed()
        );
        assert!(store.load().await.unwrap().unwrap().0.rpm.is_some(), "cut");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_announced_to_an_unmetered_replica_meters_the_fleet_at_once() {
        let store = Arc::new(MemoryStore::default());
        let b = unmetered(store.clone());
        let g = b.admit(COST).await;
        b.answered(
            COST,
            g,
            Answered::Ok {
                usage: Some((100, 10)),
                headers: RateHeaders {
                    limit_requests: Some(600.0),
                    ..RateHeaders::default()
                },
            },
        )
        .await;
        let (state, revision) = store.load().await.unwrap().unwrap();
        assert_eq!(state.learned_rpm, Some(600.0), "written at once");
        // From now on each request reserves its slot.
        b.admit(COST).await;
        b.admit(COST).await;
        assert_eq!(store.load().await.unwrap().unwrap().1, revision + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmetered_replica_that_cannot_read_the_state_sends_nothing() {
        let store = Arc::new(TestStore::default());
        let b = unmetered(store.clone());
        b.admit(COST).await;
        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(FRESH_FOR).await;
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.admit(COST).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiting.is_finished(), "sent without a view of the budget");
        store.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("sent once the store is back")
            .unwrap();
    }

    fn throttled(secs: u64) -> Answered {
        Answered::Throttled(RateHeaders {
            retry_after: Some(Duration::from_secs(secs)),
            ..RateHeaders::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_replicas_own_429_meters_it_before_the_write_lands() {
        // Every store operation takes 50 ms, so the 429's write is under way while the
        // replica's next request asks for a slot.
        let store = Arc::new(TestStore {
            delay: Duration::from_millis(50),
            ..TestStore::default()
        });
        let b = unmetered(store.clone());
        let g = b.admit(COST).await;
        let answering = tokio::spawn({
            let b = b.clone();
            async move { b.answered(COST, g, throttled(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        b.admit(COST).await;
        assert!(
            started.elapsed() >= Duration::from_millis(4900),
            "sent after {:?}, inside its own 429's pause",
            started.elapsed()
        );
        answering.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_to_a_send_decided_before_the_cut_does_not_cut_again() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::default());
        let (a, b) = (unmetered(store.clone()), unmetered(store.clone()));
        let g = a.admit(COST).await;
        b.admit(COST).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.answered(COST, g, throttled(1)).await;
        let cut = store.load().await.unwrap().unwrap().0.rpm.expect("cut");
        // B's view (150 ms old) is from before the cut: its send is unmetered, and the 429
        // it gets belongs to the same overload.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let late = b.admit(COST).await;
        b.answered(COST, late, throttled(1)).await;
        assert_eq!(store.load().await.unwrap().unwrap().0.rpm, Some(cut));
    }

    #[tokio::test(start_paused = true)]
    async fn a_metered_replica_reads_nothing_besides_its_writes() {
        let store = Arc::new(TestStore::default());
        let b = Arc::new(Budget::new(
            store.clone(),
            ceiling(6000.0),
            Clock::tokio(),
            None,
        ));
        for _ in 0..10 {
            let g = b.admit(COST).await;
            b.answered(COST, g, OK).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The first reservation reads what is there; the rest write on their own revision.
        assert_eq!(store.loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn keys_are_kv_safe_and_differ_by_endpoint() {
        let k = budget_key(
            "meta-llama/Llama 3.1:8b",
            "https://a.example/v1/chat/completions",
        );
        assert!(k.starts_with("meta-llama_Llama_3_1_8b."), "{k}");
        assert!(
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        );
        assert_ne!(
            k,
            budget_key(
                "meta-llama/Llama 3.1:8b",
                "https://b.example/v1/chat/completions"
            )
        );
    }
}
