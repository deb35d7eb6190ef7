//! The fleet's LLM spend per UTC day and the daily budget (`LLM_DAILY_BUDGET_USD`).
//!
//! Every replica adds what each answered request cost to one entry per UTC day
//! (`spend.<YYYY-MM-DD>`) of the bucket `TARDIS_LLM_BUDGET`, by compare-and-set, so the total
//! is the fleet's. When today's total reaches the budget the replicas stop pulling: they stay
//! ready (nothing is wrong, nothing is dead-lettered), `tardis_enrich_paused{reason="daily_budget"}`
//! is 1 and a log line says why and until when; they resume at the next UTC day, or at once when
//! restarted with a larger budget. Chunks already held finish, so the day can end above the
//! budget by at most what the fleet held when it was reached.
//!
//! [`gate`] is the pure decision; [`DailySpend`] keeps the total ([`SpendStore`]: the KV
//! bucket, or memory for tests).

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
    /// What could not be added yet (the store was unreachable): added with the next cost.
    unsaved: Mutex<f64>,
    /// The total last read and when: read again at most every [`READ_EVERY`].
    last_read: Mutex<Option<(tokio::time::Instant, String, f64)>>,
    gauge: Option<prometheus::Gauge>,
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
            unsaved: Mutex::new(0.0),
            last_read: Mutex::new(None),
            gauge,
        }
    }

    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// Adds what a request cost to today's total (and what earlier adds could not save).
    pub async fn record(&self, usd: f64, now: DateTime<Utc>) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let pending = {
            let mut unsaved = self
                .unsaved
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::take(&mut *unsaved) + usd
        };
        match self.store.add(&day_key(now), pending).await {
            Ok(total) => {
                if let Some(g) = &self.gauge {
                    g.set(total);
                }
                *self
                    .last_read
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((tokio::time::Instant::now(), day_key(now), total));
            }
            Err(error) => {
                debug!(%error, "the daily spend could not be saved; it is added with the next cost");
                *self
                    .unsaved
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) += pending;
            }
        }
    }

    /// Whether to take more work now. Without a budget: always. When the total cannot be
    /// read, this replica's unsaved spend decides alone (an unreachable store never stops
    /// the fleet by itself).
    pub async fn gate(&self, now: DateTime<Utc>) -> Gate {
        if self.budget.is_none() {
            return Gate::Open;
        }
        let unsaved = *self
            .unsaved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let day = day_key(now);
        let cached = self
            .last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, d, _)| *d == day && at.elapsed() < READ_EVERY)
            .map(|(_, _, total)| *total);
        let read = match cached {
            Some(total) => Ok(total),
            None => self.store.total(&day).await,
        };
        let total = match read {
            Ok(total) => {
                *self
                    .last_read
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((tokio::time::Instant::now(), day, total));
                if let Some(g) = &self.gauge {
                    g.set(total);
                }
                total + unsaved
            }
            Err(error) => {
                warn!(%error, "today's LLM spend could not be read");
                unsaved
            }
        };
        gate(total, self.budget, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_gate_closes_at_the_budget_until_the_next_utc_day() {
        let now = at("2026-12-01T17:30:00Z");
        assert_eq!(gate(9.99, Some(10.0), now), Gate::Open);
        assert_eq!(gate(100.0, None, now), Gate::Open);
        assert_eq!(
            gate(10.0, Some(10.0), now),
            Gate::Paused {
                spent: 10.0,
                budget: 10.0,
                until: at("2026-12-02T00:00:00Z")
            }
        );
        assert_eq!(day_key(now), "spend.2026-12-01");
        assert_eq!(day_key(at("2026-12-01T23:59:59.999Z")), "spend.2026-12-01");
        assert_eq!(day_key(at("2026-12-02T00:00:00Z")), "spend.2026-12-02");
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleet_spend_adds_up_per_day_and_reopens_the_next_day() {
        let store = std::sync::Arc::new(MemorySpend::default());
        #[derive(Debug)]
        struct Shared(std::sync::Arc<MemorySpend>);
        impl SpendStore for Shared {
            fn total<'a>(&'a self, day: &'a str) -> BoxFuture<'a, Result<f64, String>> {
                self.0.total(day)
            }
            fn add<'a>(&'a self, day: &'a str, usd: f64) -> BoxFuture<'a, Result<f64, String>> {
                self.0.add(day, usd)
            }
        }
        // Two replicas, one budget of $1.
        let a = DailySpend::new(Box::new(Shared(store.clone())), Some(1.0), None);
        let b = DailySpend::new(Box::new(Shared(store.clone())), Some(1.0), None);
        let today = at("2026-12-01T10:00:00Z");
        a.record(0.6, today).await;
        assert_eq!(b.gate(today).await, Gate::Open);
        b.record(0.4, today).await;
        // A replica reads the fleet's total at most once a second.
        assert_eq!(a.gate(today).await, Gate::Open, "a's last read is fresh");
        tokio::time::advance(READ_EVERY).await;
        assert!(matches!(a.gate(today).await, Gate::Paused { .. }));
        assert!(matches!(b.gate(today).await, Gate::Paused { .. }));
        assert_eq!(a.gate(at("2026-12-02T00:00:01Z")).await, Gate::Open);
        // A larger budget (a restart with it) reopens today.
        let c = DailySpend::new(Box::new(Shared(store)), Some(2.0), None);
        assert_eq!(c.gate(today).await, Gate::Open);
    }
}
