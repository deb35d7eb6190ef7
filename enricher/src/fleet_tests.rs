//! Tests of [`crate::fleet`] on Tokio's paused clock, replicas sharing a store in memory.

use super::*;
use crate::budget::RateHeaders;
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
    // The first request's reservation, then one write per FRESH_FOR of sends (500 ms of
    // them; at this pace the count cap, MAX_DEFERRED, is not reached): not one per request.
    assert!(
        writes <= 1 + 500 / FRESH_FOR.as_millis() as u64 + 2,
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

fn answer_in_background(b: &Arc<Budget>, g: Grant, how: Answered) -> tokio::task::JoinHandle<()> {
    let b = b.clone();
    tokio::spawn(async move { b.answered(COST, g, how).await })
}

/// `b`'s next request waits at least `wait`, inside its own 429's pause.
async fn admitted_no_sooner_than(b: &Arc<Budget>, wait: Duration) {
    let started = tokio::time::Instant::now();
    b.admit(COST).await;
    assert!(
        started.elapsed() >= wait,
        "sent after {:?}, inside its own 429's pause",
        started.elapsed()
    );
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
    let answering = answer_in_background(&b, g, throttled(5));
    tokio::time::sleep(Duration::from_millis(10)).await;
    admitted_no_sooner_than(&b, Duration::from_millis(4900)).await;
    answering.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_write_landing_after_a_replicas_own_429_does_not_unmeter_it() {
    let store = Arc::new(TestStore {
        delay: Duration::from_millis(50),
        ..TestStore::default()
    });
    let b = unmetered(store.clone());
    let g = b.admit(COST).await;
    // MAX_DEFERRED unmetered sends: the last starts a write of them in the background.
    for _ in 0..MAX_DEFERRED {
        b.admit(COST).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The 429 comes while that write is under way; its own write queues behind it.
    let answering = answer_in_background(&b, g, throttled(5));
    // The first write lands, with a view that does not know of the 429.
    tokio::time::sleep(Duration::from_millis(45)).await;
    admitted_no_sooner_than(&b, Duration::from_millis(4800)).await;
    answering.await.unwrap();
}

/// Another replica's handle on a [`TestStore`]'s state, without its delay.
#[derive(Debug)]
struct Beside(Arc<TestStore>);

impl BudgetStore for Beside {
    fn load(&self) -> BoxFuture<'_, Result<Option<(FleetState, u64)>, String>> {
        self.0.inner.load()
    }
    fn put<'a>(
        &'a self,
        state: &'a FleetState,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Put, String>> {
        self.0.inner.put(state, revision)
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_under_way_when_a_replicas_own_429_comes_does_not_unmeter_it() {
    let store = Arc::new(TestStore {
        delay: Duration::from_millis(50),
        ..TestStore::default()
    });
    let b = unmetered(store.clone());
    let a = unmetered(Arc::new(Beside(store.clone())));
    let g = b.admit(COST).await;
    // B's view is old: its next request reads the state first (50 ms).
    tokio::time::sleep(FRESH_FOR + Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    let reading = tokio::spawn({
        let b = b.clone();
        async move { b.admit(COST).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // B's 429 comes while that read is under way...
    let answering = answer_in_background(&b, g, throttled(5));
    tokio::time::sleep(Duration::from_millis(5)).await;
    // ...and A writes a newer state that does not know of it, which the read returns.
    a.admit(COST).await;
    reading.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(4800),
        "sent after {:?}, inside its own 429's pause",
        started.elapsed()
    );
    answering.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_429_kept_through_an_outage_outlives_the_answers_after_it() {
    let store = Arc::new(TestStore::default());
    let b = Arc::new(Budget::new(
        store.clone(),
        ceiling(6000.0),
        Clock::tokio(),
        None,
    ));
    let g = b.admit(COST).await;
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    b.answered(COST, g, throttled(30)).await;
    // More answers than are kept through failed writes come after it.
    for _ in 0..2 * MAX_KEPT {
        b.answered(COST, g, OK).await;
    }
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(DEFER_FOR + Duration::from_millis(10)).await;
    let state = store.inner.load().await.unwrap().unwrap().0;
    assert!(
        state.paused_until > 0.0,
        "the 429 was dropped, not the 2xx answers"
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_metered_by_a_cut_reads_nothing_besides_its_writes() {
    let store = Arc::new(TestStore::default());
    let b = unmetered(store.clone());
    let g = b.admit(COST).await;
    b.answered(COST, g, throttled(1)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loads = store.loads.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        b.admit(COST).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(
        store.loads.load(std::sync::atomic::Ordering::SeqCst),
        loads,
        "a rate in force: each request writes on its own revision, no read"
    );
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
