//! Fetch state in JetStream key-value buckets.
//!
//! * `TARDIS_FETCH_STATE`, key `cursor.<source>`: the fetch cursor ("published through") and
//!   the count of records published so far. Written only after JetStream acknowledged the
//!   chunk carrying it, and only by the lease holder: a run *fences* the cursor when it
//!   starts (rewrites it, taking a new revision) and every later write is a compare-and-set on
//!   the revision it last wrote. A fetcher that lost its lease to another one therefore can
//!   never move the cursor: its next write finds a newer revision and fails.
//! * `TARDIS_FETCH_LEASES`, key `<source>` (and `backfill.<source>`): who is fetching the
//!   source. The bucket's `max_age` is `FETCH_LEASE_TTL`, so the NATS server removes a lease
//!   that was not renewed within the TTL, on its own clock: expiry never depends on two hosts'
//!   clocks agreeing. Taken with `create`, renewed with compare-and-set at a third of its
//!   lifetime (a failed renewal is retried until the TTL since the last good one has passed),
//!   deleted at the end of the run. A fetcher that finds a live lease skips the source (the
//!   run is reported as `skipped`, exit code 0): the other fetcher is doing the work.

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
    /// Set by `fetcher cursor reset`: with no cursor, the next run starts from the source's
    /// `initial_lookback` instead of the written checkpoint. Cleared by the next save.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// A run lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub run_id: String,
    /// When the holder took or last renewed it (its own clock; for people, not for expiry).
    pub renewed_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {key} from the fetch-state bucket failed: {error}")]
    Read { key: String, error: String },
    #[error("writing {key} to the fetch-state bucket failed: {error}")]
    Write { key: String, error: String },
    #[error("{key} in the fetch-state bucket is not valid: {error}")]
    Corrupt { key: String, error: String },
    /// Someone else wrote the key since we last did: we no longer hold the source.
    #[error("{key} was changed by another fetcher: this run no longer holds the source")]
    Fenced { key: String },
}

impl StateError {
    /// Whether the failure says the lease or cursor is someone else's now (not a NATS blip).
    pub fn is_lost(&self) -> bool {
        matches!(self, StateError::Fenced { .. })
    }
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

/// The cursor of a source as this run holds it: the revision of our last write.
#[derive(Debug, Clone)]
pub struct HeldCursor {
    pub key: String,
    pub revision: u64,
}

/// Access to the fetch-state and lease buckets.
#[derive(Debug, Clone)]
pub struct FetchState {
    store: Store,
    leases: Store,
    ttl: Duration,
}

pub fn cursor_key(source: &str) -> String {
    format!("cursor.{source}")
}

pub fn lease_key(source: &str, backfill: bool) -> String {
    if backfill {
        format!("backfill.{source}")
    } else {
        source.to_string()
    }
}

/// The lease bucket's configuration: entries expire `ttl` after their last write.
pub fn lease_bucket_config(bucket: String, ttl: Duration, replicas: usize) -> kv::Config {
    kv::Config {
        bucket,
        description: "Tardis fetch run leases (expire FETCH_LEASE_TTL after the last renewal)"
            .to_string(),
        history: 1,
        max_age: ttl,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

fn write_error(key: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Write {
        key: key.to_string(),
        error: e.to_string(),
    }
}

impl FetchState {
    pub fn new(store: Store, leases: Store, ttl: Duration) -> Self {
        Self { store, leases, ttl }
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
        value.map(|v| decode_cursor(&key, &v)).transpose()
    }

    /// Reads the cursor and fences it: rewrites it so that the revision any earlier holder
    /// knows is stale. Call after taking the lease, before the first cursor write.
    pub async fn fence_cursor(
        &self,
        source: &str,
    ) -> Result<(Option<CursorState>, HeldCursor), StateError> {
        let key = cursor_key(source);
        let entry = self.store.entry(&key).await.map_err(|e| StateError::Read {
            key: key.clone(),
            error: e.to_string(),
        })?;
        let live = entry.filter(|e| e.operation == kv::Operation::Put);
        match live {
            Some(entry) => {
                let state = decode_cursor(&key, &entry.value)?;
                let revision = self
                    .store
                    .update(&key, entry.value.clone(), entry.revision)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => {
                            StateError::Fenced { key: key.clone() }
                        }
                        _ => write_error(&key, e),
                    })?;
                Ok((Some(state), HeldCursor { key, revision }))
            }
            None => {
                let empty = CursorState {
                    cursor: None,
                    published_total: 0,
                    updated_at: Utc::now(),
                    reset: false,
                };
                let bytes = serde_json::to_vec(&empty).map_err(|e| write_error(&key, e))?;
                let revision = self
                    .store
                    .create(&key, bytes.into())
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => {
                            StateError::Fenced { key: key.clone() }
                        }
                        _ => write_error(&key, e),
                    })?;
                Ok((None, HeldCursor { key, revision }))
            }
        }
    }

    /// Saves the cursor if nobody else wrote it since our last write.
    pub async fn save_cursor(
        &self,
        held: &mut HeldCursor,
        state: &CursorState,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(state).map_err(|e| write_error(&held.key, e))?;
        let revision = self
            .store
            .update(&held.key, bytes.into(), held.revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StateError::Fenced {
                    key: held.key.clone(),
                },
                _ => write_error(&held.key, e),
            })?;
        held.revision = revision;
        Ok(())
    }

    fn lease_value(&self, holder: &str, run_id: &str) -> Lease {
        Lease {
            holder: holder.to_string(),
            run_id: run_id.to_string(),
            renewed_at: Utc::now(),
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
        let bytes = serde_json::to_vec(&lease).map_err(|e| write_error(key, e))?;
        // A lease that expires or is released between our create and our read: try again.
        for _ in 0..3 {
            match self.leases.create(key, bytes.clone().into()).await {
                Ok(revision) => {
                    return Ok(Acquired::Yes(HeldLease {
                        key: key.into(),
                        lease,
                        revision,
                    }));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(write_error(key, e)),
            }
            let current = self.leases.get(key).await.map_err(|e| StateError::Read {
                key: key.into(),
                error: e.to_string(),
            })?;
            if let Some(value) = current {
                let current = serde_json::from_slice::<Lease>(&value).unwrap_or(Lease {
                    holder: "another fetcher".into(),
                    run_id: String::new(),
                    renewed_at: Utc::now(),
                });
                return Ok(Acquired::No(current));
            }
        }
        Err(write_error(key, "the lease kept changing hands; try again"))
    }

    /// Extends a held lease once; [`StateError::Fenced`] when it is gone (expired on the
    /// server or taken by another fetcher), another error for a failure worth retrying.
    pub async fn renew(&self, held: &mut HeldLease) -> Result<(), StateError> {
        let lease = self.lease_value(&held.lease.holder, &held.lease.run_id);
        let bytes = serde_json::to_vec(&lease).map_err(|e| write_error(&held.key, e))?;
        match self
            .leases
            .update(&held.key, bytes.into(), held.revision)
            .await
        {
            Ok(revision) => {
                held.lease = lease;
                held.revision = revision;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // An earlier renewal whose answer we lost may have gone through: if the entry
                // is still ours, carry on from its revision.
                let entry = self.leases.entry(&held.key).await.ok().flatten();
                match entry {
                    Some(entry) if entry.operation == kv::Operation::Put => {
                        match serde_json::from_slice::<Lease>(&entry.value) {
                            Ok(l)
                                if l.holder == held.lease.holder
                                    && l.run_id == held.lease.run_id =>
                            {
                                held.revision = entry.revision;
                                held.lease = l;
                                Ok(())
                            }
                            _ => Err(StateError::Fenced {
                                key: held.key.clone(),
                            }),
                        }
                    }
                    _ => Err(StateError::Fenced {
                        key: held.key.clone(),
                    }),
                }
            }
            Err(e) => Err(write_error(&held.key, e)),
        }
    }

    /// Gives a lease back (only if it is still ours).
    pub async fn release(&self, held: &HeldLease) -> Result<(), StateError> {
        self.leases
            .delete_expect_revision(&held.key, Some(held.revision))
            .await
            .map_err(|e| write_error(&held.key, e))
    }
}

fn decode_cursor(key: &str, value: &[u8]) -> Result<CursorState, StateError> {
    serde_json::from_slice(value).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        error: e.to_string(),
    })
}
