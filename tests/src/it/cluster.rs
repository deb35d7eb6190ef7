//! A 3-node JetStream cluster: three nats-server processes with routes on localhost, R3
//! streams, as `TARDIS_STREAM_REPLICAS: "3"` in `tardis-runtime` implies.

use std::process::Command;

use anyhow::Result;

use crate::harness::{Captured, NatsServer, bins, free_port, unique_suffix};

/// Three servers routed to each other; returns them and a `NATS_URL` naming all three.
async fn cluster() -> Result<(Vec<NatsServer>, String)> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let mut servers = Vec::new();
    for (i, own) in routes.iter().enumerate() {
        let others: Vec<String> = routes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let listen = format!("nats://127.0.0.1:{own}");
        let others = others.join(",");
        servers.push(
            NatsServer::start_with(&[
                "--cluster_name",
                "tardis-test",
                "--cluster",
                &listen,
                "--routes",
                &others,
            ])
            .await?,
        );
    }
    let url = servers
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    Ok((servers, url))
}

#[tokio::test]
async fn workers_started_together_on_a_fresh_cluster_all_provision() -> Result<()> {
    let (_servers, url) = cluster().await?;
    let prefix = format!("cl{}", unique_suffix());
    // A Deployment's replicas, and the pods of a fresh install, start at the same moment.
    let mut runs = Vec::new();
    for _ in 0..4 {
        let mut cmd = Command::new(bins::bin("enricher")?);
        cmd.arg("provision")
            .env_clear()
            .env("NATS_URL", &url)
            .env("TARDIS_PREFIX", &prefix)
            .env("TARDIS_STREAM_REPLICAS", "3")
            .env(
                "PROCESSOR_ENDPOINT",
                "http://127.0.0.1:9/v1/chat/completions",
            )
            .env("OPS_ADDR", format!("127.0.0.1:{}", free_port()?));
        runs.push(Captured::spawn(cmd)?);
    }
    let mut failures = Vec::new();
    for run in runs {
        let (status, output) = tokio::task::spawn_blocking(move || {
            let mut r = run;
            r.child.wait().map(|s| (s, r.output()))
        })
        .await??;
        if !status.success() {
            failures.push(format!("{status}:\n{output}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 4 workers failed to provision on a fresh 3-node cluster:\n{}",
        failures.len(),
        failures.join("\n---\n")
    );
    Ok(())
}
