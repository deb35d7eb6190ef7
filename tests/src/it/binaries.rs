//! The worker binaries as real processes: ops endpoints, SIGTERM, bad configuration, secrets
//! kept out of the output, OTLP export; and `run` in-process.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::support::{LEGACY_SECRETS, legacy_env};
use crate::harness::{Captured, TestDb, TestNats, bins, free_port, http_get, wait_for};

/// Runs `tardis-probe` with `OPS_ADDR=ops_addr`: its exit code and what it printed.
fn probe(ops_addr: &str) -> Result<(i32, String)> {
    let out = Command::new(bins::bin("tardis-probe")?)
        .env_clear()
        .env("OPS_ADDR", ops_addr)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The environment each binary needs besides NATS: the legacy ConfigMap and Secret, pointed
/// at the test's Postgres.
async fn worker_env(t: &TestNats) -> Result<BTreeMap<String, String>> {
    let db = TestDb::new().await?;
    let mut env = legacy_env();
    env.insert("NATS_URL".into(), t.url.clone());
    env.insert("TARDIS_PREFIX".into(), t.prefix.clone());
    env.insert("DATABASE_URL".into(), db.url.clone());
    env.insert("PGSSLMODE".into(), "disable".into());
    env.insert("RUST_LOG".into(), "debug".into());
    super::writer::migrate(&env).await?;
    Ok(env)
}

struct Running {
    child: Captured,
    ops: String,
    ops_addr: String,
}

impl Running {
    fn spawn(name: &str, env: &BTreeMap<String, String>) -> Result<Self> {
        let port = free_port()?;
        // The fetcher's default command is one pass (`run`); `daemon` stays up.
        let args: &[&str] = if name == "fetcher" { &["daemon"] } else { &[] };
        let mut cmd = Command::new(bins::bin(name)?);
        let ops_addr = format!("127.0.0.1:{port}");
        cmd.args(args)
            .env_clear()
            .envs(env)
            .env("OPS_ADDR", &ops_addr);
        let child = Captured::spawn(cmd).with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child,
            ops: format!("http://{ops_addr}"),
            ops_addr,
        })
    }

    /// The image HEALTHCHECK: `tardis-probe` with the worker's `OPS_ADDR`, as in the container.
    fn probe(&self) -> Result<(i32, String)> {
        probe(&self.ops_addr)
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&format!("{}{path}", self.ops)).await
    }

    /// SIGTERM, then the exit code and everything printed; fails if it takes over `limit`.
    async fn terminate(mut self, limit: Duration) -> Result<(i32, String)> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        let status = wait_for("the process to exit after SIGTERM", limit, || {
            let r = self.child.child.try_wait().map_err(anyhow::Error::from);
            async move { r }
        })
        .await;
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let output = self.child.kill()?;
                return Err(e.context(output));
            }
        };
        Ok((status.code().unwrap_or(-1), self.child.output()))
    }
}

async fn check_binary(name: &str, env: BTreeMap<String, String>) -> Result<()> {
    let running = Running::spawn(name, &env)?;
    let health = wait_for(
        &format!("{name} /health"),
        Duration::from_secs(30),
        || async { Ok(running.get("/health").await.ok()) },
    )
    .await?;
    assert_eq!(health.0, 200, "{name} /health");
    wait_for(
        &format!("{name} /ready"),
        Duration::from_secs(30),
        || async {
            let (status, body) = running.get("/ready").await?;
            Ok((status == 200).then_some(body))
        },
    )
    .await?;
    assert_eq!(
        running.probe()?,
        (0, String::new()),
        "{name}: probe when ready"
    );
    let (status, metrics) = running.get("/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "tardis_build_info{{component=\"{name}\",version=\""
        )),
        "{name} /metrics:\n{metrics}"
    );
    assert!(
        metrics.contains("tardis_ready{check=\"nats\"} 1"),
        "{name} /metrics:\n{metrics}"
    );

    let ops_addr = running.ops_addr.clone();
    let (code, printed) = running.terminate(Duration::from_secs(5)).await?;
    assert_eq!(
        code, 0,
        "{name} exit code after SIGTERM; output:\n{printed}"
    );
    let (code, said) = probe(&ops_addr)?;
    assert_eq!(code, 1, "{name}: probe once stopped");
    assert!(
        said.contains("connecting to"),
        "{name}: probe said {said:?}"
    );
    assert!(
        printed.contains("\"message\":\"stopped\""),
        "{name} output:\n{printed}"
    );
    for secret in LEGACY_SECRETS {
        assert!(
            !printed.contains(secret),
            "{name} printed the secret {secret:?}:\n{printed}"
        );
    }
    // Every line on stdout is a JSON log record.
    for line in printed.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("{name} printed a non-JSON line: {line}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn fetcher_serves_ops_and_stops_on_sigterm() -> Result<()> {
    let t = TestNats::new().await?;
    check_binary("fetcher", worker_env(&t).await?).await?;
    let js = t.jetstream();
    js.get_stream(t.names().stream(tardis_common::nats::StreamKind::Records))
        .await?;
    js.get_key_value(t.names().fetch_state_bucket()).await?;
    Ok(())
}

#[tokio::test]
async fn enricher_serves_ops_and_stops_on_sigterm() -> Result<()> {
    let t = TestNats::new().await?;
    check_binary("enricher", worker_env(&t).await?).await?;
    let stream = t
        .jetstream()
        .get_stream(t.names().stream(tardis_common::nats::StreamKind::Records))
        .await?;
    let consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &t.names()
                .consumer(tardis_common::nats::ConsumerKind::Enricher),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // ENRICH_ACK_WAIT's default: a crashed replica's chunks wait 15 s, not 2 × LLM_TIMEOUT.
    assert_eq!(
        consumer.cached_info().config.ack_wait,
        Duration::from_secs(15)
    );
    Ok(())
}

#[tokio::test]
async fn writer_serves_ops_and_stops_on_sigterm() -> Result<()> {
    let t = TestNats::new().await?;
    check_binary("writer", worker_env(&t).await?).await?;
    let stream = t
        .jetstream()
        .get_stream(t.names().stream(tardis_common::nats::StreamKind::Enriched))
        .await?;
    stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &t.names()
                .consumer(tardis_common::nats::ConsumerKind::Writer),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}

#[tokio::test]
async fn writer_is_not_ready_without_postgres() -> Result<()> {
    let t = TestNats::new().await?;
    let mut env = worker_env(&t).await?;
    env.insert(
        "DATABASE_URL".into(),
        format!("postgres://postgres@127.0.0.1:{}/x", free_port()?),
    );
    let running = Running::spawn("writer", &env)?;
    let body = wait_for(
        "writer /ready to answer",
        Duration::from_secs(30),
        || async {
            let (status, body) = match running.get("/ready").await {
                Ok(r) => r,
                Err(_) => return Ok(None),
            };
            Ok(
                (status == 503 && body.contains("postgres") && !body.contains("nats"))
                    .then_some(body),
            )
        },
    )
    .await?;
    assert_eq!(body, "not ready: postgres\n");
    let (code, said) = running.probe()?;
    assert_eq!(code, 1, "probe while not ready");
    assert!(
        said.ends_with("/ready answered 503\n"),
        "probe said {said:?}"
    );
    let (code, _) = running.terminate(Duration::from_secs(5)).await?;
    assert_eq!(code, 0);
    Ok(())
}

#[tokio::test]
async fn sigterm_while_waiting_for_nats_exits_cleanly() -> Result<()> {
    let t = TestNats::new().await?;
    let mut env = worker_env(&t).await?;
    env.insert(
        "NATS_URL".into(),
        format!("nats://127.0.0.1:{}", free_port()?),
    );
    let running = Running::spawn("fetcher", &env)?;
    let (status, body) = wait_for("fetcher /ready", Duration::from_secs(30), || async {
        Ok(running.get("/ready").await.ok())
    })
    .await?;
    assert_eq!((status, body.as_str()), (503, "not ready: nats\n"));
    let (code, printed) = running.terminate(Duration::from_secs(5)).await?;
    assert_eq!(code, 0, "{printed}");
    assert!(printed.contains("nats connection failed"), "{printed}");
    Ok(())
}

#[tokio::test]
async fn invalid_configuration_exits_64_with_the_message_on_stderr() -> Result<()> {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 3] = [
        (
            "fetcher",
            &[("CHUNK_SIZE", "0")],
            "CHUNK_SIZE: must be a positive integer, got 0",
        ),
        (
            "enricher",
            &[("PROCESSOR_ENDPOINT", "")],
            "PROCESSOR_ENDPOINT: is not set",
        ),
        (
            "writer",
            &[("PGPORT", "port"), ("DATABASE_URL", "")],
            "PGPORT: is not a port number: \"port\"",
        ),
    ];
    for (name, overrides, expected) in cases {
        let mut env = legacy_env();
        for (k, v) in overrides {
            env.insert(k.to_string(), v.to_string());
        }
        let out = Command::new(bins::bin(name)?)
            .env_clear()
            .envs(&env)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("{name}: invalid configuration")),
            "{name}: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in {stderr}"
        );
        for secret in LEGACY_SECRETS {
            assert!(!stderr.contains(secret), "{name} printed {secret:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_command_line_value_exits_64_like_a_bad_variable() -> Result<()> {
    let mut env = legacy_env();
    env.insert("CHUNK_SIZE".into(), "0".into());
    let out = Command::new(bins::bin("fetcher")?)
        .args([
            "backfill",
            "--source",
            "market_data",
            "--since",
            "yesterday",
        ])
        .env_clear()
        .envs(&env)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--since (BACKFILL_SINCE): is not an RFC 3339 time"),
        "{stderr}"
    );
    assert!(
        stderr.contains("CHUNK_SIZE: must be a positive integer, got 0"),
        "every problem at once: {stderr}"
    );
    Ok(())
}

/// A one-shot HTTP server that records the first request's line and body length.
async fn capture_one_request(listener: tokio::net::TcpListener) -> Result<(String, usize)> {
    let (mut socket, _) = listener.accept().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the request ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await?;
                return Ok((text.lines().next().unwrap_or_default().to_string(), length));
            }
        }
    }
}

#[tokio::test]
async fn traces_are_exported_over_otlp_when_configured() -> Result<()> {
    let t = TestNats::new().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector = format!("http://{}", listener.local_addr()?);
    let captured = tokio::spawn(capture_one_request(listener));
    let mut env = worker_env(&t).await?;
    env.insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector);
    let running = Running::spawn("fetcher", &env)?;
    wait_for("fetcher /ready", Duration::from_secs(30), || async {
        Ok(running.get("/ready").await.ok().filter(|(s, _)| *s == 200))
    })
    .await?;
    let (code, printed) = running.terminate(Duration::from_secs(5)).await?;
    assert_eq!(code, 0, "{printed}");
    let (line, length) = tokio::time::timeout(Duration::from_secs(5), captured).await???;
    assert_eq!(line, "POST /v1/traces HTTP/1.1");
    assert!(length > 0, "an OTLP export has a body");
    Ok(())
}

#[tokio::test]
async fn run_in_process_until_cancelled() -> Result<()> {
    let t = TestNats::new().await?;
    let mut env = worker_env(&t).await?;
    env.insert("OPS_ADDR".into(), format!("127.0.0.1:{}", free_port()?));
    let config = writer::Config::from_env(&env)?;
    let ops = format!("http://{}/ready", config.common.ops.addr);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(writer::run(config, shutdown.clone()));
    wait_for(
        "in-process writer ready",
        Duration::from_secs(30),
        || async {
            Ok(http_get(&ops)
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|_| ()))
        },
    )
    .await?;
    shutdown.cancel();
    let code = tokio::time::timeout(Duration::from_secs(5), task).await???;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    Ok(())
}
