//! Shutdown: SIGTERM/SIGINT fire a [`CancellationToken`] that is passed down (never global);
//! [`drain`] waits for tracked in-flight work under a deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A token cancelled on the first SIGTERM or SIGINT. Must be called inside a Tokio runtime.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let fire = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutdown requested");
        fire.cancel();
    });
    Ok(token)
}

/// In-flight work that did not finish within the grace period.
#[derive(Debug, thiserror::Error)]
#[error("{remaining} in-flight task(s) still running after the {grace:?} grace period")]
pub struct DrainTimeout {
    pub remaining: usize,
    pub grace: Duration,
}

/// Closes `tracker` and waits up to `grace` for its tasks to finish.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> Result<(), DrainTimeout> {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        Ok(())
    } else {
        let remaining = tracker.len();
        warn!(
            remaining,
            grace_ms = grace.as_millis() as u64,
            "in-flight work did not finish in time"
        );
        Err(DrainTimeout { remaining, grace })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_work_that_finishes_in_time() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(3)));
        drain(&tracker, Duration::from_secs(5)).await.unwrap();
        assert!(tracker.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_the_grace_period() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(60)));
        tracker.spawn(async {});
        let err = drain(&tracker, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.remaining, 1);
    }
}
