//! Typed configuration read from the environment.
//!
//! The environment is read through the [`Env`] trait: the binaries pass [`ProcessEnv`], tests
//! pass a `HashMap`. No other module of the workspace reads `std::env`.
//!
//! Loading never stops at the first mistake: every section reads its keys through one
//! [`Reader`], which records each problem (the key, what is wrong, a valid example) and
//! carries on with the default, so [`Reader::finish`] reports all of them at once.
//!
//! Defaults live in the section that owns the key; README.md lists them all.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::Secret;

/// Where configuration comes from.
pub trait Env {
    /// The value of `key`, if it is set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment. The only place in the workspace that reads `std::env`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl<S: std::hash::BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

impl<E: Env + ?Sized> Env for &E {
    fn get(&self, key: &str) -> Option<String> {
        (**self).get(key)
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The environment variable (and the path inside it, for JSON values).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it, with a valid example.
    pub fix: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.key, self.problem, self.fix)
    }
}

/// Everything wrong with the configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    /// The exit code for a bad configuration (`EX_USAGE` from sysexits.h).
    pub const EXIT_CODE: u8 = 64;
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads keys from an [`Env`], collecting problems instead of stopping at the first.
pub struct Reader<'a> {
    env: &'a dyn Env,
    problems: Vec<ConfigProblem>,
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl<'a> Reader<'a> {
    pub fn new(env: &'a dyn Env) -> Self {
        Self {
            env,
            problems: Vec::new(),
        }
    }

    /// How many problems were found so far (a caller checks whether its part added any).
    pub fn problem_count(&self) -> usize {
        self.problems.len()
    }

    /// Records a problem with `key`.
    pub fn problem(
        &mut self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    /// Ok when no problem was recorded, else all of them.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    /// The trimmed value of `key`; unset and blank are both `None`.
    pub fn string(&self, key: &str) -> Option<String> {
        self.env
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The value of `key` exactly as set (not trimmed), for JSON documents and secrets.
    pub fn raw(&self, key: &str) -> Option<String> {
        self.env.get(key).filter(|v| !v.trim().is_empty())
    }

    /// A required value; records a problem naming `example` when it is missing.
    pub fn required(&mut self, key: &str, example: &str) -> Option<String> {
        let value = self.string(key);
        if value.is_none() {
            self.problem(
                key,
                "is not set",
                format!("set it, for example {key}={example}"),
            );
        }
        value
    }

    /// A secret value (not trimmed of inner content, surrounding whitespace removed).
    pub fn secret(&self, key: &str) -> Option<Secret<String>> {
        self.string(key).map(Secret::new)
    }

    /// A positive integer (zero and negative numbers are rejected).
    pub fn positive_u32(&mut self, key: &str, default: u32) -> u32 {
        self.integer(key, default, 1)
    }

    /// A non-negative integer (zero allowed, negative numbers rejected).
    pub fn non_negative_u32(&mut self, key: &str, default: u32) -> u32 {
        self.integer(key, default, 0)
    }

    fn integer(&mut self, key: &str, default: u32, min: u32) -> u32 {
        let Some(value) = self.string(key) else {
            return default;
        };
        let what = if min == 0 {
            "a non-negative"
        } else {
            "a positive"
        };
        match value.parse::<i64>() {
            Ok(n) if n >= i64::from(min) && n <= i64::from(u32::MAX) => n as u32,
            Ok(n) => {
                self.problem(
                    key,
                    format!("must be {what} integer, got {n}"),
                    format!("for example {key}={default}"),
                );
                default
            }
            Err(_) => {
                self.problem(
                    key,
                    format!("must be {what} integer, got {value:?}"),
                    format!("for example {key}={default}"),
                );
                default
            }
        }
    }

    /// A positive duration: a plain number is seconds (as in the legacy ConfigMap),
    /// otherwise a humantime string such as `500ms`, `30s`, `2h`.
    pub fn duration(&mut self, key: &str, default: Duration) -> Duration {
        let Some(value) = self.string(key) else {
            return default;
        };
        match parse_duration(&value) {
            Ok(d) => d,
            Err(problem) => {
                self.problem(
                    key,
                    problem,
                    format!(
                        "give seconds or a duration with a unit, for example {key}={} or {key}={}",
                        default.as_secs().max(1),
                        humantime::format_duration(default)
                    ),
                );
                default
            }
        }
    }

    /// A boolean: true/false, 1/0, yes/no, on/off.
    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        let Some(value) = self.string(key) else {
            return default;
        };
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                self.problem(
                    key,
                    format!("must be true or false, got {value:?}"),
                    format!("for example {key}=true"),
                );
                default
            }
        }
    }

    /// A socket address such as `0.0.0.0:8080`.
    pub fn socket_addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        let Some(value) = self.string(key) else {
            return default;
        };
        match value.parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.problem(
                    key,
                    format!("is not an IP address and port: {value:?}"),
                    format!("for example {key}={default}"),
                );
                default
            }
        }
    }

    /// An http(s) URL.
    pub fn http_url(&mut self, key: &str, example: &str) -> Option<Url> {
        let value = self.string(key)?;
        match parse_http_url(&value) {
            Ok(url) => Some(url),
            Err(problem) => {
                self.problem(key, problem, format!("for example {key}={example}"));
                None
            }
        }
    }

    /// A path to a file that must exist.
    pub fn existing_file(&mut self, key: &str, example: &str) -> Option<PathBuf> {
        let value = self.string(key)?;
        let path = PathBuf::from(&value);
        if path.is_file() {
            Some(path)
        } else {
            self.problem(
                key,
                format!("no such file: {value}"),
                format!("point it at a readable file, for example {key}={example}"),
            );
            None
        }
    }
}

/// Parses a duration: a plain non-negative number is seconds, otherwise humantime.
/// Zero is rejected: every duration we read is a delay, interval or timeout.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let parsed = if let Ok(secs) = value.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("must be a positive duration, got {value:?}"));
        }
        Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("is too large a duration, got {value:?}"))?
    } else {
        humantime::parse_duration(value)
            .map_err(|e| format!("is not a duration ({e}): {value:?}"))?
    };
    if parsed.is_zero() {
        return Err(format!("must be a positive duration, got {value:?}"));
    }
    Ok(parsed)
}

/// Parses an absolute http or https URL with a host.
pub fn parse_http_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("is not a valid URL ({e}): {value:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL, got scheme {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("has no host: {value:?}"));
    }
    Ok(url)
}

/// Settings every worker reads: NATS, names, streams, ops address, telemetry.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub nats: crate::nats::NatsSettings,
    pub names: crate::nats::Names,
    pub streams: crate::nats::StreamSettings,
    pub ops: crate::ops::OpsSettings,
    pub telemetry: crate::telemetry::TelemetrySettings,
}

impl CommonConfig {
    /// Reads the common sections; `component` names the worker in telemetry.
    pub fn read(r: &mut Reader<'_>, component: &str) -> Self {
        Self {
            nats: crate::nats::NatsSettings::read(r),
            names: crate::nats::Names::read(r),
            streams: crate::nats::StreamSettings::read(r),
            ops: crate::ops::OpsSettings::read(r),
            telemetry: crate::telemetry::TelemetrySettings::read(r, component),
        }
    }
}

/// Whether `TARDIS_PREFIX` is usable in stream, subject and bucket names.
pub(crate) fn is_valid_prefix(prefix: &str) -> bool {
    prefix.len() <= 32
        && !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn absurd_durations_are_errors_not_panics() {
        assert!(parse_duration("1e300").unwrap_err().contains("too large"));
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("0").unwrap_err().contains("positive"));
        assert!(parse_duration("-3").unwrap_err().contains("positive"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn integers_reject_zero_negative_and_garbage_all_at_once() {
        let e = env(&[("A", "0"), ("B", "-2"), ("C", "ten"), ("D", "7")]);
        let mut r = Reader::new(&e);
        assert_eq!(r.positive_u32("A", 5), 5);
        assert_eq!(r.non_negative_u32("B", 3), 3);
        assert_eq!(r.positive_u32("C", 1), 1);
        assert_eq!(r.positive_u32("D", 1), 7);
        let err = r.finish().unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(
            text.contains("A: must be a positive integer, got 0; for example A=5"),
            "{text}"
        );
        assert!(
            text.contains("B: must be a non-negative integer, got -2"),
            "{text}"
        );
        assert!(
            text.contains("C: must be a positive integer, got \"ten\""),
            "{text}"
        );
    }

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert!(parse_http_url("https://api.example.com/v1").is_ok());
        assert!(
            parse_http_url("ftp://x")
                .unwrap_err()
                .contains("http or https")
        );
        assert!(
            parse_http_url("not a url")
                .unwrap_err()
                .contains("not a valid URL")
        );
    }
}
