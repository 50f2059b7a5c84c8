//! Least privilege in Postgres: each service's login can do its job and nothing more, and the
//! migrations run as an owner that is not a superuser.

use std::time::Duration;

use service_kit::db::{self, DatabaseConfig, DatabaseError, ServiceRole};
use service_kit::event_log::{self, LogPosition};
use service_kit::testing::TestDatabase;
use sqlx::PgPool;

use crate::helpers::TestApp;

async fn pool_as(database: &DatabaseConfig) -> PgPool {
    db::connect(database).await.expect("connect as the service")
}

/// The Postgres error code of a statement that must fail.
async fn refused(pool: &PgPool, statement: &str) -> String {
    let err = sqlx::query(statement)
        .execute(pool)
        .await
        .expect_err(statement);
    err.as_database_error()
        .and_then(|err| err.code())
        .map(|code| code.into_owned())
        .unwrap_or_else(|| panic!("{statement}: not a database error: {err}"))
}

/// Insufficient privilege, or "must be owner".
const INSUFFICIENT_PRIVILEGE: &str = "42501";

#[tokio::test]
async fn the_writer_appends_but_cannot_rewrite_history() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    app.deposit(account, 5).await.version();
    let writer = pool_as(&app.database).await;
    for statement in [
        "UPDATE events SET payload = '{}'",
        // Its place in the log, or its time, chosen by the writer: the relay could skip it.
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, tx_id)
         VALUES ('account', 'x', 1, 'AccountFrozen', '1', '\"AccountFrozen\"', '{\"tenant\":\"acme\"}', '1')",
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at)
         VALUES ('account', 'x', 1, 'AccountFrozen', '1', '\"AccountFrozen\"', '{\"tenant\":\"acme\"}', now() - interval '1 year')",
        "DELETE FROM events",
        "TRUNCATE events",
        "ALTER TABLE events DISABLE TRIGGER events_append_only",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "DROP TABLE events",
        "UPDATE accounts SET balance = 1000000",
        "SET session_replication_role = replica",
    ] {
        assert_eq!(
            refused(&writer, statement).await,
            INSUFFICIENT_PRIVILEGE,
            "{statement}"
        );
    }
    assert_eq!(app.event_count().await, 2, "history is as it was");
}

#[tokio::test]
async fn the_reader_and_the_projector_cannot_write_the_event_store() {
    let database = TestDatabase::create().await;
    for role in [ServiceRole::TenantReader, ServiceRole::Projector] {
        let pool = pool_as(&database.config_as(role)).await;
        for statement in [
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', 'x', 1, 'AccountFrozen', '1', '\"AccountFrozen\"', '{\"tenant\":\"t\"}')",
            "UPDATE events SET payload = '{}'",
            "DELETE FROM log_checkpoints",
        ] {
            assert_eq!(
                refused(&pool, statement).await,
                INSUFFICIENT_PRIVILEGE,
                "{role:?}: {statement}"
            );
        }
    }
    let reader = pool_as(&database.config_as(ServiceRole::TenantReader)).await;
    for statement in [
        "INSERT INTO accounts (id, tenant, owner, currency, overdraft_limit, balance, status, version, opened_at, updated_at)
         VALUES (gen_random_uuid(), 't', 'o', 'EUR', 0, 0, 'active', 1, now(), now())",
        "DELETE FROM accounts",
    ] {
        assert_eq!(
            refused(&reader, statement).await,
            INSUFFICIENT_PRIVILEGE,
            "{statement}"
        );
    }
}

/// The relay's oldest-transaction gauge reads pg_stat_activity, which hides other sessions'
/// transactions from roles outside pg_monitor.
#[tokio::test]
async fn the_oldest_open_transaction_is_visible_to_the_writer() {
    let database = TestDatabase::create().await;
    let writer = pool_as(&database.config_as(ServiceRole::Writer)).await;
    let mut open = database.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lag = event_log::lag(&writer, LogPosition::START).await.unwrap();
    assert!(
        lag.oldest_transaction_seconds >= 1.0,
        "{}",
        lag.oldest_transaction_seconds
    );
    open.rollback().await.unwrap();
}

/// An owner that is neither a superuser nor allowed to create roles migrates a fresh
/// database (once a DBA created the roles); a service's login only checks the schema and
/// refuses to start on one that is behind.
#[tokio::test]
async fn an_owner_without_superuser_or_createrole_migrates_and_services_only_check() {
    let cluster = TestDatabase::create().await;
    // The roles exist in the cluster (the first migration created them); the owner is new.
    let owner = format!("ledger_test_owner_{}", uuid::Uuid::new_v4().simple());
    let name = db::test_database_name();
    for statement in [
        format!("CREATE ROLE {owner} LOGIN PASSWORD '{owner}' NOSUPERUSER NOCREATEROLE"),
        format!("CREATE DATABASE {name} OWNER {owner}"),
    ] {
        sqlx::query(&statement)
            .execute(&cluster.pool)
            .await
            .unwrap();
    }
    let fresh = cluster.config.with_database(&name).unwrap();
    let writer_login = ServiceRole::Writer.development_login();
    let writer = pool_as(&fresh.with_login(writer_login, writer_login).unwrap()).await;
    assert!(
        matches!(db::migrate(&writer).await, Err(DatabaseError::Check(_))),
        "a service cannot start on a database nobody migrated"
    );

    let owned = pool_as(&fresh.with_login(&owner, &owner).unwrap()).await;
    db::migrate(&owned).await.expect("the owner migrates");
    db::migrate(&owned).await.expect("and again: nothing twice");
    db::migrate(&writer)
        .await
        .expect("a service starts on a migrated database");

    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&owned)
    .await
    .unwrap();
    assert!(matches!(
        db::migrate(&writer).await,
        Err(DatabaseError::NotMigrated { pending: 1 })
    ));
    owned.close().await;
    writer.close().await;
    // The role is the cluster's, so it goes; dropping a database may take longer than the
    // pool's statement timeout on a busy machine.
    let mut admin = cluster.pool.acquire().await.unwrap();
    for statement in [
        "SET statement_timeout = 0".to_owned(),
        format!("DROP DATABASE {name} WITH (FORCE)"),
        format!("DROP ROLE {owner}"),
    ] {
        sqlx::query(&statement).execute(&mut *admin).await.unwrap();
    }
}

/// A database that applied the row-level-security migration before it learnt to skip an
/// existing role still migrates: its recorded checksum is re-stamped, not refused.
#[tokio::test]
async fn a_database_migrated_with_the_earlier_text_of_a_rewritten_migration_still_migrates() {
    let database = TestDatabase::create().await;
    sqlx::query(
        "UPDATE _sqlx_migrations
            SET checksum = decode('958a80dcc9d8622c3539aff4524d89f006aa47abd982b4a9cbc0ad81119dacc9997024f77f21293d364974af41bf27f0', 'hex')
          WHERE version = 20261126000004",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    db::migrate(&database.pool)
        .await
        .expect("re-stamped, then nothing to apply");
    let current = db::MIGRATOR
        .iter()
        .find(|migration| migration.version == 20261126000004)
        .unwrap();
    let recorded: Vec<u8> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 20261126000004")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(recorded, current.checksum.as_ref());
}
