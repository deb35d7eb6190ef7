//! Postgres against a real server: the pool, the legacy password, readiness across a restart.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::Registry;
use tardis_common::config::Reader;
use tardis_common::ops::Readiness;
use tardis_common::postgres::{PostgresSettings, watch_reachability};
use tokio_util::sync::CancellationToken;

use crate::harness::{PostgresServer, TestDb, wait_for};

fn settings(pairs: &[(&str, String)]) -> PostgresSettings {
    let env: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut r = Reader::new(&env);
    let s = PostgresSettings::read(&mut r);
    r.finish().unwrap();
    s
}

/// `postgres://postgres:<pw>@127.0.0.1:<port>/<db>` → (host, port, db, password).
fn parts(url: &str) -> (String, String, String, String) {
    let u = url::Url::parse(url).unwrap();
    (
        u.host_str().unwrap().to_string(),
        u.port().unwrap().to_string(),
        u.path().trim_start_matches('/').to_string(),
        u.password().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn query_through_the_pool_with_pg_variables_and_db_password() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (host, port, name, password) = parts(&db.url);
    let s = settings(&[
        ("PGHOST", host),
        ("PGPORT", port),
        ("PGUSER", "postgres".into()),
        ("PGDATABASE", name.clone()),
        ("DB_PASSWORD", password.clone()),
        ("PGSSLMODE", "disable".into()),
    ]);
    assert!(!format!("{s:?}").contains(&password));
    let pool = s.pool()?;
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT current_database(), 40 + 2", &[])
        .await?;
    assert_eq!(row.get::<_, String>(0), name);
    assert_eq!(row.get::<_, i32>(1), 42);
    Ok(())
}

#[tokio::test]
async fn database_url_without_password_takes_db_password() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (host, port, name, password) = parts(&db.url);
    let s = settings(&[
        (
            "DATABASE_URL",
            format!("postgres://postgres@{host}:{port}/{name}?sslmode=disable"),
        ),
        ("DB_PASSWORD", password),
        ("PGSSLMODE", "disable".into()),
    ]);
    let client = s.pool()?.get().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM pg_tables", &[])
        .await?
        .get(0);
    assert!(n > 0);
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_an_error_that_does_not_print_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (host, port, name, _) = parts(&db.url);
    let s = settings(&[
        (
            "DATABASE_URL",
            format!("postgres://postgres@{host}:{port}/{name}"),
        ),
        ("DB_PASSWORD", "not-the-password-xyz".into()),
        ("PGSSLMODE", "disable".into()),
    ]);
    let err = match s.pool()?.get().await {
        Ok(_) => panic!("a wrong password must not connect"),
        Err(e) => tardis_common::error::chain(&e),
    };
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password-xyz"), "{err}");
    Ok(())
}

#[tokio::test]
async fn readiness_follows_postgres_through_a_stop_and_restart() -> anyhow::Result<()> {
    let mut server = PostgresServer::start().await?;
    let s = settings(&[
        ("DATABASE_URL", server.admin_url()),
        ("PGSSLMODE", "disable".into()),
    ]);
    let registry = Registry::new();
    let readiness = Readiness::new(&registry)?;
    let ready = readiness.flag("postgres");
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(watch_reachability(
        s.pool()?,
        ready.clone(),
        Duration::from_millis(200),
        shutdown.clone(),
    ));
    let is = |want: bool| {
        let ready = ready.clone();
        move || {
            let ready = ready.clone();
            async move { Ok((ready.get() == want).then_some(())) }
        }
    };
    wait_for("postgres ready", Duration::from_secs(20), is(true)).await?;
    server.stop().await?;
    wait_for("postgres not ready", Duration::from_secs(20), is(false)).await?;
    server.restart().await?;
    wait_for("postgres ready again", Duration::from_secs(30), is(true)).await?;
    shutdown.cancel();
    watcher.await?;
    Ok(())
}
