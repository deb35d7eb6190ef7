//! Fetch state in the JetStream key-value bucket `TARDIS_FETCH_STATE`.
//!
//! * `cursor.<source>`: the fetch cursor ("published through") and the count of records
//!   published so far. Written only after JetStream acknowledged the chunk carrying it.
//! * `lease.<source>` (and `lease.backfill.<source>`): who is fetching the source, until when.
//!   Taken with compare-and-set (`create`, or `update` on the revision of an expired lease),
//!   renewed at a third of its lifetime, deleted at the end of the run. A fetcher that finds
//!   a live lease skips the source (the run is reported as `skipped`, exit code 0): the other
//!   fetcher is doing the work. A fetcher that dies leaves a lease that expires after
//!   `FETCH_LEASE_TTL`.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Store};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tardis_common::messages::Cursor;

/// The persisted fetch cursor of a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CursorState {
    pub cursor: Option<Cursor>,
    /// Records published by all runs so far (for the in-flight gauge).
    pub published_total: u64,
    pub updated_at: DateTime<Utc>,
}

/// A run lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub run_id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {key} from the fetch-state bucket failed: {error}")]
    Read { key: String, error: String },
    #[error("writing {key} to the fetch-state bucket failed: {error}")]
    Write { key: String, error: String },
    #[error("{key} in the fetch-state bucket is not valid: {error}")]
    Corrupt { key: String, error: String },
}

/// The outcome of trying to take a lease.
#[derive(Debug)]
pub enum Acquired {
    Yes(HeldLease),
    /// Someone else holds it.
    No(Lease),
}

/// A lease we hold, with the revision to renew or release it by.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub key: String,
    pub lease: Lease,
    pub revision: u64,
}

/// Access to the fetch-state bucket.
#[derive(Debug, Clone)]
pub struct FetchState {
    store: Store,
    ttl: Duration,
}

pub fn cursor_key(source: &str) -> String {
    format!("cursor.{source}")
}

pub fn lease_key(source: &str, backfill: bool) -> String {
    if backfill {
        format!("lease.backfill.{source}")
    } else {
        format!("lease.{source}")
    }
}

impl FetchState {
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self { store, ttl }
    }

    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    pub async fn load_cursor(&self, source: &str) -> Result<Option<CursorState>, StateError> {
        let key = cursor_key(source);
        let value = self.store.get(&key).await.map_err(|e| StateError::Read {
            key: key.clone(),
            error: e.to_string(),
        })?;
        value
            .map(|v| {
                serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                    key: key.clone(),
                    error: e.to_string(),
                })
            })
            .transpose()
    }

    pub async fn save_cursor(&self, source: &str, state: &CursorState) -> Result<(), StateError> {
        let key = cursor_key(source);
        let bytes = serde_json::to_vec(state).map_err(|e| StateError::Write {
            key: key.clone(),
            error: e.to_string(),
        })?;
        self.store
            .put(&key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| StateError::Write {
                key,
                error: e.to_string(),
            })
    }

    fn lease_value(&self, holder: &str, run_id: &str) -> Lease {
        Lease {
            holder: holder.to_string(),
            run_id: run_id.to_string(),
            expires_at: Utc::now()
                + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::minutes(5)),
        }
    }

    /// Takes the lease on `key` unless someone else holds a live one.
    pub async fn acquire(
        &self,
        key: &str,
        holder: &str,
        run_id: &str,
    ) -> Result<Acquired, StateError> {
        let lease = self.lease_value(holder, run_id);
        let bytes = serde_json::to_vec(&lease).map_err(|e| StateError::Write {
            key: key.into(),
            error: e.to_string(),
        })?;
        match self.store.create(key, bytes.clone().into()).await {
            Ok(revision) => {
                return Ok(Acquired::Yes(HeldLease {
                    key: key.into(),
                    lease,
                    revision,
                }));
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StateError::Write {
                    key: key.into(),
                    error: e.to_string(),
                });
            }
        }
        let entry = self.store.entry(key).await.map_err(|e| StateError::Read {
            key: key.into(),
            error: e.to_string(),
        })?;
        let Some(entry) = entry else {
            // Deleted between our create and read: try once more from the top.
            return Box::pin(self.acquire(key, holder, run_id)).await;
        };
        let current: Option<Lease> = serde_json::from_slice(&entry.value).ok();
        if let Some(current) = &current
            && current.expires_at > Utc::now()
        {
            return Ok(Acquired::No(current.clone()));
        }
        match self.store.update(key, bytes.into(), entry.revision).await {
            Ok(revision) => Ok(Acquired::Yes(HeldLease {
                key: key.into(),
                lease,
                revision,
            })),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Another fetcher took the expired lease first.
                let now = self.store.get(key).await.ok().flatten();
                let holder = now.and_then(|v| serde_json::from_slice::<Lease>(&v).ok());
                Ok(Acquired::No(holder.unwrap_or(Lease {
                    holder: "another fetcher".into(),
                    run_id: String::new(),
                    expires_at: Utc::now(),
                })))
            }
            Err(e) => Err(StateError::Write {
                key: key.into(),
                error: e.to_string(),
            }),
        }
    }

    /// Extends a held lease; fails if someone else took it.
    pub async fn renew(&self, held: &mut HeldLease) -> Result<(), StateError> {
        let lease = self.lease_value(&held.lease.holder, &held.lease.run_id);
        let bytes = serde_json::to_vec(&lease).map_err(|e| StateError::Write {
            key: held.key.clone(),
            error: e.to_string(),
        })?;
        let revision = self
            .store
            .update(&held.key, bytes.into(), held.revision)
            .await
            .map_err(|e| StateError::Write {
                key: held.key.clone(),
                error: e.to_string(),
            })?;
        held.lease = lease;
        held.revision = revision;
        Ok(())
    }

    /// Gives a lease back (only if it is still ours).
    pub async fn release(&self, held: &HeldLease) -> Result<(), StateError> {
        self.store
            .delete_expect_revision(&held.key, Some(held.revision))
            .await
            .map_err(|e| StateError::Write {
                key: held.key.clone(),
                error: e.to_string(),
            })
    }
}
