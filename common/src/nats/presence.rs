//! Which workers run: each long-running worker (enricher, writer) writes
//! `<component>.<instance>` into the KV bucket `TARDIS_PRESENCE` every [`EVERY`]; the bucket's
//! `max_age` ([`TTL`]) lets the server drop a worker that stopped announcing, so the keys are
//! the replicas seen in the last half minute, on one clock. Best effort: a worker whose
//! announcement fails keeps working and only goes unseen.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Names;

/// How often a worker announces itself.
pub const EVERY: Duration = Duration::from_secs(10);
/// How long an announcement counts.
pub const TTL: Duration = Duration::from_secs(30);

/// The bucket's configuration.
pub fn bucket_config(bucket: String, replicas: usize) -> kv::Config {
    kv::Config {
        bucket,
        description:
            "Tardis: running workers (each announces itself every 10 s; entries expire after 30 s)"
                .to_string(),
        history: 1,
        max_age: TTL,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Announces `component` until `stop` fires (a task; returns at once).
pub fn announce(
    js: jetstream::Context,
    names: &Names,
    replicas: usize,
    component: &'static str,
    stop: CancellationToken,
) {
    let bucket = names.presence_bucket();
    let instance = format!("{:016x}", rand::random::<u64>());
    let key = format!("{component}.{instance}");
    let value = serde_json::json!({
        "component": component,
        "version": env!("CARGO_PKG_VERSION"),
        "since": chrono::Utc::now(),
    })
    .to_string();
    tokio::spawn(async move {
        let mut store: Option<kv::Store> = None;
        loop {
            if store.is_none() {
                store = match js
                    .create_or_update_key_value(bucket_config(bucket.clone(), replicas))
                    .await
                {
                    Ok(s) => Some(s),
                    Err(e) => {
                        debug!(error = %e, "presence bucket unavailable");
                        None
                    }
                };
            }
            if let Some(s) = &store
                && let Err(e) = s.put(&key, value.clone().into()).await
            {
                debug!(error = %e, "presence announcement failed");
                store = None;
            }
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                () = stop.cancelled() => {
                    if let Some(s) = &store {
                        let _deleted = s.delete(&key).await.is_ok();
                    }
                    return;
                }
            }
        }
    });
}

/// The workers seen in the last [`TTL`], counted per component (none when the bucket does
/// not exist yet).
pub async fn seen(
    js: &jetstream::Context,
    names: &Names,
) -> Result<BTreeMap<String, usize>, String> {
    let store = match js.get_key_value(names.presence_bucket()).await {
        Ok(s) => s,
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            return Ok(BTreeMap::new());
        }
        Err(e) => return Err(e.to_string()),
    };
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        if let Some((component, _)) = key.split_once('.') {
            *out.entry(component.to_string()).or_insert(0) += 1;
        }
    }
    Ok(out)
}
