//! The mock's provider limits: requests and tokens per sliding window, as an OpenAI-style
//! provider counts them. Pure: the caller passes the time.
//!
//! A request is admitted when one more request stays within `rpm` and its prompt tokens,
//! added to every token of the window (prompts admitted, completions served), stay within
//! `tpm`. A refused request is not counted in the window (the handler counts it as
//! throttled); the refusal says when the oldest request leaves the window and what the window
//! held, for the `Retry-After` and `x-ratelimit-*` headers.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The limits of one request's admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub window: Duration,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// Why a request was refused, and what the window held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Until the oldest request admitted leaves the window (1 s when none is in it).
    pub reset: Duration,
    pub used_requests: u64,
    pub used_tokens: u64,
}

/// What was admitted and served within the window.
#[derive(Debug, Default)]
pub struct Window {
    /// Requests admitted, with their prompt tokens.
    prompts: VecDeque<(Instant, u64)>,
    /// Completion tokens served.
    completions: VecDeque<(Instant, u64)>,
    /// The most requests admitted within one window.
    pub peak_requests: u64,
}

impl Window {
    /// Admits a request of `prompt_tokens` at `now` under `limits`, or refuses it.
    pub fn admit(
        &mut self,
        now: Instant,
        limits: Limits,
        prompt_tokens: u64,
    ) -> Result<(), Refused> {
        for queue in [&mut self.prompts, &mut self.completions] {
            while queue
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= limits.window)
            {
                queue.pop_front();
            }
        }
        let used_requests = self.prompts.len() as u64;
        let used_tokens: u64 = self
            .prompts
            .iter()
            .chain(self.completions.iter())
            .map(|(_, t)| t)
            .sum();
        let over_rpm = limits.rpm.is_some_and(|r| used_requests + 1 > r);
        let over_tpm = limits.tpm.is_some_and(|t| used_tokens + prompt_tokens > t);
        if over_rpm || over_tpm {
            let reset = self
                .prompts
                .front()
                .map_or(Duration::from_secs(1), |(t, _)| {
                    limits.window.saturating_sub(now.duration_since(*t))
                });
            return Err(Refused {
                reset,
                used_requests,
                used_tokens,
            });
        }
        self.prompts.push_back((now, prompt_tokens));
        self.peak_requests = self.peak_requests.max(self.prompts.len() as u64);
        Ok(())
    }

    /// Counts the completion tokens of an answer served at `now`.
    pub fn served(&mut self, now: Instant, completion_tokens: u64) {
        self.completions.push_back((now, completion_tokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits {
            window: MINUTE,
            rpm,
            tpm,
        }
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn requests_past_rpm_are_refused_until_the_oldest_leaves_the_window() {
        let (mut w, t0, l) = (Window::default(), Instant::now(), limits(Some(2), None));
        assert_eq!(w.admit(t0, l, 10), Ok(()));
        assert_eq!(w.admit(at(t0, 20), l, 10), Ok(()));
        assert_eq!(
            w.admit(at(t0, 30), l, 10),
            Err(Refused {
                reset: Duration::from_secs(30),
                used_requests: 2,
                used_tokens: 20,
            })
        );
        // The refused request was not counted: once the first leaves, one more fits.
        assert_eq!(w.admit(at(t0, 60), l, 10), Ok(()));
        assert!(w.admit(at(t0, 60), l, 10).is_err());
        assert_eq!(w.peak_requests, 2);
    }

    #[test]
    fn tokens_count_prompts_and_completions_of_the_window() {
        let (mut w, t0, l) = (Window::default(), Instant::now(), limits(None, Some(1000)));
        assert_eq!(w.admit(t0, l, 400), Ok(()));
        w.served(t0, 300);
        // 400 + 300 + 301 > 1000; 300 fits exactly.
        let refused = w.admit(t0, l, 301).unwrap_err();
        assert_eq!((refused.used_requests, refused.used_tokens), (1, 700));
        assert_eq!(refused.reset, MINUTE);
        assert_eq!(w.admit(t0, l, 300), Ok(()));
        // A minute later the window is empty again: a prompt of the whole budget fits.
        assert_eq!(w.admit(at(t0, 60), l, 1000), Ok(()));
        assert_eq!(w.peak_requests, 2);
    }

    #[test]
    fn a_refusal_with_nothing_admitted_says_one_second() {
        let mut w = Window::default();
        let refused = w
            .admit(Instant::now(), limits(Some(0), None), 1)
            .unwrap_err();
        assert_eq!(refused.reset, Duration::from_secs(1));
        assert_eq!((refused.used_requests, refused.used_tokens), (0, 0));
    }

    #[test]
    fn without_limits_everything_is_admitted_and_the_peak_counted() {
        let (mut w, t0) = (Window::default(), Instant::now());
        for _ in 0..5 {
            assert_eq!(w.admit(t0, limits(None, None), u64::MAX / 8), Ok(()));
        }
        assert_eq!(w.peak_requests, 5);
    }
}
