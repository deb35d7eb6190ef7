//! Every environment variable that a Kubernetes manifest or the compose file sets is one the
//! binaries accept: each container's environment (ConfigMaps, Secrets as placeholders, `env:`)
//! goes through its binary's own config parser, which must accept it, and every key must be
//! read by the binary it is given to (a typo such as `LLM_RMP` would otherwise be ignored
//! without a word). Keys a ConfigMap gives to every worker need only be read by one of them;
//! a compose service's keys must all be read by that service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use serde_norway::Value;
use tardis_common::config::Env;

use crate::harness::bins;

/// Keys that are not for Tardis's parsers: `TZ` is read by the C library.
const NOT_TARDIS: &[&str] = &["TZ"];

/// An environment that remembers which keys were read.
struct Recording<'a> {
    env: &'a BTreeMap<String, String>,
    read: Mutex<BTreeSet<String>>,
}

impl Env for Recording<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_string());
        self.env.get(key).cloned()
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// The environment variables a binary's command line reads (clap's `env = ...`), from its
/// `--help` (and its subcommands').
fn clap_env(binary: &str, subcommand: Option<&str>) -> Result<BTreeSet<String>> {
    let mut cmd = Command::new(bins::bin(binary)?);
    if let Some(s) = subcommand {
        cmd.arg(s);
    }
    let out = cmd.arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect())
}

/// Runs `binary`'s config parser on `env` for the command `args`; returns the keys it read.
fn parse(
    binary: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<BTreeSet<String>> {
    let rec = Recording {
        env,
        read: Mutex::new(BTreeSet::new()),
    };
    let sub = args.first().map(String::as_str);
    let mut read = BTreeSet::new();
    match binary {
        "fetcher" => {
            use fetcher::config::CliCommand;
            let command = match sub {
                None | Some("run") => CliCommand::Run {
                    sources: env
                        .get("FETCH_SOURCES")
                        .map(|s| s.split(',').map(str::to_string).collect())
                        .unwrap_or_default(),
                },
                Some("daemon") => CliCommand::Daemon {
                    run_at_start: args.iter().any(|a| a == "--run-at-start"),
                },
                Some(other) => bail!("fetcher {other}: not covered by this test"),
            };
            fetcher::Config::from_cli(&rec, Some(command)).map_err(|e| anyhow::anyhow!("{e}"))?;
            read.extend(clap_env("fetcher", sub)?);
        }
        "enricher" => {
            anyhow::ensure!(
                matches!(sub, None | Some("provision")),
                "enricher {sub:?}: unknown command"
            );
            enricher::Config::from_env(&rec).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        "writer" => {
            let command = match sub {
                None | Some("run") => writer::config::Command::Run,
                Some("migrate") => writer::config::Command::Migrate,
                Some(other) => bail!("writer {other}: unknown command"),
            };
            writer::Config::from_env_with(&rec, command).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        "demo-source" | "mock-llm" => {
            read.extend(clap_env(binary, None)?);
        }
        other => bail!("no parser known for {other}"),
    }
    read.extend(
        rec.read
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(read)
}

/// One container (or compose service) running a Tardis binary.
#[derive(Debug)]
struct Container {
    place: String,
    binary: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// Keys set on this container itself (must be read by its binary).
    own: BTreeSet<String>,
    /// Keys from shared sources (`envFrom`, compose anchors), by source name.
    shared: BTreeMap<String, BTreeSet<String>>,
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn kustomize(dir: &str) -> Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .context("kubectl (with kustomize) is needed: https://kubernetes.io/docs/tasks/tools/")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        docs.push(serde::Deserialize::deserialize(doc)?);
    }
    Ok(docs)
}

/// The containers of every workload in the manifests.
fn kubernetes_containers() -> Result<Vec<Container>> {
    let mut docs = kustomize("k8s")?;
    docs.extend(kustomize("k8s/example-config")?);
    docs.extend(kustomize("k8s/enricher/hpa")?);
    docs.extend(kustomize("k8s/overlays/db-roles")?);
    let mut config_maps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for d in &docs {
        if d["kind"] == "ConfigMap" {
            let data = d["data"]
                .as_mapping()
                .map(|m| m.iter().map(|(k, v)| (str_of(k), str_of(v))).collect())
                .unwrap_or_default();
            config_maps.insert(str_of(&d["metadata"]["name"]), data);
        }
    }
    let mut containers = Vec::new();
    for d in &docs {
        let kind = str_of(&d["kind"]);
        let pod = match kind.as_str() {
            "Deployment" | "StatefulSet" | "Job" => &d["spec"]["template"]["spec"],
            "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        let name = str_of(&d["metadata"]["name"]);
        let all = pod["initContainers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(pod["containers"].as_sequence().into_iter().flatten());
        for c in all {
            let image = str_of(&c["image"]);
            let binary = image
                .rsplit('/')
                .next()
                .and_then(|s| s.split([':', '@']).next())
                .unwrap_or_default()
                .to_string();
            let mut env = BTreeMap::new();
            let mut shared = BTreeMap::new();
            for from in c["envFrom"].as_sequence().into_iter().flatten() {
                let cm = str_of(&from["configMapRef"]["name"]);
                anyhow::ensure!(
                    !cm.is_empty(),
                    "{kind}/{name}: envFrom other than a ConfigMap: {from:?}"
                );
                let data = config_maps
                    .get(&cm)
                    .with_context(|| format!("{kind}/{name}: ConfigMap {cm} is not in k8s/"))?;
                env.extend(data.clone());
                shared.insert(format!("ConfigMap {cm}"), data.keys().cloned().collect());
            }
            let mut own = BTreeSet::new();
            for e in c["env"].as_sequence().into_iter().flatten() {
                let key = str_of(&e["name"]);
                let value = if e["valueFrom"]["secretKeyRef"].is_mapping() {
                    "placeholder-secret-value".to_string()
                } else {
                    str_of(&e["value"])
                };
                env.insert(key.clone(), value);
                own.insert(key);
            }
            containers.push(Container {
                place: format!("{kind}/{name} container {}", str_of(&c["name"])),
                binary,
                args: c["args"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(str_of)
                    .collect(),
                env,
                own,
                shared,
            });
        }
    }
    Ok(containers)
}

/// `${VAR:-default}` and `${VAR}` as compose expands them with nothing set.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let inner = &rest[i + 2..i + end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    out
}

/// The services of docker-compose.yml that run a Tardis image.
fn compose_containers() -> Result<Vec<Container>> {
    let text = std::fs::read_to_string(root().join("docker-compose.yml"))?;
    let mut doc: Value = serde_norway::from_str(&text)?;
    doc.apply_merge()?;
    let mut containers = Vec::new();
    for (name, service) in doc["services"].as_mapping().context("services")? {
        let image = str_of(&service["image"]);
        let Some(binary) = image
            .strip_prefix("tardis/")
            .and_then(|s| s.split(':').next())
        else {
            continue;
        };
        let env: BTreeMap<String, String> = service["environment"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (str_of(k), interpolate(&str_of(v))))
                    .collect()
            })
            .unwrap_or_default();
        // Each service gets only what it reads (so an .env change recreates only the services
        // it concerns, and no service holds another's secret): every key is its own.
        let own: BTreeSet<String> = env.keys().cloned().collect();
        containers.push(Container {
            place: format!("docker-compose.yml service {}", str_of(name)),
            binary: binary.to_string(),
            args: service["command"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect(),
            env,
            own,
            shared: BTreeMap::new(),
        });
    }
    Ok(containers)
}

fn check(containers: &[Container]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut read_by_source: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut given_by_source: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in containers {
        let read = match parse(&c.binary, &c.args, &c.env) {
            Ok(read) => read,
            Err(e) => {
                problems.push(format!(
                    "{}: {} refuses its environment: {e:#}",
                    c.place, c.binary
                ));
                continue;
            }
        };
        for key in &c.own {
            if !read.contains(key) && !NOT_TARDIS.contains(&key.as_str()) {
                problems.push(format!(
                    "{}: {key} is set but {} never reads it",
                    c.place, c.binary
                ));
            }
        }
        for (source, keys) in &c.shared {
            given_by_source
                .entry(source.clone())
                .or_default()
                .extend(keys.iter().cloned());
            read_by_source
                .entry(source.clone())
                .or_default()
                .extend(keys.iter().filter(|k| read.contains(*k)).cloned());
        }
    }
    for (source, given) in &given_by_source {
        let read = &read_by_source[source];
        for key in given.difference(read) {
            if !NOT_TARDIS.contains(&key.as_str()) {
                problems.push(format!(
                    "{source}: {key} is given to workers, but none of them reads it"
                ));
            }
        }
    }
    Ok(problems)
}

#[test]
fn every_variable_the_manifests_set_is_one_the_binaries_accept() -> Result<()> {
    let containers = kubernetes_containers()?;
    let binaries: BTreeSet<&str> = containers.iter().map(|c| c.binary.as_str()).collect();
    assert_eq!(
        binaries,
        BTreeSet::from(["enricher", "fetcher", "writer"]),
        "every worker has a manifest"
    );
    let problems = check(&containers)?;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[test]
fn every_variable_the_compose_file_sets_is_one_the_binaries_accept() -> Result<()> {
    let containers = compose_containers()?;
    assert!(containers.len() >= 5, "{containers:?}");
    let problems = check(&containers)?;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[test]
fn a_misspelt_variable_is_found() -> Result<()> {
    let mut containers = kubernetes_containers()?;
    let enricher = containers
        .iter_mut()
        .find(|c| c.binary == "enricher")
        .context("an enricher")?;
    enricher.env.insert("LLM_RMP".into(), "600".into());
    enricher.own.insert("LLM_RMP".into());
    let writer = containers
        .iter_mut()
        .find(|c| c.binary == "writer")
        .context("a writer")?;
    writer
        .env
        .insert("WRITER_BATCH_MESSAGES".into(), "zero".into());
    let problems = check(&containers)?.join("\n");
    assert!(
        problems.contains("LLM_RMP is set but enricher never reads it"),
        "{problems}"
    );
    assert!(problems.contains("WRITER_BATCH_MESSAGES"), "{problems}");
    Ok(())
}
