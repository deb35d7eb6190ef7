//! Keeping a run's lease: renewed every third of `FETCH_LEASE_TTL`; a renewal that fails for
//! a reason other than loss (a NATS blip) is retried until the TTL since the last good renewal
//! has nearly passed ([`retry_renewal`], pure). Loss stops the run through its token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::state::{FetchState, HeldLease};

/// What to do after a failed lease renewal, `since_ok` after the last good one: retry after
/// the returned wait, or `None` when the lease has surely expired on the server by now.
pub fn retry_renewal(ttl: Duration, since_ok: Duration) -> Option<Duration> {
    // The server counts the TTL from when it stored our last renewal, which is before we saw
    // its answer: give up a little early rather than write on an expired lease.
    let deadline = ttl.mul_f64(0.9);
    if since_ok >= deadline {
        return None;
    }
    let step = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    Some(step.min(deadline - since_ok))
}

/// Keeps the lease alive until `run_token` fires; on loss, sets `lost` and cancels the run.
/// A renewal that fails for a reason other than loss (a NATS blip) is retried until the TTL
/// since the last good renewal has nearly passed.
pub async fn keep_lease(
    state: FetchState,
    mut held: HeldLease,
    run_token: CancellationToken,
    lost: Arc<AtomicBool>,
) -> HeldLease {
    let ttl = state.lease_ttl();
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    let mut wait = every;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = run_token.cancelled() => return held,
        }
        match state.renew(&mut held).await {
            Ok(()) => {
                last_ok = tokio::time::Instant::now();
                wait = every;
            }
            Err(error) if error.is_lost() => {
                warn!(%error, "lease lost, stopping the run");
                lost.store(true, Ordering::SeqCst);
                run_token.cancel();
                return held;
            }
            Err(error) => match retry_renewal(ttl, last_ok.elapsed()) {
                Some(retry) => {
                    warn!(%error, retry_in_ms = retry.as_millis() as u64, "renewing the lease failed; retrying");
                    wait = retry;
                }
                None => {
                    warn!(%error, "the lease could not be renewed within its lifetime, stopping the run");
                    lost.store(true, Ordering::SeqCst);
                    run_token.cancel();
                    return held;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_are_retried_until_the_lease_has_surely_expired() {
        let ttl = Duration::from_secs(60);
        assert_eq!(
            retry_renewal(ttl, Duration::from_secs(20)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_renewal(ttl, Duration::from_secs(52)),
            Some(Duration::from_secs(2)),
            "never past the deadline"
        );
        assert_eq!(retry_renewal(ttl, Duration::from_secs(54)), None);
        assert_eq!(retry_renewal(ttl, Duration::from_secs(600)), None);
        let short = Duration::from_secs(3);
        assert_eq!(
            retry_renewal(short, Duration::from_secs(1)),
            Some(Duration::from_millis(300))
        );
    }
}
