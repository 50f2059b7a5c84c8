use std::time::Duration;

use serde_json::json;
use service_kit::event_log::{self, EVENT_COLUMNS, LogPosition, LoggedEvent};
use service_kit::hash_chain::{BreakReason, ChainBreak, verify_stream};
use service_kit::testing;
use uuid::Uuid;

use crate::helpers::TestApp;

/// Reads the stream's raw rows and recomputes its chain in Rust.
async fn verify(app: &TestApp, account: Uuid) -> Option<ChainBreak> {
    let rows: Vec<LoggedEvent> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY sequence"
    ))
    .bind(account.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    verify_stream(rows.iter().map(LoggedEvent::chained))
}

async fn tamper(app: &TestApp, statement: &str, account: Uuid) {
    testing::tamper(&app.pool, statement, &account.to_string()).await;
}

async fn account_with_history(app: &TestApp) -> Uuid {
    let account = app.open_account(&app.teller(), 0).await;
    for amount in [10, 20, 30, 40] {
        app.deposit(account, amount).await.version();
    }
    app.post(
        &format!("/v1/accounts/{account}/withdrawals"),
        json!({"amount": 5, "currency": "EUR"}),
    )
    .await
    .version();
    account
}

#[tokio::test]
async fn the_stored_chain_recomputes_in_rust() {
    let app = TestApp::spawn().await;
    let account = account_with_history(&app).await;
    assert_eq!(verify(&app, account).await, None);
}

#[tokio::test]
async fn a_rewritten_payload_is_detected_at_its_version() {
    let app = TestApp::spawn().await;
    let account = account_with_history(&app).await;
    tamper(
        &app,
        r#"UPDATE events SET payload = '{"MoneyDeposited":{"amount":3000,"currency":"EUR","balance_after":3010}}'
            WHERE aggregate_id = $1 AND sequence = 3"#,
        account,
    )
    .await;
    assert_eq!(
        verify(&app, account).await,
        Some(ChainBreak {
            sequence: 3,
            reason: BreakReason::HashMismatch
        })
    );
}

#[tokio::test]
async fn a_deleted_event_or_a_recomputed_hash_is_detected() {
    let app = TestApp::spawn().await;
    let deleted = account_with_history(&app).await;
    tamper(
        &app,
        "DELETE FROM events WHERE aggregate_id = $1 AND sequence = 4",
        deleted,
    )
    .await;
    assert_eq!(
        verify(&app, deleted).await,
        Some(ChainBreak {
            sequence: 4,
            reason: BreakReason::SequenceGap
        })
    );

    let rehashed = account_with_history(&app).await;
    tamper(
        &app,
        "UPDATE events SET hash = sha256(hash) WHERE aggregate_id = $1 AND sequence = 2",
        rehashed,
    )
    .await;
    assert_eq!(
        verify(&app, rehashed).await,
        Some(ChainBreak {
            sequence: 2,
            reason: BreakReason::HashMismatch
        })
    );
}

#[tokio::test]
async fn the_log_refuses_updates_and_deletes() {
    let app = TestApp::spawn().await;
    let account = account_with_history(&app).await;
    for statement in [
        "UPDATE events SET payload = '{}' WHERE aggregate_id = $1",
        "DELETE FROM events WHERE aggregate_id = $1",
    ] {
        let err = sqlx::query(statement)
            .bind(account.to_string())
            .execute(&app.pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    assert_eq!(verify(&app, account).await, None);
}

#[tokio::test]
async fn a_writer_cannot_forge_the_hash_or_skip_a_version() {
    let app = TestApp::spawn().await;
    let account = account_with_history(&app).await;
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, hash)
                  VALUES ('account', $1, $2, 'AccountFrozen', '1', '\"AccountFrozen\"', '{}', '\\x00')";
    let gap = sqlx::query(insert)
        .bind(account.to_string())
        .bind(9_i64)
        .execute(&app.pool)
        .await;
    assert!(gap.unwrap_err().to_string().contains("no predecessor"));
    sqlx::query(insert)
        .bind(account.to_string())
        .bind(7_i64)
        .execute(&app.pool)
        .await
        .unwrap();
    // The trigger replaced the forged hash with the real one.
    assert_eq!(verify(&app, account).await, None);
}

/// Transaction ids are compared as numbers, never as text: 100 comes after 99. (Read as text,
/// a batch that crossed a power of ten came out of commit order.)
#[tokio::test]
async fn the_log_reads_in_commit_order_across_a_power_of_ten() {
    let app = TestApp::spawn().await;
    // Rows are read only once their transaction id is below every running one: on a young
    // cluster, use up transaction ids until 1000 is in the past.
    loop {
        let current: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if current > 1000 {
            break;
        }
    }
    for (tx_id, stream) in [(99, "a"), (100, "b"), (98, "c"), (1000, "d")] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, tx_id)
             VALUES ('probe', $1, 1, 'Probed', '1', '{}', '{}', $2::text::xid8)",
        )
        .bind(stream)
        .bind(tx_id.to_string())
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let events = event_log::read_committed(&app.pool, event_log::LogPosition::START, 10)
        .await
        .unwrap()
        .events;
    let order: Vec<(u64, &str)> = events
        .iter()
        .map(|e| (e.position.tx_id, e.aggregate_id.as_str()))
        .collect();
    assert_eq!(order, [(98, "c"), (99, "a"), (100, "b"), (1000, "d")]);
}

#[tokio::test]
async fn an_account_opened_as_version_1_still_loads_and_its_chain_holds() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    // As the code before AccountOpened v2 wrote it: no balance ceiling.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, 1, 'AccountOpened', '1', $2, $3)",
    )
    .bind(account.to_string())
    .bind(json!({"AccountOpened": {"tenant": crate::helpers::TENANT, "owner": "Ada",
                                   "currency": "EUR", "overdraft_limit": 0}}))
    .bind(json!({"tenant": crate::helpers::TENANT, "actor": "tester", "correlation_id": "c",
                 "causation_id": "r", "request_id": "r"}))
    .execute(&app.pool)
    .await
    .unwrap();

    assert_eq!(app.deposit(account, 25).await.version(), 2);
    assert_eq!(app.balance(account).await, 25);
    let versions: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, event_version FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(account.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(versions[0], ("AccountOpened".into(), "1".into()));
    assert_eq!(versions[1], ("MoneyDeposited".into(), "1".into()));
    assert_eq!(verify(&app, account).await, None);

    let fresh = app.open_account(&app.teller(), 0).await;
    let version: String = sqlx::query_scalar(
        "SELECT event_version FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(fresh.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(version, "2");
}

/// After a logical restore into a cluster whose transaction counter is behind the log, new
/// events would sort before the published ones and never be read: a service refuses to start
/// there, naming the cause, instead of stopping the pipeline in silence.
#[tokio::test]
async fn a_service_refuses_a_cluster_whose_transaction_counter_is_behind_the_log() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    // As restored from a cluster that had handed out many more transaction ids.
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                               payload, metadata, tx_id)
           VALUES ('account', $1, 2, 'AccountFrozen', '1', '"AccountFrozen"',
                   '{"tenant":"acme"}', (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000)::text::xid8)"#,
    )
    .bind(account.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    let refused = command_api::Application::build(command_api::Config::for_tests(
        app.database.clone(),
        service_kit::testing::auth(),
    ))
    .await
    .err()
    .expect("the command API refuses to start");
    assert!(
        refused
            .to_string()
            .contains("transaction counter is behind"),
        "{refused}"
    );
}

/// The README's restore procedure, run: a logical dump restored into a new database of this
/// cluster (whose transaction counter is ahead of every id in the dump) serves commands that
/// continue each stream and its hash chain, and the relay, from its restored checkpoint, finds
/// exactly the events appended since.
#[tokio::test]
async fn a_logical_restore_continues_the_log_where_the_dump_left_it() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    app.deposit(account, 10).await.version();
    // The relay had published everything before the dump: both events, once no older
    // transaction of the cluster (another test's) holds them back.
    let published =
        testing::readable_events(&app.pool, LogPosition::START, 2, Duration::from_secs(30)).await;
    let head = published.last().expect("events").position;
    assert!(
        event_log::advance_checkpoint(&app.pool, "kafka-relay", LogPosition::START, head)
            .await
            .unwrap()
    );

    let restored = app.restored().await;
    assert_eq!(restored.deposit(account, 5).await.version(), 3);
    let checkpoint = event_log::load_checkpoint(&restored.pool, "kafka-relay")
        .await
        .unwrap();
    assert_eq!(checkpoint, head);
    // Readable once no older transaction of the cluster (another test's) is open.
    let unpublished =
        testing::readable_events(&restored.pool, checkpoint, 1, Duration::from_secs(30)).await;
    assert_eq!(unpublished[0].sequence, 3);
    assert_eq!(unpublished[0].aggregate_id, account.to_string());
    let stream: Vec<LoggedEvent> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY sequence"
    ))
    .bind(account.to_string())
    .fetch_all(&restored.pool)
    .await
    .unwrap();
    assert_eq!(verify_stream(stream.iter().map(LoggedEvent::chained)), None);
    // The original database is untouched by the restored one's appends.
    let original: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(original, 2);
}

/// The stuck-transfer sweep reads `transfers_in_flight`, which the appending statement keeps:
/// a transfer enters with its request and leaves with its final event.
#[tokio::test]
async fn transfers_in_flight_follow_the_log() {
    let app = TestApp::spawn().await;
    let from = app.open_account(&app.teller(), 0).await;
    let to = app.open_account(&app.teller(), 0).await;
    app.deposit(from, 10).await.version();
    let reply = app
        .post(
            "/v1/transfers",
            json!({"from_account": from, "to_account": to, "amount": 5,
                   "currency": "EUR", "reference": "r"}),
        )
        .await;
    let transfer = reply.body["transfer_id"]
        .as_str()
        .expect("transfer id")
        .to_owned();
    let in_flight = || async {
        sqlx::query_scalar::<_, String>("SELECT transfer_id FROM transfers_in_flight")
            .fetch_all(&app.pool)
            .await
            .unwrap()
    };
    assert_eq!(in_flight().await, vec![transfer.clone()]);
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                               payload, metadata)
           VALUES ('transfer', $1, 2, 'TransferRejected', '1',
                   '{"TransferRejected":{"reason":"insufficient_funds"}}', '{"tenant":"acme"}')"#,
    )
    .bind(&transfer)
    .execute(&app.pool)
    .await
    .unwrap();
    assert!(in_flight().await.is_empty());
}
