use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn twenty_racing_retries_with_one_key_append_one_event_and_get_one_answer() {
    let app = TestApp::spawn().await;
    let other = app.replica().await;
    let account = app.open_account(&app.teller(), 0).await;
    let path = format!("/v1/accounts/{account}/deposits");
    let replies = join_all((0..20).map(|i| {
        let app = if i % 2 == 0 { &app } else { &other };
        let path = &path;
        async move {
            app.post_with(
                path,
                &app.teller(),
                &[("idempotency-key", "deposit-42")],
                Some(json!({"amount": 42, "currency": "EUR"})),
            )
            .await
        }
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.body, replies[0].body);
        assert_eq!(reply.headers["etag"], "\"2\"");
    }
    let replayed = replies
        .iter()
        .filter(|r| r.headers.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 19);
    assert_eq!(app.event_count().await, 2);
    assert_eq!(app.balance(account).await, 42);
}

#[tokio::test]
async fn racing_opens_with_one_key_open_one_account() {
    let app = TestApp::spawn().await;
    let body = json!({"owner": "Ada", "currency": "EUR"});
    let teller = app.teller();
    let replies = join_all((0..20).map(|_| {
        app.post_with(
            "/v1/accounts",
            &teller,
            &[("idempotency-key", "open-1")],
            Some(body.clone()),
        )
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.body, replies[0].body);
        assert_eq!(reply.headers["location"], replies[0].headers["location"]);
    }
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_422_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let teller = app.teller();
    let key = [("idempotency-key", "k1")];
    let deposit = |amount: i64| json!({"amount": amount, "currency": "EUR"});
    let first = app
        .post_with(
            &format!("/v1/accounts/{account}/deposits"),
            &teller,
            &key,
            Some(deposit(10)),
        )
        .await;
    assert_eq!(first.version(), 2);
    let before = app.event_count().await;
    for (path, body) in [
        (format!("/v1/accounts/{account}/deposits"), deposit(11)),
        (format!("/v1/accounts/{account}/withdrawals"), deposit(10)),
    ] {
        let reply = app.post_with(&path, &teller, &key, Some(body)).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.problem(), "idempotency-key-reused");
    }
    // The same JSON, formatted differently, is the same request.
    let same = app
        .send(
            reqwest::Method::POST,
            &format!("/v1/accounts/{account}/deposits"),
            Some(&teller),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "k1"),
            ],
            Some(b"{ \"currency\" : \"EUR\",\n \"amount\": 10 }".to_vec()),
        )
        .await;
    assert_eq!(same.body, first.body);
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn a_replay_returns_the_original_answer_even_when_the_state_moved_on() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    app.deposit(account, 100).await.version();
    let teller = app.teller();
    let path = format!("/v1/accounts/{account}/withdrawals");
    let withdraw = || {
        app.post_with(
            &path,
            &teller,
            &[("idempotency-key", "w1")],
            Some(json!({"amount": 100, "currency": "EUR"})),
        )
    };
    let first = withdraw().await;
    assert_eq!(first.version(), 3);
    // Retrying now would be refused (balance 0) if it ran again; the key returns the original.
    let again = withdraw().await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body);
    assert_eq!(app.balance(account).await, 0);
}

#[tokio::test]
async fn keys_belong_to_their_tenant() {
    let app = TestApp::spawn().await;
    let body = json!({"owner": "Ada", "currency": "EUR"});
    let acme = app
        .post_with(
            "/v1/accounts",
            &app.teller(),
            &[("idempotency-key", "same")],
            Some(body.clone()),
        )
        .await;
    let globex = app
        .post_with(
            "/v1/accounts",
            &app.token("globex", &["teller"]),
            &[("idempotency-key", "same")],
            Some(body),
        )
        .await;
    assert_eq!(acme.status, StatusCode::CREATED);
    assert_eq!(globex.status, StatusCode::CREATED);
    assert_ne!(acme.body["account_id"], globex.body["account_id"]);
    assert!(globex.headers.get("idempotent-replayed").is_none());
}
