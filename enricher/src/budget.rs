//! The fleet's LLM budget, pure: one schedule shared by every enricher replica of a
//! `TARDIS_PREFIX` and model, so `LLM_RPM` / `LLM_TPM` are the provider's limits for the whole
//! fleet, whatever the replica count.
//!
//! The schedule is a pair of virtual-time buckets (GCRA): `requests_free_at` and
//! `tokens_free_at`, in milliseconds since the Unix epoch. A request is granted the moment
//! both are free ([`FleetState::reserve`]) and moves them on by `60 000 / rpm` ms and by its
//! tokens × `60 000 / tpm` ms. Requests are thus spaced evenly, with no burst: whatever window
//! the provider counts over, a minute never holds more than the limit (plus one request).
//! Replicas keep the state in one NATS KV entry, updated by compare-and-set (`fleet`).
//!
//! * **Demand-driven**: a replica takes budget only for the requests it sends, so an idle
//!   replica holds none, a replica that dies holds none past its last reservation, and a new
//!   one is served from its first request, without any rebalancing.
//! * **Adaptive** (AIMD): a 429 pauses the whole fleet for the provider's `Retry-After` /
//!   `x-ratelimit-reset-*` and cuts the rate to 70 % (once per overload, however many requests
//!   see it); every second without one adds 5 % of the ceiling back. Without any configured
//!   limit the ceiling is the one the provider announces (`x-ratelimit-limit-*`) or, failing
//!   that, none: the fleet starts unlimited, takes 70 % of its measured rate at the first 429,
//!   and probes upward by 5 % a second — it finds a sustainable rate by itself. On a success,
//!   `x-ratelimit-remaining-* = 0` pauses the fleet until the matching reset, before any 429.
//! * **Tokens** are charged up front as the prompt estimate × the calibrated ratio of the
//!   provider's real prompt tokens to our estimate, plus the answer: the calibrated completion
//!   tokens per record, or `max_tokens` where the provider counts it (`LLM_TPM_COUNTS_MAX_TOKENS`,
//!   as OpenAI and Azure do). After the answer, the difference between the charge and the
//!   provider's `usage` is settled on the shared schedule. The calibration lives in the shared
//!   state too, so a new replica starts calibrated.
//!
//! The state carries wall-clock times: replicas' clocks must agree to well under a request
//! interval (NTP, as on any Kubernetes node).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A rate cut on a 429 multiplies the rate by this.
pub const DECREASE: f64 = 0.7;
/// Without a 429 for a second, the rate grows by this fraction of the ceiling (or of itself,
/// when the ceiling is unknown).
pub const INCREASE: f64 = 0.05;
/// Grants aim below the configured limits by this fraction, so that network jitter never
/// puts a request over the provider's count.
pub const HEADROOM: f64 = 0.03;
/// The longest pause one server hint can impose on the fleet.
pub const MAX_PAUSE: Duration = Duration::from_secs(120);
/// Rates never go below one request (or 100 tokens) a minute.
const MIN_RPM: f64 = 1.0;
const MIN_TPM: f64 = 100.0;
/// Rolling window over which the fleet's rate is measured (for unknown limits).
const WINDOW_MS: f64 = 10_000.0;
/// Weight of a new observation in the token calibration.
const CALIBRATION_WEIGHT: f64 = 0.2;

/// The limits this replica is configured with (the provider's, for the whole fleet).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ceiling {
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
    /// The provider counts `max_tokens` against its token limit when the request arrives.
    pub counts_max_tokens: bool,
}

/// What a request will cost, before calibration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Prompt tokens by our estimate (four bytes a token).
    pub prompt_estimate: u32,
    /// Records in the request.
    pub records: u32,
    /// The request's `max_tokens`.
    pub max_tokens: u32,
}

/// The provider's rate-limit headers on one answer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RateHeaders {
    /// The longest of `Retry-After` and the `x-ratelimit-reset-*` hints.
    pub retry_after: Option<Duration>,
    pub limit_requests: Option<f64>,
    pub limit_tokens: Option<f64>,
    pub remaining_requests: Option<f64>,
    pub remaining_tokens: Option<f64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// The shared schedule (one KV entry per prefix and model). Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetState {
    pub requests_free_at: f64,
    pub tokens_free_at: f64,
    /// No request is granted before this (a server's `Retry-After`).
    pub paused_until: f64,
    /// The fleet's current rates, below the ceiling after 429s; `None`: the ceiling.
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
    /// Limits the provider announced (`x-ratelimit-limit-*`).
    pub learned_rpm: Option<f64>,
    pub learned_tpm: Option<f64>,
    pub decreased_at: f64,
    pub increased_at: f64,
    /// The fleet's measured rate: the current window and the last full one.
    pub window_start: f64,
    pub window_requests: f64,
    pub window_tokens: f64,
    pub measured_rpm: f64,
    pub measured_tpm: f64,
    /// Calibration: provider prompt tokens per estimated token, completion tokens per record.
    pub prompt_ratio: f64,
    pub completion_per_record: f64,
}

impl Default for FleetState {
    fn default() -> Self {
        Self {
            requests_free_at: 0.0,
            tokens_free_at: 0.0,
            paused_until: 0.0,
            rpm: None,
            tpm: None,
            learned_rpm: None,
            learned_tpm: None,
            decreased_at: 0.0,
            increased_at: 0.0,
            window_start: 0.0,
            window_requests: 0.0,
            window_tokens: 0.0,
            measured_rpm: 0.0,
            measured_tpm: 0.0,
            prompt_ratio: 1.0,
            completion_per_record: 50.0,
        }
    }
}

/// A reservation: when to send, and the tokens charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Wall-clock ms at which the request may be sent. Unmetered (no reservation, see
    /// `fleet`): the time of the view of the state it was decided on, at or before its send —
    /// so a 429 to it counts as sent before any rate cut that view did not show.
    pub send_at: f64,
    pub tokens: f64,
}

/// The rates in force for a replica with `ceiling`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn finite(x: f64) -> Option<f64> {
    (x.is_finite() && x > 0.0).then_some(x)
}

impl FleetState {
    /// The ceilings: configured (less the headroom) or, failing that, announced by the provider.
    pub fn ceilings(&self, ceiling: &Ceiling) -> Rates {
        let headroom = |x: f64| x * (1.0 - HEADROOM);
        Rates {
            rpm: ceiling.rpm.map(headroom).or(self.learned_rpm.map(headroom)),
            tpm: ceiling.tpm.map(headroom).or(self.learned_tpm.map(headroom)),
        }
    }

    /// The rates in force: the adaptive rate, never above the ceiling.
    pub fn rates(&self, ceiling: &Ceiling) -> Rates {
        let c = self.ceilings(ceiling);
        Rates {
            rpm: min_opt(self.rpm, c.rpm).map(|r| r.max(MIN_RPM)),
            tpm: min_opt(self.tpm, c.tpm).map(|t| t.max(MIN_TPM)),
        }
    }

    /// The tokens charged up front for `cost`.
    pub fn charge(&self, ceiling: &Ceiling, cost: Cost) -> f64 {
        let prompt = f64::from(cost.prompt_estimate) * self.prompt_ratio;
        let answer = if ceiling.counts_max_tokens {
            f64::from(cost.max_tokens)
        } else {
            (self.completion_per_record * f64::from(cost.records)).min(f64::from(cost.max_tokens))
        };
        (prompt + answer).max(1.0)
    }

    /// Reserves the next slot for a request of `cost` at `now`.
    pub fn reserve(&mut self, now: f64, ceiling: &Ceiling, cost: Cost) -> Grant {
        // A pause written by a replica whose clock is far ahead lasts no longer than any
        // pause may. (The schedule itself may legitimately be booked far ahead at low rates.)
        let pause_cap = now + MAX_PAUSE.as_secs_f64() * 1000.0;
        self.paused_until = self.paused_until.min(pause_cap);
        let rates = self.rates(ceiling);
        let tokens = self.charge(ceiling, cost);
        let mut send_at = now.max(self.paused_until);
        if rates.rpm.is_some() {
            send_at = send_at.max(self.requests_free_at);
        }
        if rates.tpm.is_some() {
            send_at = send_at.max(self.tokens_free_at);
        }
        if let Some(rpm) = rates.rpm {
            self.requests_free_at = send_at + 60_000.0 / rpm;
        }
        if let Some(tpm) = rates.tpm {
            self.tokens_free_at = send_at + tokens * 60_000.0 / tpm;
        }
        self.measure(now, 1.0, tokens);
        Grant { send_at, tokens }
    }

    /// Whether a request at `now` needs no reservation: no rate is in force (none configured,
    /// announced or cut to after a 429) and the fleet is not paused. Such a request is sent at
    /// once whatever the schedule says, so it is only counted ([`Self::count_unmetered`]).
    pub fn unmetered(&self, now: f64, ceiling: &Ceiling) -> bool {
        let rates = self.rates(ceiling);
        rates.rpm.is_none() && rates.tpm.is_none() && self.paused_until <= now
    }

    /// Counts a request sent without a reservation (an unmetered fleet) in the measured rate,
    /// which is what the fleet cuts from at its first 429.
    pub fn count_unmetered(&mut self, now: f64, tokens: f64) {
        self.measure(now, 1.0, tokens);
    }

    /// Whether `headers` announce a limit this fleet does not run under yet: an unmetered
    /// fleet must hear of it at once.
    pub fn announces_new_limit(&self, ceiling: &Ceiling, headers: &RateHeaders) -> bool {
        let c = self.ceilings(ceiling);
        (c.rpm.is_none() && headers.limit_requests.and_then(finite).is_some())
            || (c.tpm.is_none() && headers.limit_tokens.and_then(finite).is_some())
    }

    fn measure(&mut self, now: f64, requests: f64, tokens: f64) {
        let elapsed = now - self.window_start;
        if !(0.0..WINDOW_MS).contains(&elapsed) {
            if (WINDOW_MS..6.0 * WINDOW_MS).contains(&elapsed) {
                self.measured_rpm = self.window_requests * 60_000.0 / elapsed;
                self.measured_tpm = self.window_tokens * 60_000.0 / elapsed;
            }
            self.window_start = now;
            self.window_requests = 0.0;
            self.window_tokens = 0.0;
        }
        self.window_requests += requests;
        self.window_tokens += tokens;
    }

    /// The fleet's rate now, measured (for unknown limits).
    fn measured(&self, now: f64) -> (f64, f64) {
        let elapsed = (now - self.window_start).max(1000.0);
        let current_rpm = self.window_requests * 60_000.0 / elapsed;
        let current_tpm = self.window_tokens * 60_000.0 / elapsed;
        (
            self.measured_rpm.max(current_rpm),
            self.measured_tpm.max(current_tpm),
        )
    }

    /// The provider's answer to a granted request: settles the tokens, calibrates, and adapts
    /// the rate. `charged` is the grant's tokens; `usage` the provider's (prompt, completion),
    /// if it answered with them.
    pub fn settle(
        &mut self,
        ceiling: &Ceiling,
        cost: Cost,
        charged: f64,
        usage: Option<(u64, u64)>,
    ) {
        let Some((prompt, completion)) = usage else {
            return;
        };
        let (prompt, completion) = (prompt as f64, completion as f64);
        if cost.prompt_estimate > 0 && prompt > 0.0 {
            let ratio = prompt / f64::from(cost.prompt_estimate);
            if let Some(r) = finite(ratio) {
                self.prompt_ratio += CALIBRATION_WEIGHT * (r - self.prompt_ratio);
            }
        }
        if cost.records > 0 {
            let per_record = completion / f64::from(cost.records);
            if per_record.is_finite() && per_record >= 0.0 {
                self.completion_per_record +=
                    CALIBRATION_WEIGHT * (per_record - self.completion_per_record);
            }
        }
        let counted = if ceiling.counts_max_tokens {
            prompt + f64::from(cost.max_tokens)
        } else {
            prompt + completion
        };
        let rates = self.rates(ceiling);
        if let Some(tpm) = rates.tpm {
            // Pay what was used and not charged, or get back what was charged and not used.
            self.tokens_free_at += (counted - charged) * 60_000.0 / tpm;
        }
        self.window_tokens += counted - charged;
    }

    /// A 2xx answer with the provider's rate-limit headers.
    pub fn succeeded(&mut self, now: f64, ceiling: &Ceiling, headers: &RateHeaders) {
        self.learn(headers);
        // The provider says the budget is spent: wait for its reset before it answers 429.
        let mut pause = None;
        if headers.remaining_requests.is_some_and(|r| r < 1.0) {
            pause = pause.max(headers.reset_requests);
        }
        if headers.remaining_tokens.is_some_and(|t| t < 1.0) {
            pause = pause.max(headers.reset_tokens);
        }
        if let Some(p) = pause {
            self.pause(now, p);
        }
        if now - self.decreased_at.max(self.increased_at) < 1000.0 {
            return;
        }
        let c = self.ceilings(ceiling);
        // Without a ceiling, grow only while the rate is what holds requests back (the
        // schedule is booked ahead): never on and on while demand stays below it.
        let binding = self.booked_ahead(now, ceiling) > 0.0;
        let grow = |rate: Option<f64>, ceiling: Option<f64>| match (rate, ceiling) {
            (None, _) => None,
            (Some(r), Some(c)) => {
                let next = r + INCREASE * c;
                (next < c).then_some(next)
            }
            (Some(r), None) if binding => Some(r * (1.0 + INCREASE)),
            (Some(r), None) => Some(r),
        };
        let (rpm, tpm) = (grow(self.rpm, c.rpm), grow(self.tpm, c.tpm));
        if (rpm, tpm) != (self.rpm, self.tpm) {
            self.rpm = rpm;
            self.tpm = tpm;
            self.increased_at = now;
        }
    }

    /// A 429 to a request sent at `sent_at`: pause the fleet for the server's hint, and cut
    /// the rate once per overload.
    pub fn throttled(&mut self, now: f64, sent_at: f64, ceiling: &Ceiling, headers: &RateHeaders) {
        self.learn(headers);
        self.pause(now, headers.retry_after.unwrap_or(Duration::from_secs(1)));
        // Every request sent before the last cut belongs to the overload that caused it (or
        // an earlier one): only a request sent at the cut rate may cut again.
        if sent_at <= self.decreased_at {
            return;
        }
        let rates = self.rates(ceiling);
        let (measured_rpm, measured_tpm) = self.measured(now);
        let tokens_out = headers.remaining_tokens.is_some_and(|t| t < 1.0);
        let requests_out = headers.remaining_requests.is_some_and(|r| r < 1.0);
        let cut_requests = requests_out || !tokens_out;
        let cut_tokens = tokens_out || (!requests_out && rates.tpm.is_some());
        // From what the fleet actually sent, when that is below the rate it was allowed.
        let base = |rate: Option<f64>, measured: f64, min: f64| match rate {
            Some(r) if measured >= min => r.min(measured),
            Some(r) => r,
            None => measured.max(min),
        };
        if cut_requests {
            let b = base(rates.rpm, measured_rpm, MIN_RPM);
            self.rpm = Some((b * DECREASE).max(MIN_RPM));
        }
        if cut_tokens {
            let b = base(rates.tpm, measured_tpm, MIN_TPM);
            self.tpm = Some((b * DECREASE).max(MIN_TPM));
        }
        self.decreased_at = now;
    }

    fn pause(&mut self, now: f64, wait: Duration) {
        let wait = wait.min(MAX_PAUSE).as_secs_f64() * 1000.0;
        self.paused_until = self.paused_until.max(now + wait);
    }

    fn learn(&mut self, headers: &RateHeaders) {
        if let Some(l) = headers.limit_requests.and_then(finite) {
            self.learned_rpm = Some(l);
        }
        if let Some(l) = headers.limit_tokens.and_then(finite) {
            self.learned_tpm = Some(l);
        }
    }

    /// How far ahead the fleet's schedule is booked at `now`, in seconds: above zero, the
    /// budget (not the replicas) is what bounds throughput.
    pub fn booked_ahead(&self, now: f64, ceiling: &Ceiling) -> f64 {
        let rates = self.rates(ceiling);
        let mut until = self.paused_until;
        if rates.rpm.is_some() {
            until = until.max(self.requests_free_at);
        }
        if rates.tpm.is_some() {
            until = until.max(self.tokens_free_at);
        }
        ((until - now) / 1000.0).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RPM_240: Ceiling = Ceiling {
        rpm: Some(240.0),
        tpm: None,
        counts_max_tokens: false,
    };

    fn cost(records: u32) -> Cost {
        Cost {
            prompt_estimate: 1000,
            records,
            max_tokens: 200 * records + 50,
        }
    }

    /// Requests granted in any 60 s window, for grants spread over `minutes`.
    fn max_per_minute(sends: &[f64]) -> usize {
        sends
            .iter()
            .map(|&start| {
                sends
                    .iter()
                    .filter(|&&s| s >= start && s < start + 60_000.0)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_fleet_of_callers_never_exceeds_the_limit_in_any_minute() {
        let mut s = FleetState::default();
        // 8 replicas x 4 callers asking all at once, again and again for three minutes.
        let mut sends = Vec::new();
        let mut now = 1_000_000.0;
        while now < 1_000_000.0 + 180_000.0 {
            for _ in 0..32 {
                let g = s.reserve(now, &RPM_240, cost(20));
                sends.push(g.send_at);
            }
            now += 500.0;
        }
        sends.retain(|&t| t < 1_000_000.0 + 180_000.0);
        let peak = max_per_minute(&sends);
        assert!(peak <= 240, "{peak} requests in one minute");
        assert!(
            peak as f64 >= 240.0 * (1.0 - HEADROOM) - 1.0,
            "uses the budget: {peak}"
        );
    }

    #[test]
    fn tokens_bound_the_rate_when_they_run_out_first() {
        let ceiling = Ceiling {
            rpm: Some(600.0),
            tpm: Some(60_000.0),
            counts_max_tokens: false,
        };
        let mut s = FleetState::default();
        let mut sends = Vec::new();
        for _ in 0..400 {
            let g = s.reserve(0.0, &ceiling, cost(20));
            sends.push((g.send_at, g.tokens));
        }
        // 1000 prompt + 20 x 50 answer = 2000 tokens a request: 30 a minute by TPM.
        assert!((sends[0].1 - 2000.0).abs() < 1e-9);
        let in_first_minute = sends.iter().filter(|(t, _)| *t < 60_000.0).count();
        assert!(
            (28..=30).contains(&in_first_minute),
            "{in_first_minute} requests"
        );
    }

    #[test]
    fn a_replica_that_stops_asking_holds_nothing() {
        let mut s = FleetState::default();
        let g = s.reserve(0.0, &RPM_240, cost(1));
        assert_eq!(g.send_at, 0.0);
        // Nobody asked for ten seconds: the next caller goes at once, no share is reserved.
        let g = s.reserve(10_000.0, &RPM_240, cost(1));
        assert_eq!(g.send_at, 10_000.0);
        let g = s.reserve(10_000.0, &RPM_240, cost(1));
        assert!((g.send_at - (10_000.0 + 60_000.0 / (240.0 * 0.97))).abs() < 1e-6);
    }

    #[test]
    fn a_429_pauses_the_fleet_and_cuts_once_per_overload() {
        let mut s = FleetState::default();
        let headers = RateHeaders {
            retry_after: Some(Duration::from_secs(3)),
            ..RateHeaders::default()
        };
        s.throttled(10_000.0, 9_800.0, &RPM_240, &headers);
        let cut = s.rpm.expect("cut");
        assert!((cut - 240.0 * 0.97 * DECREASE).abs() < 1e-9);
        // The other requests of the same overload (sent before the cut) do not cut again.
        for k in 0..10 {
            s.throttled(10_000.0 + 100.0 * f64::from(k), 9_900.0, &RPM_240, &headers);
        }
        assert_eq!(s.rpm, Some(cut));
        // Each 429 carries its own wait: the last one (at 10.9 s) says 3 s.
        assert_eq!(s.reserve(10_950.0, &RPM_240, cost(1)).send_at, 13_900.0);
        // Recovery: 5 % of the ceiling a second without a 429, up to the ceiling.
        let mut now = 14_000.0;
        for _ in 0..30 {
            s.succeeded(now, &RPM_240, &RateHeaders::default());
            now += 1000.0;
        }
        assert_eq!(s.rpm, None, "back at the ceiling");
    }

    #[test]
    fn without_limits_the_fleet_finds_a_rate_from_its_own() {
        let none = Ceiling::default();
        let mut s = FleetState::default();
        // 10 requests a second, unlimited, for 20 s.
        let mut now = 0.0;
        for _ in 0..200 {
            assert_eq!(s.reserve(now, &none, cost(1)).send_at, now);
            now += 100.0;
        }
        s.throttled(now, now - 100.0, &none, &RateHeaders::default());
        let rpm = s.rpm.expect("a rate now");
        assert!((rpm - 600.0 * DECREASE).abs() < 30.0, "{rpm}");
        // No ceiling: while demand is held back by the rate, it probes upward by itself...
        let later = now + 2000.0;
        for _ in 0..10 {
            s.reserve(later, &none, cost(1));
        }
        s.succeeded(later, &none, &RateHeaders::default());
        let probed = s.rpm.expect("rate");
        assert!(probed > rpm);
        // ...and not while demand stays below it.
        s.succeeded(later + 60_000.0, &none, &RateHeaders::default());
        assert_eq!(s.rpm, Some(probed));
        // A request sent at the new rate that still gets a 429 cuts again.
        s.throttled(
            later + 60_500.0,
            later + 60_400.0,
            &none,
            &RateHeaders::default(),
        );
        assert!(s.rpm.expect("rate") < probed);
    }

    #[test]
    fn an_unlimited_unpaused_fleet_is_unmetered_and_still_measured() {
        let none = Ceiling::default();
        let mut s = FleetState::default();
        assert!(s.unmetered(0.0, &none));
        assert!(!s.unmetered(0.0, &RPM_240), "a configured limit meters");
        // Counted requests make the measured rate a 429 cuts from, as reservations do.
        let mut now = 0.0;
        for _ in 0..200 {
            s.count_unmetered(now, 10.0);
            now += 100.0;
        }
        s.throttled(now, now - 100.0, &none, &RateHeaders::default());
        let rpm = s.rpm.expect("a rate now");
        assert!((rpm - 600.0 * DECREASE).abs() < 30.0, "{rpm}");
        assert!(
            !s.unmetered(now + 2000.0, &none),
            "cut: metered from now on"
        );
        // A pause meters while it lasts.
        let mut p = FleetState::default();
        p.pause(0.0, Duration::from_secs(5));
        assert!(!p.unmetered(4000.0, &none));
        assert!(p.unmetered(5000.0, &none));
        // A limit announced by the provider is news to an unmetered fleet only.
        let announced = RateHeaders {
            limit_requests: Some(500.0),
            ..RateHeaders::default()
        };
        assert!(p.announces_new_limit(&none, &announced));
        assert!(!p.announces_new_limit(&RPM_240, &announced));
        assert!(!p.announces_new_limit(&none, &RateHeaders::default()));
        p.learn(&announced);
        assert!(!p.announces_new_limit(&none, &announced));
        assert!(!p.unmetered(6000.0, &none));
    }

    #[test]
    fn announced_limits_become_the_ceiling() {
        let none = Ceiling::default();
        let mut s = FleetState::default();
        s.succeeded(
            0.0,
            &none,
            &RateHeaders {
                limit_requests: Some(120.0),
                remaining_requests: Some(0.0),
                reset_requests: Some(Duration::from_millis(400)),
                ..RateHeaders::default()
            },
        );
        assert_eq!(s.rates(&none).rpm, Some(120.0 * 0.97));
        // Remaining 0: paused until the reset, before any 429.
        assert_eq!(s.reserve(0.0, &none, cost(1)).send_at, 400.0);
    }

    #[test]
    fn tokens_are_calibrated_and_settled_on_the_schedule() {
        let ceiling = Ceiling {
            rpm: None,
            tpm: Some(100_000.0),
            counts_max_tokens: false,
        };
        let mut s = FleetState::default();
        let c = cost(10);
        for _ in 0..40 {
            let g = s.reserve(0.0, &ceiling, c);
            // The provider counts 1.5 x our prompt estimate and 30 tokens a record.
            s.settle(&ceiling, c, g.tokens, Some((1500, 300)));
        }
        assert!((s.prompt_ratio - 1.5).abs() < 0.01, "{}", s.prompt_ratio);
        assert!((s.completion_per_record - 30.0).abs() < 0.1);
        assert!((s.charge(&ceiling, c) - 1800.0).abs() < 20.0);
        // Whatever was charged, the schedule holds what the provider counted: 40 x 1800.
        let expected = 40.0 * 1800.0 * 60_000.0 / (100_000.0 * 0.97);
        assert!(
            (s.tokens_free_at - expected).abs() < 1.0,
            "{}",
            s.tokens_free_at
        );
    }

    #[test]
    fn a_pause_from_a_clock_far_ahead_lasts_no_longer_than_any_pause() {
        let mut s = FleetState {
            paused_until: 10_000_000.0,
            ..FleetState::default()
        };
        let g = s.reserve(1_000.0, &RPM_240, cost(1));
        assert_eq!(g.send_at, 1_000.0 + MAX_PAUSE.as_secs_f64() * 1000.0);
    }

    #[test]
    fn max_tokens_is_charged_where_the_provider_counts_it() {
        let ceiling = Ceiling {
            rpm: None,
            tpm: Some(100_000.0),
            counts_max_tokens: true,
        };
        let s = FleetState::default();
        assert_eq!(s.charge(&ceiling, cost(10)), 1000.0 + 2050.0);
    }

    #[test]
    fn the_state_reads_back_and_tolerates_missing_fields() {
        let s = FleetState {
            rpm: Some(12.5),
            ..FleetState::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<FleetState>(&text).unwrap(), s);
        let old: FleetState = serde_json::from_str(r#"{"requests_free_at": 5.0}"#).unwrap();
        assert_eq!(old.prompt_ratio, 1.0);
    }
}
