//! The fleet's LLM spend per UTC day and the daily budget (`LLM_DAILY_BUDGET_USD`).
//!
//! Every replica adds what its answered requests cost to one entry per UTC day
//! (`spend.<YYYY-MM-DD>`) of the bucket `TARDIS_LLM_BUDGET`, by compare-and-set, so the total
//! is the fleet's. When today's total reaches the budget the replicas stop pulling: they stay
//! ready (nothing is wrong, nothing is dead-lettered), `tardis_enrich_paused{reason="daily_budget"}`
//! is 1 and a log line says why and until when; they resume at the next UTC day, or at once when
//! restarted with a larger budget. Chunks already held finish, so the day can end above the
//! budget by what the fleet held when it was reached.
//!
//! **Saved together, not per answer.** A replica counts its answers' cost and saves the sum
//! every [`SAVE_EVERY`] ([`DailySpend::run_saver`], and once more when it stops); one
//! compare-and-set per answer, with replicas racing on the entry, was the largest cost of
//! nats-server and of the enricher. Under a budget it saves at once when its unsaved spend
//! reaches a hundredth of the budget, or brings the total it knows to the budget
//! ([`save_at_once`]). What that costs:
//! * a replica counts its own unsaved spend in its gate, but not the other replicas': each
//!   may hold up to a hundredth of the budget unsaved, so N replicas may overshoot by up to
//!   N hundredths besides what they held, and a replica may see the others' spend up to
//!   [`SAVE_EVERY`] + [`READ_EVERY`] late;
//! * a replica killed without stopping (SIGKILL, OOM) loses from the total what it had not
//!   saved: about a second of its spend, more if the store was unreachable for longer (the
//!   spend of a failed save is kept for the next one); a replica whose last save fails says
//!   so in a warning with the amount;
//! * a write whose reply is lost is tried again and may be counted twice (over, not under).
//!
//! [`gate`] and [`save_at_once`] are the pure decisions; [`DailySpend`] keeps the total
//! ([`SpendStore`]: the KV bucket, or memory for tests).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use chrono::{DateTime, Duration, NaiveTime, Utc};
use tracing::{debug, warn};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The KV key of a UTC day's spend.
pub fn day_key(now: DateTime<Utc>) -> String {
    format!("spend.{}", now.format("%Y-%m-%d"))
}

/// The start of the next UTC day.
pub fn next_day(now: DateTime<Utc>) -> DateTime<Utc> {
    (now.date_naive() + Duration::days(1))
        .and_time(NaiveTime::MIN)
        .and_utc()
}

/// How often a replica saves the spend it has not saved yet.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a replica saves its unsaved spend of today at once rather than at its next
/// [`SAVE_EVERY`]: only under a budget, and only when the unsaved spend is a hundredth of the
/// budget or more, or brings what the replica knows of today's total to the budget — the other
/// replicas must learn of the budget reached from the store, not a second later. Without a
/// budget the total only feeds `tardis_llm_spend_today_usd`, and a second's lag costs nothing.
pub fn save_at_once(unsaved: f64, known_total: f64, budget: Option<f64>) -> bool {
    match budget {
        Some(budget) => {
            unsaved > 0.0 && (unsaved >= budget / 100.0 || known_total + unsaved >= budget)
        }
        None => false,
    }
}

/// Whether the fleet may take more work today.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    Open,
    /// Today's spend reached the budget: no pulling before `until` (the next UTC day).
    Paused {
        spent: f64,
        budget: f64,
        until: DateTime<Utc>,
    },
}

/// The decision: paused once today's spend reaches the budget; no budget, never.
pub fn gate(spent_today: f64, budget: Option<f64>, now: DateTime<Utc>) -> Gate {
    match budget {
        Some(budget) if spent_today >= budget => Gate::Paused {
            spent: spent_today,
            budget,
            until: next_day(now),
        },
        _ => Gate::Open,
    }
}

/// Where the fleet's daily totals are kept.
pub trait SpendStore: Send + Sync + fmt::Debug {
    /// The total of `day` (0 when nothing was spent).
    fn total<'a>(&'a self, day: &'a str) -> BoxFuture<'a, Result<f64, String>>;
    /// Adds `usd` to `day`'s total; returns the new total.
    fn add<'a>(&'a self, day: &'a str, usd: f64) -> BoxFuture<'a, Result<f64, String>>;
}

/// The totals in the KV bucket (shared by the fleet).
pub struct KvSpend {
    pub store: kv::Store,
}

impl fmt::Debug for KvSpend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KvSpend")
    }
}

fn parse_total(bytes: &[u8]) -> Result<f64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| "the stored daily spend is not a number".to_string())
}

impl SpendStore for KvSpend {
    fn total<'a>(&'a self, day: &'a str) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move {
            match self.store.get(day).await {
                Ok(Some(bytes)) => parse_total(&bytes),
                Ok(None) => Ok(0.0),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn add<'a>(&'a self, day: &'a str, usd: f64) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move {
            for _ in 0..20 {
                let entry = self.store.entry(day).await.map_err(|e| e.to_string())?;
                let (before, revision) = match &entry {
                    Some(e) if e.operation == kv::Operation::Put => {
                        (parse_total(&e.value)?, Some(e.revision))
                    }
                    _ => (0.0, None),
                };
                let total = before + usd;
                let value: bytes::Bytes = format!("{total:.12}").into();
                let stored = match revision {
                    Some(r) => self.store.update(day, value, r).await.is_ok(),
                    None => self.store.create(day, value).await.is_ok(),
                };
                if stored {
                    return Ok(total);
                }
            }
            Err("the daily spend kept changing under this replica (20 tries)".into())
        })
    }
}

/// The totals in memory (tests; one process).
#[derive(Debug, Default)]
pub struct MemorySpend {
    totals: Mutex<std::collections::HashMap<String, f64>>,
}

impl MemorySpend {
    fn totals(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, f64>> {
        self.totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl SpendStore for MemorySpend {
    fn total<'a>(&'a self, day: &'a str) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move { Ok(self.totals().get(day).copied().unwrap_or(0.0)) })
    }

    fn add<'a>(&'a self, day: &'a str, usd: f64) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move {
            let mut totals = self.totals();
            let total = totals.entry(day.to_string()).or_default();
            *total += usd;
            Ok(*total)
        })
    }
}

/// This replica's view of the fleet's spend today.
#[derive(Debug)]
pub struct DailySpend {
    store: Box<dyn SpendStore>,
    budget: Option<f64>,
    /// What this replica spent and has not saved, and the total it last knew: one lock, so the
    /// gate sees them together.
    ledger: Mutex<Ledger>,
    gauge: Option<prometheus::Gauge>,
}

/// What a replica knows of the spend, per day (`spend.<day>`).
#[derive(Debug, Default)]
struct Ledger {
    /// Spent and not saved yet: saved every [`SAVE_EVERY`], kept when the store cannot be
    /// reached and saved with the next save.
    unsaved: std::collections::BTreeMap<String, f64>,
    /// Being saved right now (a write under way): still this replica's to count until the
    /// write says it is in the total.
    saving: std::collections::BTreeMap<String, f64>,
    /// The total last read or saved and when: read again at most every [`READ_EVERY`]. Only
    /// ever raised for the same day (a day's total never falls; two saves may answer out of
    /// order).
    last_read: Option<(tokio::time::Instant, String, f64)>,
}

impl Ledger {
    /// What this replica spent on `day` that the store's total may not hold yet.
    fn own(&self, day: &str) -> f64 {
        self.unsaved.get(day).copied().unwrap_or(0.0) + self.saving.get(day).copied().unwrap_or(0.0)
    }

    /// The total last read or saved for `day` (0 when none), fresh or not.
    fn known(&self, day: &str) -> f64 {
        self.last_read
            .as_ref()
            .filter(|(_, d, _)| d == day)
            .map_or(0.0, |(_, _, total)| *total)
    }

    /// Takes a total read or saved for `day` (never lowering the one known for it).
    fn learn(&mut self, day: String, total: f64) -> f64 {
        let total = match &self.last_read {
            Some((_, d, known)) if *d == day => total.max(*known),
            _ => total,
        };
        self.last_read = Some((tokio::time::Instant::now(), day, total));
        total
    }
}

/// How stale the total read from the store may be.
const READ_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl DailySpend {
    pub fn new(
        store: Box<dyn SpendStore>,
        budget: Option<f64>,
        gauge: Option<prometheus::Gauge>,
    ) -> Self {
        Self {
            store,
            budget,
            ledger: Mutex::new(Ledger::default()),
            gauge,
        }
    }

    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts what a request cost to today's spend; saved with the next save, or at once when
    /// [`save_at_once`] says so.
    pub async fn record(&self, usd: f64, now: DateTime<Utc>) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let day = day_key(now);
        let (unsaved, known) = {
            let mut ledger = self.ledger();
            let today = ledger.unsaved.entry(day.clone()).or_default();
            *today += usd;
            let unsaved = *today;
            (
                unsaved,
                ledger.known(&day) + ledger.saving.get(&day).copied().unwrap_or(0.0),
            )
        };
        if save_at_once(unsaved, known, self.budget) {
            self.save().await;
        }
    }

    /// Adds everything not saved yet to its day's total; returns what could not be saved (kept
    /// for the next save).
    pub async fn save(&self) -> f64 {
        let pending = {
            let mut ledger = self.ledger();
            let pending = std::mem::take(&mut ledger.unsaved);
            for (day, usd) in &pending {
                *ledger.saving.entry(day.clone()).or_default() += usd;
            }
            pending
        };
        let mut left = 0.0;
        for (day, usd) in pending {
            let added = self.store.add(&day, usd).await;
            let mut ledger = self.ledger();
            if let Some(saving) = ledger.saving.get_mut(&day) {
                *saving -= usd;
                if *saving <= 0.0 {
                    ledger.saving.remove(&day);
                }
            }
            match added {
                Ok(total) => {
                    let total = ledger.learn(day, total);
                    if let Some(g) = &self.gauge {
                        g.set(total);
                    }
                }
                Err(error) => {
                    debug!(%error, "the daily spend could not be saved; it is added with the next save");
                    *ledger.unsaved.entry(day).or_default() += usd;
                    left += usd;
                }
            }
        }
        left
    }

    /// Saves the unsaved spend every [`SAVE_EVERY`] until `stop`, then once more; says what
    /// the last save could not write (lost from the day's total when the process exits).
    pub async fn run_saver(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(SAVE_EVERY) => { self.save().await; }
            }
        }
        let lost = self.save().await;
        if lost > 0.0 {
            warn!(
                usd = lost,
                "the LLM spend of this replica's last answers could not be saved: the day's total in TARDIS_LLM_BUDGET misses it"
            );
        }
    }

    /// Whether to take more work now. Without a budget: always. When the total cannot be
    /// read, this replica's unsaved spend decides alone (an unreachable store never stops
    /// the fleet by itself).
    ///
    /// The total is read first and this replica's own spend not in it yet (unsaved, or being
    /// saved) taken after, under the lock the saves update. A save whose write lands at the
    /// store just before the read, and whose reply has not come back yet, is counted twice for
    /// that one decision: for the time of a reply, on the side of the budget.
    pub async fn gate(&self, now: DateTime<Utc>) -> Gate {
        if self.budget.is_none() {
            return Gate::Open;
        }
        let day = day_key(now);
        let cached = self
            .ledger()
            .last_read
            .as_ref()
            .filter(|(at, d, _)| *d == day && at.elapsed() < READ_EVERY)
            .map(|(_, _, total)| *total);
        let read = match cached {
            Some(total) => Ok(total),
            None => self.store.total(&day).await,
        };
        let total = match read {
            Ok(total) => {
                let mut ledger = self.ledger();
                let total = if cached.is_some() {
                    ledger.known(&day)
                } else {
                    ledger.learn(day.clone(), total)
                };
                if let Some(g) = &self.gauge {
                    g.set(total);
                }
                total + ledger.own(&day)
            }
            Err(error) => {
                warn!(%error, "today's LLM spend could not be read");
                self.ledger().own(&day)
            }
        };
        gate(total, self.budget, now)
    }
}

#[cfg(test)]
#[path = "spend_tests.rs"]
mod tests;
