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
    for mut run in runs {
        let (status, output) = run
            .exited_within(std::time::Duration::from_secs(120))
            .await?;
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

/// The whole pipeline on the cluster: every worker started at the same moment, the records
/// stream's leader SIGKILLed mid-run and started again; every record is stored once.
#[tokio::test]
async fn the_records_streams_leader_killed_mid_run_loses_and_duplicates_nothing() -> Result<()> {
    use devtools::demo_source::{DemoConfig, Running as DemoSource};
    use devtools::mock_llm::{MockConfig, Running as MockLlm};
    use std::time::Duration;
    use tardis_common::nats::StreamKind;

    use super::pipeline::{pipeline_env, spawn};
    use crate::harness::{TestDb, TestNats, wait_for};

    const PER_SOURCE: u64 = 6000;
    let (mut servers, url) = cluster().await?;
    let t = TestNats::on(&servers[0].url()).await?;
    let db = TestDb::new().await?;
    let demo = DemoSource::start(DemoConfig {
        backlog: PER_SOURCE,
        frozen: true,
        ..DemoConfig::default()
    })
    .await?;
    // Slow enough that the run is mid-way when the leader dies.
    let llm = MockLlm::start(MockConfig {
        latency_ms: 40,
        ..MockConfig::default()
    })
    .await?;
    let mut env = pipeline_env(&t, &db, &demo, &llm)?;
    env.insert("NATS_URL".into(), url.clone());
    env.insert("TARDIS_STREAM_REPLICAS".into(), "3".into());
    env.insert("LLM_CONCURRENCY".into(), "4".into());
    env.insert("ENRICH_BATCH_LINGER".into(), "20ms".into());
    env.insert("WRITER_ACK_WAIT".into(), "10s".into());
    super::writer::migrate(&env).await?;
    // All at once, as a fresh install starts them.
    let writer = spawn("writer", &[], &env)?;
    let enrichers = [spawn("enricher", &[], &env)?, spawn("enricher", &[], &env)?];
    let mut fetcher = spawn("fetcher", &["run"], &env)?;

    let rows = || async {
        anyhow::Ok(
            db.connect()
                .await?
                .query_one("SELECT count(*) FROM records", &[])
                .await?
                .get::<_, i64>(0),
        )
    };
    wait_for("the first rows", Duration::from_secs(120), || async {
        Ok((rows().await? > 500).then_some(()))
    })
    .await?;
    let stream = t
        .jetstream()
        .get_stream(t.names().stream(StreamKind::Records))
        .await?
        .info()
        .await?
        .clone();
    let leader = stream
        .cluster
        .and_then(|c| c.leader)
        .ok_or_else(|| anyhow::anyhow!("the records stream reports no leader"))?;
    let victim = servers
        .iter()
        .position(|s| leader == format!("tardis-test-{}", s.port()))
        .ok_or_else(|| anyhow::anyhow!("leader {leader} is none of the three servers"))?;
    let at_kill = rows().await?;
    servers[victim].kill().await?;
    eprintln!("killed the records stream's leader {leader} at {at_kill} rows");
    tokio::time::sleep(Duration::from_secs(3)).await;
    servers[victim].restart().await?;
    eprintln!("{leader} restarted at {} rows", rows().await?);

    // The fetcher's run ends either way; a run that failed on the outage is run again, as its
    // CronJob's backoffLimit does.
    let (status, output) = fetcher.exited_within(Duration::from_secs(300)).await?;
    if !status.success() {
        eprintln!(
            "the fetcher run failed during the outage ({status}); running it again:\n{output}"
        );
        super::pipeline::fetch_once(&env).await?;
    }
    let total = i64::try_from(2 * PER_SOURCE)?;
    let done = wait_for("every record written", Duration::from_secs(300), || async {
        Ok((rows().await? >= total).then_some(()))
    })
    .await;
    if let Err(e) = done {
        let [a, b] = enrichers;
        panic!(
            "{e}: {} rows\nwriter:\n{}\nenricher:\n{}\nenricher:\n{}",
            rows().await?,
            writer.output(),
            a.output(),
            b.output()
        );
    }
    let client = db.connect().await?;
    // Every id of each source, 1..=PER_SOURCE, is there.
    for source in ["market_data", "user_events"] {
        let r = client
            .query_one(
                "SELECT count(*), min(record_id::bigint), max(record_id::bigint)
                   FROM records WHERE source = $1",
                &[&source],
            )
            .await?;
        let got: (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let per = i64::try_from(PER_SOURCE)?;
        assert_eq!(got, (per, 1, per), "{source}: rows, lowest id, highest id");
    }
    // Each written once: a redelivery is an unchanged replay, not a second version.
    let versions: i64 = client
        .query_one(
            "SELECT coalesce(sum(records_written), 0)::bigint FROM source_checkpoints",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(versions, total, "records_written counts each record once");
    drop(enrichers);
    drop(writer);
    Ok(())
}
