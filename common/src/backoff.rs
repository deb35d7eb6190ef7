//! Exponential backoff with full jitter and a cap, honouring `Retry-After`.
//!
//! Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the n-th retry waits
//! a uniformly random time in `[0, min(cap, base * 2^n))`, which spreads retries of many
//! clients instead of synchronising them. When the server says how long to wait
//! (`Retry-After`, in seconds or as an HTTP date), we wait at least that long.
//!
//! The policy is pure: [`Backoff::delay_for`] takes the random draw as a parameter so it is
//! unit-tested without randomness; [`Backoff::delay`] draws it.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// The default of `RETRY_MAX_WAIT`: never wait longer than this for a server-given hint
/// (`Retry-After`, `x-ratelimit-reset-*`), whatever the server says.
pub const DEFAULT_RETRY_MAX_WAIT: Duration = Duration::from_secs(300);

/// An exponential backoff policy with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// The longest server-given wait honoured (`RETRY_MAX_WAIT`).
    pub max_wait: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            max_wait: DEFAULT_RETRY_MAX_WAIT,
        }
    }

    /// The same policy honouring server-given waits up to `max_wait` only.
    pub fn with_max_wait(self, max_wait: Duration) -> Self {
        Self { max_wait, ..self }
    }

    /// The upper bound of the wait before retry number `attempt` (0-based): `min(cap, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The wait before retry `attempt`, for a random draw `unit` in `[0, 1)`.
    pub fn delay_for(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait before retry `attempt` (0-based), drawn with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_for(attempt, rand::rng().random::<f64>())
    }

    /// The wait before retry `attempt`, at least `retry_after` when the server gave one
    /// (bounded by `max_wait`).
    pub fn delay_honouring(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = self.delay(attempt);
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.max_wait)),
            None => jittered,
        }
    }
}

/// `secs` seconds as a wait: `None` for NaN or a negative number, saturating at
/// [`Duration::MAX`] for a number too large to be a `Duration` (`1e300`), so a server's hint
/// can never panic the process; callers cap it with [`Backoff::max_wait`].
pub fn seconds_hint(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// Parses a `Retry-After` value: delay-seconds (`"120"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`), relative to `now`. A date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return seconds_hint(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u128> = (0..6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            b.ceiling(200),
            Duration::from_secs(1),
            "no overflow on huge attempts"
        );
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let b = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));
        assert_eq!(b.delay_for(2, 0.0), Duration::ZERO);
        assert_eq!(b.delay_for(2, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay_for(2, 0.999_999).as_secs(), 119);
        for attempt in 0..10 {
            let d = b.delay(attempt);
            assert!(d < b.ceiling(attempt) || d == b.ceiling(attempt), "{d:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(20));
        for _ in 0..20 {
            let d = b.delay_honouring(0, Some(Duration::from_secs(2)));
            assert!(d >= Duration::from_secs(2), "{d:?}");
        }
        let capped = b.delay_honouring(0, Some(Duration::from_secs(86_400)));
        assert_eq!(capped, DEFAULT_RETRY_MAX_WAIT);
        let b = b.with_max_wait(Duration::from_secs(7));
        assert_eq!(
            b.delay_honouring(0, Some(Duration::MAX)),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn absurd_retry_after_values_never_panic() {
        let now = SystemTime::UNIX_EPOCH;
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(20))
            .with_max_wait(Duration::from_secs(300));
        for value in [
            "1e300",
            "1.8e19",
            "99999999999999999999999",
            "inf",
            "Infinity",
            "NaN",
            "-0.5",
            "1e-300",
            "",
            "\u{0}",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let hint = parse_retry_after(value, now);
            let wait = b.delay_honouring(0, hint);
            assert!(wait <= Duration::from_secs(300), "{value:?}: {wait:?}");
        }
        assert_eq!(parse_retry_after("1e300", now), Some(Duration::MAX));
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("-0.5", now), None);
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means retry now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
