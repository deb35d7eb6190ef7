//! Versioned SQL migrations, embedded in the binary.
//!
//! `writer migrate` applies the missing ones in order, each in its own transaction, under a
//! session advisory lock (so two migrate Jobs never race), and records them in
//! `tardis_schema_migrations` with a checksum. An applied migration whose checksum changed is
//! an error: migrations are append-only. The running writer checks the schema version first
//! and refuses a schema it does not know.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// `(version, name, sql)`, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "dead_letter_raw",
        include_str!("../migrations/0002_dead_letter_raw.sql"),
    ),
];

/// The schema version this build expects.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

const LOCK_KEY: i64 = 0x7461_7264_6973; // "tardis"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database error: {0}")]
    Db(String),
    #[error(
        "migration {version} ({name}) was changed after it was applied (checksum {applied} in the database, {embedded} in this build); migrations are append-only"
    )]
    Changed {
        version: i32,
        name: String,
        applied: String,
        embedded: String,
    },
    #[error("the database schema is not initialised; run `writer migrate` first")]
    NotInitialised,
    #[error(
        "the database schema is at version {found}, this writer needs {expected}; run `writer migrate`"
    )]
    Behind { found: i32, expected: i32 },
    #[error(
        "the database schema is at version {found}, newer than this writer knows ({expected}); upgrade the writer"
    )]
    Ahead { found: i32, expected: i32 },
}

fn db(e: tokio_postgres::Error) -> MigrateError {
    MigrateError::Db(tardis_common::error::chain(&e))
}

fn checksum(sql: &str) -> String {
    hex::encode(&Sha256::digest(sql.as_bytes())[..16])
}

/// Applies what is missing; returns the versions applied now.
pub async fn migrate(
    client: &mut deadpool_postgres::Object,
) -> Result<Vec<(i32, String)>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db)?;
    let result = apply(client).await;
    if let Err(e) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
    {
        tracing::warn!(error = %e, "releasing the migration lock failed; it goes with the session");
    }
    result
}

async fn apply(client: &mut deadpool_postgres::Object) -> Result<Vec<(i32, String)>, MigrateError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tardis_schema_migrations (
                version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db)?;
    let rows = client
        .query(
            "SELECT version, name, checksum FROM tardis_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(db)?;
    let applied: Vec<(i32, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for (version, name, sum) in &applied {
        match MIGRATIONS.iter().find(|m| m.0 == *version) {
            Some((_, _, sql)) if checksum(sql) != *sum => {
                return Err(MigrateError::Changed {
                    version: *version,
                    name: name.clone(),
                    applied: sum.clone(),
                    embedded: checksum(sql),
                });
            }
            Some(_) => {}
            None => {
                return Err(MigrateError::Ahead {
                    found: *version,
                    expected: latest(),
                });
            }
        }
    }
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.iter().any(|a| a.0 == *version) {
            continue;
        }
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO tardis_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &checksum(sql)],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        done.push((*version, name.to_string()));
    }
    Ok(done)
}

/// Checks that the schema is exactly the version this build knows.
pub async fn check(client: &Client) -> Result<(), MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tardis_schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Err(MigrateError::NotInitialised);
    }
    let found: Option<i32> = client
        .query_one("SELECT max(version) FROM tardis_schema_migrations", &[])
        .await
        .map_err(db)?
        .get(0);
    let found = found.unwrap_or(0);
    match found.cmp(&latest()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less if found == 0 => Err(MigrateError::NotInitialised),
        std::cmp::Ordering::Less => Err(MigrateError::Behind {
            found,
            expected: latest(),
        }),
        std::cmp::Ordering::Greater => Err(MigrateError::Ahead {
            found,
            expected: latest(),
        }),
    }
}
