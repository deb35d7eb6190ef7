//! Versioned SQL migrations, embedded in the binary.
//!
//! `writer migrate` applies the missing ones in order, each in its own transaction, under a
//! session advisory lock (so two migrate Jobs never race), and records them in
//! `tardis_schema_migrations` with a checksum. An applied migration whose checksum changed is
//! an error: migrations are append-only. The running writer checks the schema version first
//! and refuses a schema it does not know, with one exception that makes upgrades and
//! rollbacks safe: each migration says whether it is **additive** (new tables, new nullable or
//! defaulted columns, new indexes: nothing an older writer reads or writes changes), and that
//! is recorded with it. A writer (or `writer migrate`) older than the schema runs when every
//! migration it does not know is additive, and refuses otherwise. So after an upgrade's
//! migration an old writer pod that restarts keeps working, and a rollback of the images
//! needs no down-migration.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
    /// Writers that do not know this migration still work on the schema after it: it only
    /// adds (tables, nullable or defaulted columns, indexes) and changes nothing they use.
    pub additive: bool,
}

/// The migrations, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
        additive: false,
    },
    Migration {
        version: 2,
        name: "dead_letter_raw",
        sql: include_str!("../migrations/0002_dead_letter_raw.sql"),
        additive: true,
    },
    Migration {
        version: 3,
        name: "cost_numeric",
        sql: include_str!("../migrations/0003_cost_numeric.sql"),
        additive: true,
    },
    Migration {
        version: 4,
        name: "reuse",
        sql: include_str!("../migrations/0004_reuse.sql"),
        additive: true,
    },
    Migration {
        version: 5,
        name: "operations",
        sql: include_str!("../migrations/0005_operations.sql"),
        additive: true,
    },
];

/// The schema version this build expects.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What [`check`] found, when the writer can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaStatus {
    /// Exactly this build's version.
    Current,
    /// Newer, but every migration this build does not know is additive.
    AheadAdditive { found: i32, unknown: Vec<String> },
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
        "the database schema is at version {found}, newer than this writer knows ({expected}), and migration {breaking} is not additive; upgrade the writer (or restore the database from before that migration)"
    )]
    Ahead {
        found: i32,
        expected: i32,
        breaking: String,
    },
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
    migrate_with_roles(client, None)
        .await
        .map(|(applied, _)| applied)
}

/// [`migrate`], then (under the same lock, so two Jobs never race) the optional roles of
/// [`crate::roles`]; returns the versions applied and what was done to the roles.
pub async fn migrate_with_roles(
    client: &mut deadpool_postgres::Object,
    roles: Option<&[(&'static str, tardis_common::secret::Secret<String>)]>,
) -> Result<(Vec<(i32, String)>, Vec<String>), MigrateError> {
    // "NOTICE: ... already exists, skipping" of an idempotent statement is not news; warnings
    // still reach the log.
    client
        .batch_execute("SET client_min_messages = warning")
        .await
        .map_err(db)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db)?;
    let result = async {
        let applied = apply(client).await?;
        let done = match roles {
            Some(passwords) => crate::roles::apply(client, passwords)
                .await
                .map_err(|e| MigrateError::Db(e.to_string()))?,
            None => Vec::new(),
        };
        Ok((applied, done))
    }
    .await;
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
    // Since 0.1: whether each migration is additive, for writers older than the schema.
    client
        .batch_execute(
            "ALTER TABLE tardis_schema_migrations
                ADD COLUMN IF NOT EXISTS additive boolean NOT NULL DEFAULT false",
        )
        .await
        .map_err(db)?;
    let applied = applied_migrations(client).await?;
    for a in &applied {
        match MIGRATIONS.iter().find(|m| m.version == a.version) {
            Some(m) if checksum(m.sql) != a.checksum => {
                return Err(MigrateError::Changed {
                    version: a.version,
                    name: a.name.clone(),
                    applied: a.checksum.clone(),
                    embedded: checksum(m.sql),
                });
            }
            Some(_) => {}
            None => {}
        }
    }
    // A newer build migrated already: fine when all it added is additive (a rollback).
    compatibility(&applied)?;
    let mut done = Vec::new();
    for m in MIGRATIONS {
        if applied.iter().any(|a| a.version == m.version) {
            continue;
        }
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(m.sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO tardis_schema_migrations (version, name, checksum, additive)
             VALUES ($1, $2, $3, $4)",
            &[&m.version, &m.name, &checksum(m.sql), &m.additive],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        done.push((m.version, m.name.to_string()));
    }
    // Rows recorded before the flag existed get this build's knowledge of their migrations.
    for m in MIGRATIONS.iter().filter(|m| m.additive) {
        client
            .execute(
                "UPDATE tardis_schema_migrations SET additive = true
                  WHERE version = $1 AND NOT additive",
                &[&m.version],
            )
            .await
            .map_err(db)?;
    }
    Ok(done)
}

/// A row of `tardis_schema_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub additive: bool,
}

async fn applied_migrations(client: &Client) -> Result<Vec<Applied>, MigrateError> {
    let has_flag: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
              WHERE table_name = 'tardis_schema_migrations' AND column_name = 'additive'
                AND table_schema = current_schema())",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let sql = if has_flag {
        "SELECT version, name, checksum, additive FROM tardis_schema_migrations ORDER BY version"
    } else {
        "SELECT version, name, checksum, false FROM tardis_schema_migrations ORDER BY version"
    };
    let rows = client.query(sql, &[]).await.map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| Applied {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            additive: r.get(3),
        })
        .collect())
}

/// Whether this build can work on a schema with `applied` migrations: the policy, apart
/// from the queries. Behind is for `writer migrate` to fix; ahead is fine only when every
/// migration this build does not know is additive.
pub fn compatibility(applied: &[Applied]) -> Result<SchemaStatus, MigrateError> {
    let found = applied.iter().map(|a| a.version).max().unwrap_or(0);
    let unknown: Vec<&Applied> = applied
        .iter()
        .filter(|a| !MIGRATIONS.iter().any(|m| m.version == a.version))
        .collect();
    if let Some(breaking) = unknown.iter().find(|a| !a.additive) {
        return Err(MigrateError::Ahead {
            found,
            expected: latest(),
            breaking: format!("{} ({})", breaking.version, breaking.name),
        });
    }
    if !unknown.is_empty() {
        return Ok(SchemaStatus::AheadAdditive {
            found,
            unknown: unknown
                .iter()
                .map(|a| format!("{} ({})", a.version, a.name))
                .collect(),
        });
    }
    Ok(SchemaStatus::Current)
}

/// Checks that this build can run on the schema: every migration it knows is applied, and
/// any it does not know is additive.
pub async fn check(client: &Client) -> Result<SchemaStatus, MigrateError> {
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
    let applied = applied_migrations(client).await?;
    if applied.is_empty() {
        return Err(MigrateError::NotInitialised);
    }
    if MIGRATIONS
        .iter()
        .any(|m| !applied.iter().any(|a| a.version == m.version))
    {
        return Err(MigrateError::Behind {
            found: applied.iter().map(|a| a.version).max().unwrap_or(0),
            expected: latest(),
        });
    }
    compatibility(&applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(version: i32, additive: bool) -> Applied {
        Applied {
            version,
            name: format!("m{version}"),
            checksum: String::new(),
            additive,
        }
    }

    fn known() -> Vec<Applied> {
        MIGRATIONS
            .iter()
            .map(|m| applied(m.version, m.additive))
            .collect()
    }

    #[test]
    fn the_schema_this_build_knows_is_current() {
        assert_eq!(compatibility(&known()).unwrap(), SchemaStatus::Current);
    }

    #[test]
    fn a_newer_schema_of_additive_migrations_is_accepted() {
        let mut rows = known();
        rows.push(applied(latest() + 1, true));
        rows.push(applied(latest() + 2, true));
        match compatibility(&rows).unwrap() {
            SchemaStatus::AheadAdditive { found, unknown } => {
                assert_eq!(found, latest() + 2);
                assert_eq!(unknown.len(), 2);
            }
            other => panic!("expected AheadAdditive, got {other:?}"),
        }
    }

    #[test]
    fn one_breaking_migration_among_the_newer_ones_is_refused_and_named() {
        let mut rows = known();
        rows.push(applied(latest() + 1, true));
        rows.push(applied(latest() + 2, false));
        let e = compatibility(&rows).unwrap_err();
        assert!(
            matches!(&e, MigrateError::Ahead { breaking, .. } if breaking == &format!("{} (m{})", latest() + 2, latest() + 2)),
            "{e}"
        );
    }

    #[test]
    fn versions_are_in_order_and_the_initial_schema_is_not_additive() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
        }
        assert!(!MIGRATIONS[0].additive);
    }
}
