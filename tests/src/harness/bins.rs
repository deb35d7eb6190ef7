//! The worker binaries, built once per test process.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The path of the workspace binary `name` (`fetcher`, `enricher`, `writer`).
///
/// The first call runs `cargo build --workspace --bins` (a no-op when they are up to date),
/// unless `TARDIS_BIN_DIR` names a directory of prebuilt binaries.
pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = BIN_DIR
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist after building the workspace binaries",
            path.display()
        );
    }
    Ok(path)
}

fn build() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TARDIS_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let mut args = vec!["build", "--workspace", "--bins", "--message-format=json"];
    // A release build of the harness (benchmarks) runs release binaries.
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let out = std::process::Command::new(cargo)
        .args(&args)
        .current_dir(&workspace)
        .output()
        .context("running cargo build for the worker binaries")?;
    if !out.status.success() {
        bail!(
            "cargo build --workspace --bins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(exe) = msg.get("executable").and_then(|e| e.as_str()) {
            return PathBuf::from(exe)
                .parent()
                .map(PathBuf::from)
                .context("binary directory");
        }
    }
    bail!("cargo build reported no executable")
}
