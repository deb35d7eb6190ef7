//! The health of the LLM endpoint, shared by every batch of the process: the circuit that
//! opens after three failures in a row (`/ready` says `llm`; no more chunks are pulled while
//! work is in flight, until a request succeeds), and the halt — a refused key, a missing model, answers that are not
//! completions — after which the enricher takes no work at all until restarted.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tardis_common::ops::ReadyFlag;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// The health of the endpoint, shared by every batch of the process.
#[derive(Debug)]
pub struct LlmHealth {
    consecutive_failures: AtomicU32,
    halted: Mutex<Option<String>>,
    pub(crate) halt: CancellationToken,
    ready: ReadyFlag,
    halted_gauge: Option<prometheus::IntGauge>,
}

impl LlmHealth {
    pub fn new(ready: ReadyFlag) -> Self {
        ready.set(true);
        Self {
            consecutive_failures: AtomicU32::new(0),
            halted: Mutex::new(None),
            halt: CancellationToken::new(),
            ready,
            halted_gauge: None,
        }
    }

    /// Sets `gauge` to 1 when the enricher halts (`tardis_enrich_halted`).
    pub fn with_halted_gauge(mut self, gauge: prometheus::IntGauge) -> Self {
        self.halted_gauge = Some(gauge);
        self
    }

    pub(crate) fn success(&self) {
        self.consecutive_failures.store(0, Ordering::SeqCst);
        if !self.is_halted() {
            self.ready.set(true);
        }
    }

    pub(crate) fn failure(&self) {
        if self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1 >= 3 {
            self.ready.set(false);
        }
    }

    /// Three or more failures in a row: stop taking new work.
    pub fn is_open(&self) -> bool {
        self.consecutive_failures.load(Ordering::SeqCst) >= 3
    }

    pub(crate) fn halt_with(&self, reason: String) {
        let mut h = self
            .halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.is_none() {
            error!(reason = %reason, "LLM endpoint unusable: no more work is taken; fix the configuration and restart");
            *h = Some(reason);
        }
        self.ready.set(false);
        if let Some(g) = &self.halted_gauge {
            g.set(1);
        }
        self.halt.cancel();
    }

    pub fn is_halted(&self) -> bool {
        self.halt.is_cancelled()
    }

    /// Why processing halted, if it did.
    pub fn halt_reason(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn halted(&self) -> CancellationToken {
        self.halt.clone()
    }
}
