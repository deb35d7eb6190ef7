//! The test harness: real `nats-server -js` and real Postgres processes, the worker binaries,
//! and small helpers every integration test uses.
//!
//! * [`nats::NatsServer`] / [`postgres::PostgresServer`] start a server on a free port in a
//!   temporary directory and can stop, kill and restart it (same port, same data).
//! * [`shared_nats`] / [`shared_postgres`] give one server per test binary (or the ones named
//!   by `NATS_URL` / `DATABASE_URL`); tests isolate themselves with [`TestNats`] (a random
//!   name prefix) and [`TestDb`] (a fresh database).
//! * A binary a test needs that is missing fails the test with the command that installs it.
//!
//! The harness reads the environment (`NATS_URL`, `DATABASE_URL`, `NATS_SERVER_BIN`,
//! `PG_BIN_DIR`, `TARDIS_BIN_DIR`) — it is test code, not a worker.

pub mod bins;
pub mod fleet;
pub mod json_server;
pub mod nats;
pub mod postgres;
pub mod procs;

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Result, bail};
use rand::Rng;

pub use nats::{NatsServer, TestNats, shared_nats};
pub use postgres::{PostgresServer, TestDb, shared_postgres};

/// An HTTP client for tests (rustls with the same crypto provider as the workers).
pub fn http() -> reqwest::Client {
    tardis_common::install_crypto_provider();
    reqwest::Client::new()
}

/// `GET url`: the status and the body.
pub async fn http_get(url: &str) -> Result<(u16, String)> {
    let resp = http().get(url).send().await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// A child process whose stdout and stderr go to a temporary file (a pipe nobody reads
/// would fill up and block the child).
#[derive(Debug)]
pub struct Captured {
    pub child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl Captured {
    pub fn spawn(mut cmd: std::process::Command) -> Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let child = cmd
            .stdout(std::process::Stdio::from(log.reopen()?))
            .stderr(std::process::Stdio::from(log.reopen()?))
            .spawn()?;
        Ok(Self { child, log })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, wait; the exit code and everything printed.
    pub fn terminate(mut self) -> Result<(Option<i32>, String)> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = self.child.wait()?;
        Ok((status.code(), self.output()))
    }

    /// Waits for the process to exit by itself, at most `within` (then an error: the test
    /// fails, and the process is killed when the handle is dropped); its status and output.
    pub async fn exited_within(
        &mut self,
        within: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.output()));
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "still running after {within:?} (killed); its output:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, wait.
    pub fn kill(mut self) -> Result<String> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(self.output())
    }
}

/// A process a test did not stop (it failed, returned early, or just dropped it) is killed
/// and reaped: no worker outlives its test.
impl Drop for Captured {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && self.child.kill().is_ok()
        {
            // Reaped; an error here has nothing left to stop.
            self.child.wait().ok();
        }
    }
}

/// A random lowercase suffix for names (8 hex digits).
pub fn unique_suffix() -> String {
    format!("{:08x}", rand::rng().random::<u32>())
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every 50 ms until it returns `Ok(Some(value))`, or fails after `deadline`
/// with the last error. Tests wait for effects with this, never with a fixed sleep.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= until {
            bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker a test forgets (or fails before stopping) must not outlive its handle: the
    /// writer left running after CI was one such.
    #[test]
    fn a_dropped_captured_process_is_killed_and_reaped() -> Result<()> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        let captured = Captured::spawn(cmd)?;
        let proc_dir = std::path::PathBuf::from(format!("/proc/{}", captured.id()));
        assert!(proc_dir.exists());
        drop(captured);
        assert!(
            !proc_dir.exists(),
            "the process is still there after its handle was dropped"
        );
        Ok(())
    }
}
