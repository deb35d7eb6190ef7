//! Tests of [`crate::spend`]: the pure decisions, and replicas sharing a store in memory on
//! Tokio's paused clock.

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
    let store = std::sync::Arc::new(TestStore::default());
    // Two replicas, one budget of $1.
    let a = replica(&store, Some(1.0));
    let b = replica(&store, Some(1.0));
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
    let c = replica(&store, Some(2.0));
    assert_eq!(c.gate(today).await, Gate::Open);
}

/// The fleet's store in memory, shared by replicas, counting its writes. `down` makes it
/// unreachable; each `add` first waits the next of `delays` (none: no wait), and with
/// `land_first` it lands before the wait, so only its answer is late (a write whose reply is
/// slow).
#[derive(Debug, Default)]
struct TestStore {
    inner: MemorySpend,
    adds: std::sync::atomic::AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    delays: Mutex<std::collections::VecDeque<std::time::Duration>>,
    land_first: bool,
}

impl TestStore {
    fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn land(&self, day: &str, usd: f64) -> Result<f64, String> {
        self.adds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.add(day, usd).await
    }

    fn adds(&self) -> usize {
        self.adds.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn of(&self, day: &str) -> f64 {
        self.inner.total(day).await.unwrap()
    }
}

/// A replica's handle on the [`TestStore`].
#[derive(Debug)]
struct Replica(std::sync::Arc<TestStore>);

impl SpendStore for Replica {
    fn total<'a>(&'a self, day: &'a str) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move {
            if self.0.is_down() {
                return Err("down".into());
            }
            self.0.inner.total(day).await
        })
    }

    fn add<'a>(&'a self, day: &'a str, usd: f64) -> BoxFuture<'a, Result<f64, String>> {
        Box::pin(async move {
            let delay = self.0.delays.lock().unwrap().pop_front();
            let landed = if self.0.land_first {
                Some(self.0.land(day, usd).await)
            } else {
                None
            };
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if self.0.is_down() {
                return Err("down".into());
            }
            match landed {
                Some(total) => total,
                None => self.0.land(day, usd).await,
            }
        })
    }
}

fn replica(store: &std::sync::Arc<TestStore>, budget: Option<f64>) -> std::sync::Arc<DailySpend> {
    std::sync::Arc::new(DailySpend::new(
        Box::new(Replica(store.clone())),
        budget,
        None,
    ))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn only_a_budget_saves_at_once_and_only_for_a_large_answer_or_one_that_reaches_it() {
    assert!(
        !save_at_once(5.0, 0.0, None),
        "no budget: the saver's second is soon enough"
    );
    assert!(!save_at_once(0.009, 0.0, Some(1.0)));
    assert!(
        save_at_once(0.01, 0.0, Some(1.0)),
        "a hundredth of the budget"
    );
    assert!(!save_at_once(0.009, 0.99, Some(1.0)));
    assert!(save_at_once(0.009, 0.991, Some(1.0)), "reaches the budget");
    assert!(!save_at_once(0.0, 5.0, Some(1.0)), "nothing to save");
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_answers_are_saved_together_once_a_second_not_one_write_each() {
    let store = std::sync::Arc::new(TestStore::default());
    let spend = replica(&store, None);
    let stop = tokio_util::sync::CancellationToken::new();
    let saver = tokio::spawn({
        let (spend, stop) = (spend.clone(), stop.clone());
        async move { spend.run_saver(stop).await }
    });
    let today = at("2026-12-01T10:00:00Z");
    for _ in 0..100 {
        spend.record(0.001, today).await;
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        store.adds(),
        0,
        "100 answers in half a second, no write yet"
    );
    tokio::time::sleep(SAVE_EVERY).await;
    assert_eq!(store.adds(), 1, "one write for the second's answers");
    assert!(close(store.of("spend.2026-12-01").await, 0.1));
    // What is left when the replica stops is saved on the way out.
    spend.record(0.25, today).await;
    stop.cancel();
    saver.await.unwrap();
    assert_eq!(store.adds(), 2);
    assert!(close(store.of("spend.2026-12-01").await, 0.35));
}

#[tokio::test(start_paused = true)]
async fn under_a_budget_the_answer_that_reaches_it_is_saved_at_once_for_the_fleet_to_see() {
    let store = std::sync::Arc::new(TestStore::default());
    let (a, b) = (replica(&store, Some(1.0)), replica(&store, Some(1.0)));
    let today = at("2026-12-01T10:00:00Z");
    a.record(0.001, today).await;
    assert_eq!(store.adds(), 0, "a small answer waits for the saver");
    a.record(0.994, today).await;
    assert_eq!(store.adds(), 1, "a large answer is saved at once");
    assert!(close(store.of("spend.2026-12-01").await, 0.995));
    assert_eq!(b.gate(today).await, Gate::Open);
    a.record(0.006, today).await;
    assert_eq!(store.adds(), 2, "0.006 is small, but it reaches the budget");
    tokio::time::advance(READ_EVERY).await;
    assert!(matches!(b.gate(today).await, Gate::Paused { .. }));
    assert!(matches!(a.gate(today).await, Gate::Paused { .. }));
}

#[tokio::test(start_paused = true)]
async fn spend_is_saved_to_the_day_it_was_spent_even_when_saved_the_next() {
    let store = std::sync::Arc::new(TestStore::default());
    let spend = replica(&store, None);
    spend.record(0.2, at("2026-12-01T23:59:59.900Z")).await;
    spend.record(0.3, at("2026-12-02T00:00:00.100Z")).await;
    spend.save().await;
    assert!(close(store.of("spend.2026-12-01").await, 0.2));
    assert!(close(store.of("spend.2026-12-02").await, 0.3));
}

#[tokio::test(start_paused = true)]
async fn spend_that_could_not_be_saved_is_counted_and_saved_after_the_outage() {
    let store = std::sync::Arc::new(TestStore::default());
    let spend = replica(&store, Some(0.25));
    let today = at("2026-12-01T10:00:00Z");
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    spend.record(0.2, today).await;
    spend.save().await;
    assert_eq!(spend.gate(today).await, Gate::Open);
    spend.record(0.1, today).await;
    assert!(
        matches!(spend.gate(today).await, Gate::Paused { .. }),
        "the replica's own unsaved spend counts while the store is down"
    );
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    spend.save().await;
    assert!(close(store.of("spend.2026-12-01").await, 0.3));
    spend.save().await;
    assert!(close(store.of("spend.2026-12-01").await, 0.3), "saved once");
}

#[tokio::test(start_paused = true)]
async fn spend_being_saved_still_counts_in_the_replicas_gate_until_the_write_says_so() {
    let store = std::sync::Arc::new(TestStore {
        delays: Mutex::new([std::time::Duration::from_secs(5)].into()),
        ..TestStore::default()
    });
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let spend = replica(&store, Some(0.25));
    let today = at("2026-12-01T10:00:00Z");
    // 0.3 is saved at once, and the write hangs for 5 s before it fails (an outage).
    let recording = tokio::spawn({
        let spend = spend.clone();
        async move { spend.record(0.3, today).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!recording.is_finished(), "the save is under way");
    assert!(
        matches!(spend.gate(today).await, Gate::Paused { .. }),
        "the 0.3 being saved is still this replica's to count"
    );
    recording.await.unwrap();
    assert!(
        matches!(spend.gate(today).await, Gate::Paused { .. }),
        "and kept after the failure"
    );
}

#[tokio::test(start_paused = true)]
async fn two_saves_answering_out_of_order_never_lower_the_known_total() {
    let store = std::sync::Arc::new(TestStore {
        delays: Mutex::new([std::time::Duration::from_secs(2), std::time::Duration::ZERO].into()),
        land_first: true,
        ..TestStore::default()
    });
    let gauge = prometheus::Gauge::new("spend", "spend").unwrap();
    let spend = std::sync::Arc::new(DailySpend::new(
        Box::new(Replica(store.clone())),
        Some(1.0),
        Some(gauge.clone()),
    ));
    let today = at("2026-12-01T10:00:00Z");
    // Two saves at once: the first lands (total 0.1) but answers 2 s late, after the
    // second (total 0.3).
    let first = tokio::spawn({
        let spend = spend.clone();
        async move { spend.record(0.1, today).await }
    });
    tokio::task::yield_now().await;
    spend.record(0.2, today).await;
    assert!(close(gauge.get(), 0.3));
    first.await.unwrap();
    assert!(
        close(gauge.get(), 0.3),
        "the late answer of 0.1 does not lower it: {}",
        gauge.get()
    );
    assert!(close(spend.ledger().known("spend.2026-12-01"), 0.3));
}
