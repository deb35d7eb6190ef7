//! Optional least-privilege roles, created by `writer migrate` when `TARDIS_DB_ROLES=true`.
//!
//! | role | may | for |
//! |---|---|---|
//! | `tardis_writer` | read the schema version; SELECT, INSERT, UPDATE on the four tables; TEMPORARY on the database (its staging table) | the writer (no DDL on the schema, no DELETE, no TRUNCATE) |
//! | `tardis_fetcher` | SELECT on `source_checkpoints`; on `records`, the columns of a stored enrichment (not the payload) | the fetcher's checkpoint fallback and in-flight gauge; reusing enrichments of unchanged content |
//! | `tardis_reader` | SELECT on the four tables | dashboards, analysts, `psql` |
//!
//! The roles are created `NOLOGIN` and granted their privileges in SQL that holds no
//! password. A role can log in once its password is given to `writer migrate` in
//! `TARDIS_WRITER_DB_PASSWORD`, `TARDIS_FETCHER_DB_PASSWORD` or `TARDIS_READER_DB_PASSWORD`
//! (from a Secret): the password is turned into a SCRAM-SHA-256 verifier here, and only the
//! verifier is sent, so the password never reaches the server's logs or `pg_stat_statements`.
//! Running it again re-grants, and re-sets the passwords given (a rotation). The migrating
//! user needs `CREATEROLE` (or run it once as a superuser).

use tardis_common::secret::Secret;
use tokio_postgres::Client;

/// One role: its name, the variable holding its password, and its grants.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    pub name: &'static str,
    pub password_env: &'static str,
    pub grants: &'static [&'static str],
}

/// The roles and what each may do.
pub const ROLES: &[Role] = &[
    Role {
        name: "tardis_writer",
        password_env: "TARDIS_WRITER_DB_PASSWORD",
        grants: &[
            "GRANT SELECT ON tardis_schema_migrations TO tardis_writer",
            "GRANT SELECT, INSERT, UPDATE ON records, source_checkpoints, dead_letters, fetch_runs TO tardis_writer",
            // Records are staged in a temporary table; PUBLIC has this unless it was revoked.
            "DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO tardis_writer', current_database()); END $$",
        ],
    },
    Role {
        name: "tardis_fetcher",
        password_env: "TARDIS_FETCHER_DB_PASSWORD",
        grants: &[
            "GRANT SELECT ON source_checkpoints TO tardis_fetcher",
            "GRANT SELECT (source, record_id, content_key, enrichment, model, prompt_version, enriched_at, cost_usd, saved_usd) ON records TO tardis_fetcher",
        ],
    },
    Role {
        name: "tardis_reader",
        password_env: "TARDIS_READER_DB_PASSWORD",
        grants: &[
            "GRANT SELECT ON records, source_checkpoints, dead_letters, fetch_runs TO tardis_reader",
        ],
    },
];

/// Why the roles could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting up role {role}: {error}")]
pub struct RoleError {
    pub role: &'static str,
    pub error: String,
}

/// The `ALTER ROLE` statement that lets `role` log in with `password`: it carries a
/// SCRAM-SHA-256 verifier, never the password.
pub fn login_statement(role: &str, password: &Secret<String>) -> String {
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    format!(
        "ALTER ROLE {role} LOGIN PASSWORD '{}'",
        verifier.replace('\'', "''")
    )
}

/// Creates the roles that are missing, grants their privileges, and sets the passwords in
/// `passwords` (by role name). Returns what it did, a line each, for the Job's log.
pub async fn apply(
    client: &Client,
    passwords: &[(&'static str, Secret<String>)],
) -> Result<Vec<String>, RoleError> {
    let mut done = Vec::new();
    for role in ROLES {
        let fail = |e: tokio_postgres::Error| RoleError {
            role: role.name,
            error: tardis_common::error::chain(&e),
        };
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                &[&role.name],
            )
            .await
            .map_err(fail)?
            .get(0);
        if !exists {
            client
                .batch_execute(&format!("CREATE ROLE {} NOLOGIN", role.name))
                .await
                .map_err(fail)?;
            done.push(format!(
                "created role {} (no login until its password is set)",
                role.name
            ));
        }
        for grant in role.grants {
            client.batch_execute(grant).await.map_err(fail)?;
        }
        if let Some((_, password)) = passwords.iter().find(|(name, _)| *name == role.name) {
            client
                .batch_execute(&login_statement(role.name, password))
                .await
                .map_err(fail)?;
            done.push(format!(
                "role {} may log in (password from {})",
                role.name, role.password_env
            ));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_statement_carries_a_verifier_not_the_password() {
        let s = login_statement("tardis_writer", &Secret::new("pa'ss-word-123".to_string()));
        assert!(
            s.starts_with("ALTER ROLE tardis_writer LOGIN PASSWORD 'SCRAM-SHA-256$4096:"),
            "{s}"
        );
        assert!(!s.contains("pa'ss-word-123"), "{s}");
        assert_eq!(s.matches('\'').count(), 2, "{s}");
    }

    #[test]
    fn every_grant_names_its_own_role() {
        for role in ROLES {
            for grant in role.grants {
                let to = format!(" TO {}", role.name);
                assert!(
                    grant.ends_with(&to)
                        || grant.ends_with(&format!("{to}', current_database()); END $$")),
                    "{grant}"
                );
                assert!(
                    !grant.contains("DELETE") && !grant.contains("TRUNCATE"),
                    "{grant}"
                );
            }
        }
    }
}
