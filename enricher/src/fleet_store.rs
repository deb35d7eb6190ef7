//! Where the fleet's LLM budget is kept: the [`BudgetStore`] trait (load, compare-and-set,
//! recover), the NATS KV entry every replica shares ([`KvStore`], one entry per model and
//! endpoint in a file-backed bucket of history 1) and memory ([`MemoryStore`], one process's
//! tests). Only I/O: what is written and when is [`crate::fleet::Budget`]'s business.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use sha2::Digest as _;

use crate::budget::FleetState;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The result of a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored(u64),
    /// Someone else wrote first: load and try again.
    Conflict,
}

/// Where the shared state is kept: the KV bucket, or memory (one replica's tests).
pub trait BudgetStore: Send + Sync + fmt::Debug {
    /// The state and its revision, or `None` when nobody has written it yet.
    fn load(&self) -> BoxFuture<'_, Result<Option<(FleetState, u64)>, String>>;
    /// Writes `state` if the entry is still at `revision` (`None`: if it does not exist).
    fn put<'a>(
        &'a self,
        state: &'a FleetState,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Put, String>>;
    /// After a failure: recreate what may have gone (the bucket), if anything.
    fn recover(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The bucket's configuration.
pub fn bucket_config(bucket: String, replicas: usize) -> kv::Config {
    kv::Config {
        bucket,
        description: "Tardis: the enricher fleet's shared LLM rate-limit schedule".to_string(),
        history: 1,
        // File, like every Tardis bucket: a memory stream of one replica can lose more than
        // its data when the server restarts.
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The key of a model at an endpoint: `<model>.<hash of the endpoint>` (KV-safe characters).
pub fn budget_key(model: &str, endpoint: &str) -> String {
    let model: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = hex::encode(sha2::Sha256::digest(endpoint.as_bytes()));
    format!("{model}.{}", &hash[..12])
}

/// The state in a NATS KV entry.
pub struct KvStore {
    kv: Mutex<kv::Store>,
    key: String,
    /// To recreate the bucket if it disappears.
    js: async_nats::jetstream::Context,
    config: kv::Config,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore").field("key", &self.key).finish()
    }
}

impl KvStore {
    pub fn new(
        kv: kv::Store,
        key: String,
        js: async_nats::jetstream::Context,
        config: kv::Config,
    ) -> Self {
        Self {
            kv: Mutex::new(kv),
            key,
            js,
            config,
        }
    }

    fn kv(&self) -> kv::Store {
        self.kv
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl BudgetStore for KvStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<(FleetState, u64)>, String>> {
        Box::pin(async move {
            let entry = self
                .kv()
                .entry(&self.key)
                .await
                .map_err(|e| e.to_string())?;
            Ok(entry
                .filter(|e| e.operation == kv::Operation::Put)
                .map(|e| {
                    // A state this version cannot read starts over (it is only a schedule).
                    let state = serde_json::from_slice(&e.value).unwrap_or_default();
                    (state, e.revision)
                }))
        })
    }

    fn put<'a>(
        &'a self,
        state: &'a FleetState,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Put, String>> {
        Box::pin(async move {
            let bytes = serde_json::to_vec(state).map_err(|e| e.to_string())?;
            match revision {
                Some(rev) => match self.kv().update(&self.key, bytes.into(), rev).await {
                    Ok(r) => Ok(Put::Stored(r)),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        Ok(Put::Conflict)
                    }
                    Err(e) => Err(e.to_string()),
                },
                None => match self.kv().create(&self.key, bytes.into()).await {
                    Ok(r) => Ok(Put::Stored(r)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Put::Conflict),
                    Err(e) => Err(e.to_string()),
                },
            }
        })
    }

    fn recover(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self
                .js
                .create_or_update_key_value(self.config.clone())
                .await
            {
                Ok(store) => {
                    *self
                        .kv
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = store;
                }
                Err(e) => tracing::debug!(error = %e, "recreating the budget bucket failed"),
            }
        })
    }
}

/// The state in memory: a fleet of one process (tests).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Option<(FleetState, u64)>>,
    /// Compare-and-sets that lost (tests count them).
    pub conflicts: std::sync::atomic::AtomicU64,
}

impl BudgetStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<(FleetState, u64)>, String>> {
        let current = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Box::pin(async move { Ok(current) })
    }

    fn put<'a>(
        &'a self,
        state: &'a FleetState,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Put, String>> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = match (&*inner, revision) {
            (None, None) => {
                *inner = Some((state.clone(), 1));
                Put::Stored(1)
            }
            (Some((_, current)), Some(rev)) if *current == rev => {
                *inner = Some((state.clone(), rev + 1));
                Put::Stored(rev + 1)
            }
            _ => {
                self.conflicts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Put::Conflict
            }
        };
        Box::pin(async move { Ok(result) })
    }
}
