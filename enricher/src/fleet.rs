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
//!   first), so once a 429 or a limit announced anywhere is written, every replica is metered
//!   within that time. A 2xx answer that announces a limit the fleet does not run under yet
//!   is written at once; it, a 429 or a spent limit holds its own replica metered until then.
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
//! unbudgeted, nor unmetered on a view older than [`FRESH_FOR`]); writing answers is best
//! effort: three tries (and at most [`BEST_EFFORT_WAIT`] behind a reservation of this
//! replica's), then they wait for the next update or another try [`DEFER_FOR`] later (at most
//! [`MAX_KEPT`] of them: the oldest dropped first, answers that hold the replica last); those
//! still waiting when the process exits are lost.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::budget::{Ceiling, Cost, FleetState, Grant};
pub use crate::fleet_pending::Answered;
use crate::fleet_pending::{Deferred, Settlement, holds};
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

/// At most this many 2xx settlements and unmetered sends wait for the replica's next update.
/// Time bounds them first ([`FRESH_FOR`], [`DEFER_FOR`]); this only caps a burst. At 16, two
/// unmetered replicas at full speed (an instant LLM, one write per 8 requests) made about
/// 525 synced JetStream writes per 100,000 records for their counts; at 256 a replica that
/// keeps sending writes about every [`FRESH_FOR`].
pub const MAX_DEFERRED: usize = 256;
/// ... and 2xx settlements for no longer than this: then they are written by themselves.
pub const DEFER_FOR: Duration = Duration::from_secs(2);
/// How old a replica's view of the shared state may be for a request to go out unmetered
/// without reading it again; also the longest an unmetered send waits to be counted.
pub const FRESH_FOR: Duration = Duration::from_millis(250);
/// How long a settlement waits for this replica's update in progress (a reservation retrying
/// through a KV outage) before it gives up for now.
pub const BEST_EFFORT_WAIT: Duration = Duration::from_secs(1);
/// Answers and sends kept through failed writes (two writes' worth): the oldest dropped
/// first, answers that hold the replica last.
pub const MAX_KEPT: usize = 512;

/// A replica's view of the shared state.
#[derive(Debug, Default)]
struct View {
    /// The state as last read or written, its revision, and when (clock ms).
    seen: Option<(FleetState, u64, f64)>,
    /// Reads of an older revision are ignored: a read that began before this replica's own
    /// write (or before it learned its view was out of date) must not bring the old one back.
    floor: u64,
    /// Answers that end the fleet's being unmetered, not written yet (waiting, or in a write
    /// under way): while there are any, this replica's requests reserve.
    held: u32,
}

impl View {
    /// Drops what was seen, and any read of its revision still under way.
    fn drop_seen(&mut self) {
        if let Some((_, revision, _)) = self.seen.take() {
            self.floor = self.floor.max(revision + 1);
        }
    }
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
                    let asked = self.clock.now_ms();
                    let loaded = self.store.load().await;
                    if let Ok(Some((state, revision))) = &loaded {
                        self.remember(state.clone(), *revision, asked, false);
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
                let asked = self.clock.now_ms();
                if let Ok(Some((state, revision))) = self.store.load().await {
                    let paused = state.paused_until > grant.send_at + 1.0;
                    self.remember(state, revision, asked, false);
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
                let grant = self
                    .update(0, |s, now| {
                        for d in &settled {
                            d.apply(s, &ceiling, now);
                        }
                        s.reserve(now, &ceiling, cost)
                    })
                    .await;
                // Never `None`: a reservation retries until the store answers.
                self.release(holds(&settled));
                grant.unwrap_or(Grant {
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
        // A replica's first request is always a reservation: it writes the state if none is;
        // and one whose own answer ended the unmetered fleet reserves until that is written.
        let (mut state, _, mut at) = {
            let view = self.view();
            if view.held > 0 {
                return None;
            }
            view.seen.clone()?
        };
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
        self.view().seen.clone()
    }

    /// Takes `state` at `revision` as the view: always when this replica `wrote` it, else
    /// only if it is no older than what the replica knows of and no answer of its own that
    /// ends the unmetered fleet is waiting to be written (a read begun before it came must
    /// not let a request out unmetered); whether it was taken.
    fn remember(&self, state: FleetState, revision: u64, at: f64, wrote: bool) -> bool {
        let mut view = self.view();
        if !wrote && (revision < view.floor || view.held > 0) {
            return false;
        }
        view.floor = revision;
        view.seen = Some((state, revision, at));
        true
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the view, and any read of its revision still under way: until something newer is
    /// read or written, this replica's requests reserve (they are metered).
    fn forget(&self) {
        self.view().drop_seen();
    }

    /// An answer that ends the fleet's being unmetered is waiting: this replica's requests
    /// reserve until it is written ([`Self::release`]), whatever is read or written meanwhile.
    fn hold(&self) {
        let mut view = self.view();
        view.drop_seen();
        view.held += 1;
    }

    /// `n` held answers were written (or dropped).
    fn release(&self, n: u32) {
        let mut view = self.view();
        view.held = view.held.saturating_sub(n);
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
        // A limit announced to a fleet that runs under none must meter it now.
        let announces = self
            .seen()
            .is_some_and(|(state, _, _)| state.announces_new_limit(&self.ceiling, &headers));
        let mut settlement = Settlement {
            cost,
            grant,
            usage,
            headers,
            throttled,
            at: now,
            hold: false,
        };
        settlement.hold = settlement.urgent() || announces;
        if settlement.hold {
            // This replica's own requests must not go out unmetered on its view until the
            // write lands: they reserve (behind it) from now on. Held before it is queued, so
            // the write that takes it always finds it counted.
            self.hold();
        }
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
        if done.is_some() {
            self.release(holds(&settled));
        } else {
            // Next time, load afresh.
            self.forget();
            let dropped = {
                let mut deferred = self
                    .deferred
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut kept = settled;
                kept.append(&mut deferred);
                // Oldest first, whichever failed write put them back.
                kept.sort_by(|a, b| a.at().total_cmp(&b.at()));
                // The oldest go first, answers that hold the replica last.
                let mut excess = kept.len().saturating_sub(MAX_KEPT);
                kept.retain(|d| {
                    let drop = excess > 0 && !d.holds();
                    excess -= usize::from(drop);
                    !drop
                });
                let dropped = holds(&kept[..excess]);
                kept.drain(..excess);
                *deferred = kept;
                dropped
            };
            self.release(dropped);
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
#[path = "fleet_tests.rs"]
mod tests;
