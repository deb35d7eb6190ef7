//! json-server 0.17.4 (npm), a real third-party REST server: bare-array pages, `_page` /
//! `_limit` with RFC 8288 `Link` headers, `_sort` / `_order`, `field_gte=` filters compared as
//! strings. The fetcher was never tuned to it, which is the point.
//!
//! Installed by `.ci/run` with `npm ci --prefix tests/tools`; `JSON_SERVER_JS` may name its
//! `lib/cli/bin.js` instead.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;

use super::procs::{Guarded, Spec, which};
use super::{free_port, wait_for};

const INSTALL_HINT: &str = "json-server not found: install it with `npm ci --prefix tests/tools` \
(json-server 0.17.4; needs node and npm: `apt-get install -y nodejs npm`), or set \
JSON_SERVER_JS=/path/to/json-server/lib/cli/bin.js";

/// The json-server CLI script.
pub fn json_server_js() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("JSON_SERVER_JS") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "JSON_SERVER_JS={} is not a file; {INSTALL_HINT}",
            p.display()
        );
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tools/node_modules/json-server/lib/cli/bin.js");
    if p.is_file() {
        Ok(p)
    } else {
        bail!("{} is missing; {INSTALL_HINT}", p.display())
    }
}

/// A json-server on a free port serving a `db.json` of its own.
#[derive(Debug)]
pub struct JsonServer {
    port: u16,
    _dir: TempDir,
    _proc: Guarded,
}

impl JsonServer {
    /// Starts json-server on `db` (for example `{"events": [...]}`).
    pub async fn start(db: &Value) -> Result<Self> {
        let node = which("node").context(INSTALL_HINT)?;
        let script = json_server_js()?;
        let dir = tempfile::Builder::new()
            .prefix("tardis-json-server-")
            .tempdir()?;
        let db_path = dir.path().join("db.json");
        std::fs::write(&db_path, serde_json::to_vec(db)?)?;
        let port = free_port()?;
        let spec = Spec {
            program: node,
            args: vec![
                script.display().to_string(),
                "--port".into(),
                port.to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--quiet".into(),
                db_path.display().to_string(),
            ],
            log: dir.path().join("json-server.log"),
            stop_signal: Signal::SIGTERM,
            cleanup: None,
            run_as: None,
        };
        let proc = Guarded::spawn(&spec)?;
        let url = format!("http://127.0.0.1:{port}/db");
        let log = dir.path().join("json-server.log");
        wait_for("json-server to answer", Duration::from_secs(20), || {
            let url = url.clone();
            let log = log.clone();
            async move {
                match super::http_get(&url).await {
                    Ok((200, _)) => Ok(Some(())),
                    Ok((status, body)) => bail!("HTTP {status}: {body}"),
                    Err(e) => {
                        let tail = std::fs::read_to_string(&log).unwrap_or_default();
                        if tail.contains("Error") {
                            bail!("{e}; json-server log: {tail}");
                        }
                        Ok(None)
                    }
                }
            }
        })
        .await?;
        Ok(Self {
            port,
            _dir: dir,
            _proc: proc,
        })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Adds a record to `collection` (json-server's `POST /<collection>`).
    pub async fn add(&self, collection: &str, record: &Value) -> Result<()> {
        let resp = super::http()
            .post(self.url(&format!("/{collection}")))
            .json(record)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("POST /{collection}: HTTP {}", resp.status());
        }
        Ok(())
    }
}
