//! NATS against a real nats-server: provisioning, de-duplication, reconnection.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures_util::StreamExt;
use prometheus::Registry;
use serde_json::value::RawValue;
use tardis_common::config::Reader;
use tardis_common::messages::{self, RecordChunk, SCHEMA_VERSION, SourceRecord};
use tardis_common::nats::{
    ConsumerKind, ConsumerSpec, NatsSettings, Provisioned, StreamKind, StreamSettings, Topology,
};
use tardis_common::ops::Readiness;
use tokio_util::sync::CancellationToken;

use crate::harness::{NatsServer, TestNats, free_port, wait_for};

fn all_consumers() -> Vec<ConsumerSpec> {
    [
        ConsumerKind::Enricher,
        ConsumerKind::Writer,
        ConsumerKind::WriterDlq,
        ConsumerKind::WriterRuns,
    ]
    .into_iter()
    .map(ConsumerSpec::new)
    .collect()
}

fn settings(url: &str) -> NatsSettings {
    let env: BTreeMap<String, String> = [("NATS_URL".to_string(), url.to_string())].into();
    let mut r = Reader::new(&env);
    let s = NatsSettings::read(&mut r);
    r.finish().unwrap();
    s
}

fn sample_chunk(source: &str, ids: &[&str]) -> RecordChunk {
    let records: Vec<SourceRecord> = ids
        .iter()
        .map(|id| SourceRecord {
            id: id.to_string(),
            updated_at: Some(chrono::Utc::now()),
            payload: RawValue::from_string(format!(
                r#"{{"id":"{id}","symbol":"ACME","price":12.5}}"#
            ))
            .unwrap(),
            content_key: None,
            prior: None,
        })
        .collect();
    RecordChunk {
        schema_version: SCHEMA_VERSION,
        source: source.into(),
        chunk_id: messages::chunk_id(source, &records),
        run_id: "run-1".into(),
        chunk_seq: 0,
        records,
        cursor_after: None,
        fetched_at: chrono::Utc::now(),
    }
}

async fn publish_chunk(
    js: &async_nats::jetstream::Context,
    subject: String,
    chunk: &RecordChunk,
) -> anyhow::Result<async_nats::jetstream::publish::PublishAck> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", chunk.msg_id().as_str());
    let ack = js
        .publish_with_headers(subject, headers, messages::encode(chunk)?.into())
        .await?
        .await?;
    Ok(ack)
}

#[tokio::test]
async fn provisioning_twice_changes_nothing() -> anyhow::Result<()> {
    let t = TestNats::new().await?;
    let js = t.jetstream();
    let topology = Topology::new(t.names(), StreamSettings::default());

    let first = topology
        .provision(&js, &StreamKind::ALL, &all_consumers(), true)
        .await?;
    assert_eq!(first.len(), 4 + 4 + 1, "{first:?}");
    assert!(
        first.values().all(|p| *p == Provisioned::Created),
        "{first:?}"
    );

    let records = t.names().stream(StreamKind::Records);
    let before = js.get_stream(&records).await?.info().await?.clone();
    assert_eq!(before.config.duplicate_window, Duration::from_secs(7200));
    assert_eq!(
        before.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    publish_chunk(
        &js,
        t.names().records_subject("market_data"),
        &sample_chunk("market_data", &["1"]),
    )
    .await?;
    let consumer_before = js
        .get_stream(&records)
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &t.names().consumer(ConsumerKind::Enricher),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .info()
        .await?
        .clone();

    let second = topology
        .provision(&js, &StreamKind::ALL, &all_consumers(), true)
        .await?;
    assert!(
        second.values().all(|p| *p == Provisioned::Unchanged),
        "{second:?}"
    );

    let after = js.get_stream(&records).await?.info().await?.clone();
    assert_eq!(after.config, before.config);
    assert_eq!(
        after.created, before.created,
        "the stream was not recreated"
    );
    assert_eq!(
        after.state.messages, 1,
        "provisioning kept the queued message"
    );
    let consumer_after = js
        .get_stream(&records)
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &t.names().consumer(ConsumerKind::Enricher),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .info()
        .await?
        .clone();
    assert_eq!(consumer_after.config, consumer_before.config);
    assert_eq!(consumer_after.created, consumer_before.created);
    assert_eq!(consumer_after.num_pending, 1);

    // A changed setting is an update in place, not a new stream.
    let wider = Topology::new(
        t.names(),
        StreamSettings {
            duplicate_window: Duration::from_secs(3 * 3600),
            ..StreamSettings::default()
        },
    );
    let third = wider
        .provision(&js, &[StreamKind::Records], &[], false)
        .await?;
    assert_eq!(third.get(&records), Some(&Provisioned::Updated));
    let updated = js.get_stream(&records).await?.info().await?.clone();
    assert_eq!(
        updated.config.duplicate_window,
        Duration::from_secs(3 * 3600)
    );
    assert_eq!(updated.state.messages, 1);
    Ok(())
}

#[tokio::test]
async fn prefixes_isolate_pipelines_on_one_server() -> anyhow::Result<()> {
    let a = TestNats::new().await?;
    let b = TestNats::new().await?;
    for t in [&a, &b] {
        Topology::new(t.names(), StreamSettings::default())
            .provision(&t.jetstream(), &[StreamKind::Records], &[], false)
            .await?;
    }
    publish_chunk(
        &a.jetstream(),
        a.names().records_subject("s"),
        &sample_chunk("s", &["1"]),
    )
    .await?;
    let count = |t: &TestNats| {
        let t = t.clone();
        async move {
            anyhow::Ok(
                t.jetstream()
                    .get_stream(t.names().stream(StreamKind::Records))
                    .await?
                    .info()
                    .await?
                    .state
                    .messages,
            )
        }
    };
    assert_eq!(count(&a).await?, 1);
    assert_eq!(count(&b).await?, 0);
    Ok(())
}

#[tokio::test]
async fn round_trip_drops_a_duplicate_msg_id() -> anyhow::Result<()> {
    let t = TestNats::new().await?;
    let js = t.jetstream();
    let spec = ConsumerSpec::new(ConsumerKind::Enricher);
    Topology::new(t.names(), StreamSettings::default())
        .provision(
            &js,
            &[StreamKind::Records],
            std::slice::from_ref(&spec),
            false,
        )
        .await?;
    let subject = t.names().records_subject("user_events");
    let chunk = sample_chunk("user_events", &["a", "b", "c"]);

    let first = publish_chunk(&js, subject.clone(), &chunk).await?;
    assert!(!first.duplicate);
    // The same chunk re-fetched by another run: same content, so the same Nats-Msg-Id.
    let mut rerun = chunk.clone();
    rerun.run_id = "run-2".into();
    let second = publish_chunk(&js, subject.clone(), &rerun).await?;
    assert!(
        second.duplicate,
        "JetStream must drop the republished chunk"
    );
    assert_eq!(second.sequence, first.sequence);

    let stream = js.get_stream(t.names().stream(StreamKind::Records)).await?;
    let consumer: PullConsumer = stream
        .get_consumer(&t.names().consumer(ConsumerKind::Enricher))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await?;
    let mut received = Vec::new();
    while let Some(msg) = batch.next().await {
        let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
        let decoded: RecordChunk = messages::decode(&msg.payload)?;
        assert_eq!(
            msg.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string()),
            Some(chunk.msg_id())
        );
        received.push(decoded);
        msg.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    assert_eq!(received, vec![chunk]);
    let state = stream.get_info().await?.state;
    assert_eq!(
        state.messages, 0,
        "the work queue removes acknowledged messages"
    );
    Ok(())
}

#[tokio::test]
async fn first_connection_is_retried_until_the_server_appears() -> anyhow::Result<()> {
    let port = free_port()?;
    let s = settings(&format!("nats://127.0.0.1:{port}"));
    let shutdown = CancellationToken::new();
    let connecting = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { s.connect("test", None, &shutdown).await }
    });
    // Nothing listens yet: the client keeps trying.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !connecting.is_finished(),
        "connect gave up instead of retrying"
    );
    let server = NatsServer::start_on(port).await?;
    let client = tokio::time::timeout(Duration::from_secs(20), connecting).await???;
    client.flush().await?;
    drop(server);
    Ok(())
}

#[tokio::test]
async fn connect_gives_up_when_shutdown_fires() -> anyhow::Result<()> {
    let s = settings(&format!("nats://127.0.0.1:{}", free_port()?));
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let err = s.connect("test", None, &shutdown).await.unwrap_err();
    assert!(
        matches!(err, tardis_common::nats::NatsError::Cancelled),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn user_password_and_token_auth() -> anyhow::Result<()> {
    let server = NatsServer::start_with(&["--user", "tardis", "--pass", "s3cret-nats-pw"]).await?;
    let shutdown = CancellationToken::new();
    let env = |pairs: &[(&str, &str)]| {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.insert("NATS_URL".into(), server.url());
        let mut r = Reader::new(&m);
        let s = NatsSettings::read(&mut r);
        r.finish().unwrap();
        s
    };
    let ok = env(&[("NATS_USER", "tardis"), ("NATS_PASSWORD", "s3cret-nats-pw")]);
    assert!(!format!("{ok:?}").contains("s3cret-nats-pw"));
    let client = ok.connect("test", None, &shutdown).await?;
    client.flush().await?;

    let wrong = env(&[("NATS_USER", "tardis"), ("NATS_PASSWORD", "wrong-password")]);
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        wrong.connect("test", None, &shutdown),
    )
    .await
    .expect("a rejected password fails fast instead of retrying forever")
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cannot connect to NATS"), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");

    let token_server = NatsServer::start_with(&["--auth", "tok-123456789"]).await?;
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert("NATS_URL".into(), token_server.url());
    m.insert("NATS_TOKEN".into(), "tok-123456789".into());
    let mut r = Reader::new(&m);
    let s = NatsSettings::read(&mut r);
    r.finish().unwrap();
    s.connect("test", None, &shutdown).await?.flush().await?;
    Ok(())
}

#[tokio::test]
async fn client_reconnects_after_the_server_is_killed_and_restarted() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let registry = Registry::new();
    let readiness = Readiness::new(&registry)?;
    let ready = readiness.flag("nats");
    let shutdown = CancellationToken::new();
    let client = settings(&server.url())
        .connect("test", Some(ready.clone()), &shutdown)
        .await?;
    assert!(ready.get());
    let js = async_nats::jetstream::new(client.clone());
    let names = tardis_common::nats::Names::with_prefix("reconnect");
    Topology::new(names.clone(), StreamSettings::default())
        .provision(&js, &[StreamKind::Records], &[], false)
        .await?;
    publish_chunk(
        &js,
        names.records_subject("s"),
        &sample_chunk("s", &["before"]),
    )
    .await?;

    server.kill().await?;
    wait_for("readiness to drop", Duration::from_secs(20), || {
        let ready = ready.clone();
        async move { Ok((!ready.get()).then_some(())) }
    })
    .await?;
    assert_eq!(readiness.not_ready(), vec!["nats"]);

    server.restart().await?;
    wait_for("the client to reconnect", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { Ok(ready.get().then_some(())) }
    })
    .await?;
    let ack = publish_chunk(
        &js,
        names.records_subject("s"),
        &sample_chunk("s", &["after"]),
    )
    .await?;
    assert!(!ack.duplicate);
    let info = js
        .get_stream(names.stream(StreamKind::Records))
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(
        info.state.messages, 2,
        "the message from before the crash survived on disk"
    );
    Ok(())
}

#[tokio::test]
async fn a_message_larger_than_the_max_payload_fails_at_once_not_after_the_patience()
-> anyhow::Result<()> {
    let t = TestNats::new().await?;
    Topology::new(t.names(), Default::default())
        .provision(&t.jetstream(), &[StreamKind::Records], &[], false)
        .await?;
    let client = async_nats::connect(&t.url).await?;
    let max = client.server_info().max_payload;
    let js = async_nats::jetstream::new(client);
    let started = tokio::time::Instant::now();
    let result = tardis_common::nats::publish_durably(
        &js,
        &t.names().records_subject("s"),
        "too-big",
        vec![b'x'; max + 1].into(),
        Duration::from_secs(30),
        &CancellationToken::new(),
    )
    .await;
    match result {
        Err(tardis_common::nats::PublishError::TooLarge { bytes, max: m, .. }) => {
            assert_eq!((bytes, m), (max + 1, max));
        }
        other => panic!(
            "expected TooLarge, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
    Ok(())
}
