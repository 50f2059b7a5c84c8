use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use service_kit::db::channels;
use sqlx::postgres::PgListener;

use crate::system::{System, TENANT};

#[tokio::test]
async fn commands_become_queryable_without_sleeping() {
    let system = System::start().await;
    let account = system.open(50).await;
    system.move_money(account, 1000).await;
    let version = system.move_money(account, -1030).await;

    let view = system.account_at(account, version).await;
    assert_eq!(view["balance"], -30);
    assert_eq!(view["status"], "active");
    assert_eq!(view["version"], 3);
    assert_eq!(view["owner"], "Ada");
    assert_eq!(view["overdraft_limit"], 50);

    let (status, _, entries) = system
        .query(
            &format!("/v1/accounts/{account}/entries?min_version={version}"),
            &system.viewer(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let items = entries["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["kind"], "deposit");
    assert_eq!(items[0]["balance_after"], 1000);
    assert_eq!(items[1]["kind"], "withdrawal");
    assert_eq!(items[1]["amount"], 1030);
    assert_eq!(items[1]["balance_after"], -30);

    let (_, frozen) = system
        .command(&format!("/v1/accounts/{account}/freeze"), None, &[])
        .await;
    let view = system
        .account_at(account, frozen["version"].as_i64().unwrap())
        .await;
    assert_eq!(view["status"], "frozen");
    system.converged(Duration::from_secs(10)).await;
}

/// A transaction that takes its position first and commits last must still be published, in
/// per-stream order, with nothing skipped and nothing applied twice.
#[tokio::test]
async fn a_late_committing_transaction_is_not_skipped() {
    let system = System::start().await;
    let slow = system.open(0).await;
    let fast = system.open(0).await;
    system.account_at(fast, 1).await;
    system.account_at(slow, 1).await;

    // Append version 2 of `slow` by hand and hold the transaction open.
    let mut held = system.pool.begin().await.unwrap();
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
           VALUES ('account', $1, 2, 'MoneyDeposited', '1',
                   '{"MoneyDeposited":{"amount":70,"currency":"EUR","balance_after":70}}',
                   json_build_object('tenant', $2::text, 'actor', 'test', 'correlation_id', 'c', 'causation_id', 'c', 'request_id', 'r'))"#,
    )
    .bind(slow.to_string())
    .bind(TENANT)
    .execute(&mut *held)
    .await
    .unwrap();

    // Later transactions commit meanwhile, with larger positions.
    let mut last = 1;
    for _ in 0..5 {
        last = system.move_money(fast, 10).await;
    }
    // The relay reads the log again after they committed (twice, so that a whole pass of its
    // loop began after them: it reads, publishes what is final, moves its checkpoint, and
    // reads again) and still publishes nothing past the open transaction.
    // (Held briefly: it holds back the relays of every other test on this server too.)
    let since = system.database_now().await;
    let looked = relay_looked_for_pending_events_after(&system, since).await;
    relay_looked_for_pending_events_after(&system, looked).await;
    let published_fast: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e, log_checkpoints c
          WHERE c.reader = 'kafka-relay' AND e.aggregate_id = $1
            AND (e.tx_id, e.global_position) <= (c.tx_id, c.global_position)",
    )
    .bind(fast.to_string())
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(
        published_fast, 1,
        "the checkpoint moved past an open transaction"
    );
    let projected: i64 = sqlx::query_scalar("SELECT version FROM accounts WHERE id = $1")
        .bind(fast)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(projected, 1, "published past an open transaction");

    held.commit().await.unwrap();
    // The held event took its position before the later ones: a reader ordering by position
    // alone would have passed it while it was invisible.
    let positions: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE sequence > 1 ORDER BY global_position",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap();
    assert_eq!(positions.len(), 6);
    assert_eq!(positions[0], slow.to_string());
    let view = system.account_at(slow, 2).await;
    assert_eq!(view["balance"], 70);
    let view = system.account_at(fast, last).await;
    assert_eq!(view["balance"], 50);
    // And the slow stream continues normally after it.
    let version = system.move_money(slow, 5).await;
    assert_eq!(version, 3);
    assert_eq!(system.account_at(slow, 3).await["balance"], 75);
    system.converged(Duration::from_secs(10)).await;
}

/// Waits (up to 10 s) until the relay, with nothing it may publish, read the log in a query that
/// started after `since` (it reads again every `PENDING_POLL` while events wait behind an open
/// transaction); returns when that query started. Seen in `pg_stat_activity`, where each
/// session shows its last query.
async fn relay_looked_for_pending_events_after(
    system: &System,
    since: chrono::DateTime<chrono::Utc>,
) -> chrono::DateTime<chrono::Utc> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let started: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT max(query_start) FROM pg_stat_activity
              WHERE datname = current_database() AND state = 'idle' AND query_start > $1
                AND query LIKE 'SELECT tx_id::text AS tx_id, global_position,%is_final%'",
        )
        .bind(since)
        .fetch_one(&system.pool)
        .await
        .unwrap();
        if let Some(started) = started {
            return started;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not read the log (event_log::read_committed) since {since}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts a command API with its relay (idle poll 30 s, so that only a wake-up makes it publish
/// soon) in place of the system's relay; returns its base URL once its relay leads.
async fn command_api_leading_the_relay(system: &mut System) -> String {
    // The killed relay's session may hold the lock a moment longer.
    let killed = system.leader_pid().await;
    system.kill_relay().await;
    let app = command_api::Application::build(command_api::Config {
        relay: Some(command_api::relay::RelayConfig {
            idle_poll: Duration::from_secs(30),
            ..command_api::relay::RelayConfig::for_tests(system.kafka.clone())
        }),
        ..command_api::Config::for_tests(
            system
                .database
                .config_as(service_kit::db::ServiceRole::Writer),
            service_kit::testing::auth(),
        )
    })
    .await
    .unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    system.leader_other_than(killed).await;
    base
}

async fn open_through(system: &System, base: &str) -> uuid::Uuid {
    let reply: serde_json::Value = system
        .client
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(crate::system::token(TENANT, &["teller"]))
        .json(&json!({"owner": "Bo", "currency": "USD"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["account_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_relay_in_the_command_api_publishes_too() {
    let mut system = System::start().await;
    let base = command_api_leading_the_relay(&mut system).await;
    let account = open_through(&system, &base).await;
    // The idle poll is 30 s: being visible within the query's wait shows the append woke it.
    let view = system.account_at(account, 1).await;
    assert_eq!(view["currency"], "USD");
}

/// Only the leader listens: a command API whose own relay leads wakes it directly and sends no
/// `NOTIFY ledger_events`, which would only wake that same relay again; a command API whose
/// relay does not lead still sends one.
#[tokio::test]
async fn only_appends_beside_a_relay_that_does_not_lead_notify_the_relays() {
    let mut system = System::start().await;
    let mut listener = PgListener::connect_with(&system.pool).await.unwrap();
    listener.listen(channels::EVENTS_APPENDED).await.unwrap();
    let base = command_api_leading_the_relay(&mut system).await;
    let account = open_through(&system, &base).await;
    system.account_at(account, 1).await;
    // Notifications arrive in commit order: the leader's, had it sent one when it appended,
    // would come before this one, sent after the event was published and projected.
    sqlx::query("SELECT pg_notify($1, 'after the leader appended')")
        .bind(channels::EVENTS_APPENDED)
        .execute(&system.pool)
        .await
        .unwrap();
    let first = listener.recv().await.unwrap();
    assert_eq!(first.payload(), "after the leader appended");

    // The system's command API runs no relay.
    system.open(0).await;
    let next = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("an append beside no leading relay sent no NOTIFY")
        .unwrap();
    assert_eq!(next.payload(), "");
}
