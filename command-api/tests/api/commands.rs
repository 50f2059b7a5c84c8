use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TENANT, TestApp};

#[tokio::test]
async fn an_account_lives_through_every_command() {
    let app = TestApp::spawn().await;
    let teller = app.teller();
    let opened = app
        .post_with(
            "/v1/accounts",
            &teller,
            &[],
            Some(json!({"owner": "Ada Lovelace", "currency": "EUR", "overdraft_limit": 100})),
        )
        .await;
    assert_eq!(opened.status, StatusCode::CREATED);
    assert_eq!(opened.version(), 1);
    let id = opened.body["account_id"].as_str().unwrap().to_owned();
    // On the query API, where the account can be read (QUERY_API_PUBLIC_URL).
    assert_eq!(
        opened.headers["location"],
        format!("http://127.0.0.1:8081/v1/accounts/{id}").as_str()
    );
    assert_eq!(opened.headers["etag"], "\"1\"");

    let base = format!("/v1/accounts/{id}");
    let steps = [
        ("deposits", Some(json!({"amount": 1000, "currency": "EUR"}))),
        (
            "withdrawals",
            Some(json!({"amount": 1100, "currency": "EUR"})),
        ),
        ("freeze", None),
        ("unfreeze", None),
        ("deposits", Some(json!({"amount": 100, "currency": "EUR"}))),
        ("close", None),
    ];
    for (expected_version, (action, body)) in (2..).zip(steps) {
        let reply = app
            .post_with(&format!("{base}/{action}"), &teller, &[], body)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{action}: {}", reply.body);
        assert_eq!(reply.version(), expected_version, "{action}");
        assert_eq!(reply.body["account_id"], id.as_str());
        assert_eq!(
            reply.headers["etag"],
            format!("\"{expected_version}\"").as_str()
        );
    }

    let events: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT sequence, event_type, metadata::jsonb ->> 'tenant' FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let types: Vec<&str> = events.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "AccountOpened",
            "MoneyDeposited",
            "MoneyWithdrawn",
            "AccountFrozen",
            "AccountUnfrozen",
            "MoneyDeposited",
            "AccountClosed"
        ]
    );
    assert!(events.iter().all(|(_, _, tenant)| tenant == TENANT));
}

#[tokio::test]
async fn every_event_carries_its_metadata() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = app
        .post_with(
            &format!("/v1/accounts/{account}/deposits"),
            &app.teller(),
            &[
                ("x-request-id", "req-1"),
                ("x-correlation-id", "corr-1"),
                ("idempotency-key", "key-1"),
                ("traceparent", traceparent),
            ],
            Some(json!({"amount": 5, "currency": "EUR"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-request-id"], "req-1");
    let metadata: serde_json::Value = sqlx::query_scalar(
        "SELECT metadata::jsonb FROM events WHERE aggregate_id = $1 AND sequence = 2",
    )
    .bind(account.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(metadata["tenant"], TENANT);
    assert_eq!(metadata["actor"], "tester");
    assert_eq!(metadata["request_id"], "req-1");
    assert_eq!(metadata["causation_id"], "req-1");
    assert_eq!(metadata["correlation_id"], "corr-1");
    assert_eq!(metadata["idempotency_key"], "key-1");
    assert_eq!(metadata["traceparent"], traceparent);
}

#[tokio::test]
async fn if_match_applies_only_to_the_current_version() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let path = format!("/v1/accounts/{account}/deposits");
    let body = json!({"amount": 5, "currency": "EUR"});
    let current = app
        .post_with(
            &path,
            &app.teller(),
            &[("if-match", "\"1\"")],
            Some(body.clone()),
        )
        .await;
    assert_eq!(current.version(), 2);

    let before = app.event_count().await;
    let stale = app
        .post_with(
            &path,
            &app.teller(),
            &[("if-match", "\"1\"")],
            Some(body.clone()),
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert_eq!(stale.problem(), "conflict");
    assert_eq!(stale.body["current_version"], 2);
    assert_eq!(stale.headers["etag"], "\"2\"");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn a_replica_with_a_stale_cache_sees_the_latest_state() {
    let app = TestApp::spawn().await;
    let other = app.replica().await;
    let account = app.open_account(&app.teller(), 0).await;
    // Both replicas cache the account...
    assert_eq!(app.deposit(account, 10).await.version(), 2);
    assert_eq!(other.deposit(account, 10).await.version(), 3);
    // ...and each write of one makes the other's cache stale.
    assert_eq!(app.deposit(account, 10).await.version(), 4);
    let freeze = other
        .post_with(
            &format!("/v1/accounts/{account}/freeze"),
            &other.teller(),
            &[],
            None,
        )
        .await;
    assert_eq!(freeze.version(), 5);
    // `app` still caches an active account: the refusal must come from the latest state.
    let refused = app.deposit(account, 10).await;
    assert_eq!(refused.problem(), "account-frozen");
    let unfreeze = other
        .post_with(
            &format!("/v1/accounts/{account}/unfreeze"),
            &other.teller(),
            &[],
            None,
        )
        .await;
    assert_eq!(unfreeze.version(), 6);
    // And `app`, caching a frozen account, must not refuse what the latest state allows.
    assert_eq!(app.deposit(account, 10).await.version(), 7);
    // If-Match against a version only the other replica has seen.
    let matched = app
        .post_with(
            &format!("/v1/accounts/{account}/deposits"),
            &app.teller(),
            &[("if-match", "\"7\"")],
            Some(json!({"amount": 1, "currency": "EUR"})),
        )
        .await;
    assert_eq!(matched.version(), 8);
    let stale_match = other
        .post_with(
            &format!("/v1/accounts/{account}/deposits"),
            &other.teller(),
            &[("if-match", "\"6\"")],
            Some(json!({"amount": 1, "currency": "EUR"})),
        )
        .await;
    assert_eq!(stale_match.status, StatusCode::CONFLICT);
    assert_eq!(stale_match.body["current_version"], 8);
    assert_eq!(app.balance(account).await, 41);
}
