//! Server processes that cannot outlive the test process.
//!
//! Each server runs under a tiny `sh` guardian whose standard input is a pipe from the test
//! process. When the test process ends — normally, by panic, or killed — the pipe closes, the
//! guardian stops the server with its stop signal and removes its directory if asked. So a
//! shared server held in a `static` (never dropped) still goes away with the test binary.
//! The guardian prints the server's pid first, so tests can signal the server itself.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const GUARDIAN: &str = r#"
"$@" >"$TARDIS_GUARD_LOG" 2>&1 &
pid=$!
echo "$pid"
cat >/dev/null
kill -s "$TARDIS_GUARD_SIGNAL" "$pid" 2>/dev/null
wait "$pid"
if [ -n "$TARDIS_GUARD_CLEANUP" ]; then rm -rf "$TARDIS_GUARD_CLEANUP"; fi
"#;

/// An unprivileged user to run servers as when the tests run as root.
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `nobody` when running as root (Postgres refuses to run as root), else `None`.
    pub fn unprivileged_if_root() -> Result<Option<RunAs>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name("nobody")?.ok_or_else(|| {
            anyhow!("running as root but there is no 'nobody' user to run Postgres as")
        })?;
        Ok(Some(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    /// Gives `path` to this user.
    pub fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))
    }

    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }
}

/// How to start a guarded server.
#[derive(Debug, Clone)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// The signal the guardian sends when the test process goes away.
    pub stop_signal: Signal,
    /// A directory the guardian removes after the server exits (shared servers only).
    pub cleanup: Option<PathBuf>,
    pub run_as: Option<RunAs>,
}

/// A running guarded server.
#[derive(Debug)]
pub struct Guarded {
    guardian: Child,
    stdin: Option<ChildStdin>,
    pid: Pid,
    stop_signal: Signal,
}

impl Guarded {
    pub fn spawn(spec: &Spec) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(GUARDIAN)
            .arg("tardis-guard")
            .arg(&spec.program)
            .args(&spec.args)
            .env("TARDIS_GUARD_LOG", &spec.log)
            .env(
                "TARDIS_GUARD_SIGNAL",
                spec.stop_signal.as_str().trim_start_matches("SIG"),
            )
            .env(
                "TARDIS_GUARD_CLEANUP",
                spec.cleanup
                    .as_deref()
                    .map(Path::as_os_str)
                    .unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The server's own output goes to its log file; the guardian's ("Killed") nowhere.
            .stderr(Stdio::null());
        if let Some(run_as) = spec.run_as {
            run_as.apply(&mut cmd);
        }
        let mut guardian = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.program.display()))?;
        let stdout = guardian.stdout.take().context("guardian stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let pid: i32 = line
            .trim()
            .parse()
            .with_context(|| format!("guardian printed {line:?} instead of a pid"))?;
        Ok(Self {
            stdin: guardian.stdin.take(),
            guardian,
            pid: Pid::from_raw(pid),
            stop_signal: spec.stop_signal,
        })
    }

    /// The server's pid.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid, signal).with_context(|| format!("sending {signal} to {}", self.pid))
    }

    /// Whether the server process still exists.
    pub fn is_running(&self) -> bool {
        kill(self.pid, None).is_ok() && !is_zombie(self.pid)
    }

    /// Sends `signal` and waits (up to `deadline`) for the server and its guardian to exit.
    pub async fn stop_with(mut self, signal: Signal, deadline: Duration) -> Result<()> {
        if self.is_running() {
            self.signal(signal)?;
        }
        self.stdin.take();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if self.guardian.try_wait()?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                // Escalate: never leave a server behind.
                if let Err(e) = kill(self.pid, Signal::SIGKILL) {
                    tracing::debug!(error = %e, "server already gone");
                }
                self.guardian.kill()?;
                self.guardian.wait()?;
                return Err(anyhow!(
                    "server {} did not stop within {deadline:?}",
                    self.pid
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Closing stdin makes the guardian stop the server; wait so no zombie is left.
        self.stdin.take();
        if self.guardian.try_wait().ok().flatten().is_none() {
            if let Err(e) = kill(self.pid, self.stop_signal) {
                tracing::debug!(error = %e, "server already gone");
            }
            if let Err(e) = self.guardian.wait() {
                tracing::debug!(error = %e, "guardian wait failed");
            }
        }
    }
}

/// Finds an executable called `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
