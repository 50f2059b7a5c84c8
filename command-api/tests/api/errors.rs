//! Every error kind: its status, its problem type, and that nothing was appended.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Sends `body` (raw bytes) to `path` as a teller and checks the answer.
async fn refused(app: &TestApp, path: &str, body: &[u8], status: StatusCode, problem: &str) {
    let before = app.event_count().await;
    let reply = app
        .send(
            Method::POST,
            path,
            Some(&app.teller()),
            &[("content-type", "application/json")],
            Some(body.to_vec()),
        )
        .await;
    assert_eq!(
        reply.status,
        status,
        "{path} {}: {}",
        String::from_utf8_lossy(body),
        reply.body
    );
    assert_eq!(reply.problem(), problem, "{}", reply.body);
    assert!(reply.body["title"].is_string());
    assert_eq!(
        app.event_count().await,
        before,
        "a refused request appended an event"
    );
}

fn bytes(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_type_per_kind() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let deposits = format!("/v1/accounts/{account}/deposits");
    let cases: [(&[u8], &str); 7] = [
        (b"{\"amount\": 5, ", "malformed-json"),
        (b"not json", "malformed-json"),
        (b"", "malformed-json"),
        (
            b"{\"amount\":5,\"currency\":\"EUR\",\"memo\":\"x\"}",
            "unknown-field",
        ),
        (b"{\"amount\":5}", "missing-field"),
        (b"{\"amount\":\"5\",\"currency\":\"EUR\"}", "wrong-type"),
        (b"{\"amount\":1.5,\"currency\":\"EUR\"}", "wrong-type"),
    ];
    for (body, problem) in cases {
        refused(&app, &deposits, body, StatusCode::BAD_REQUEST, problem).await;
    }
    refused(
        &app,
        "/v1/accounts",
        &bytes(json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": "lots"})),
        StatusCode::BAD_REQUEST,
        "wrong-type",
    )
    .await;
}

/// Bodies built to exhaust the parser rather than to mean anything: nested far deeper than
/// any request needs (but within the size limit), or with a field in it twice. The bodies are
/// typed, so the parser stops at the first value of the wrong shape instead of descending.
#[tokio::test]
async fn hostile_bodies_are_refused_without_harm() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let deposits = format!("/v1/accounts/{account}/deposits");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    refused(
        &app,
        &deposits,
        deep.as_bytes(),
        StatusCode::BAD_REQUEST,
        "wrong-type",
    )
    .await;
    let deep_object = format!(
        "{{\"amount\":5,\"currency\":\"EUR\",\"x\":{}1{}}}",
        "{\"a\":".repeat(2000),
        "}".repeat(2000)
    );
    refused(
        &app,
        &deposits,
        deep_object.as_bytes(),
        StatusCode::BAD_REQUEST,
        "unknown-field",
    )
    .await;
    let repeated = b"{\"amount\":5,\"amount\":6,\"currency\":\"EUR\"}";
    refused(
        &app,
        &deposits,
        repeated,
        StatusCode::BAD_REQUEST,
        "malformed-json",
    )
    .await;
    let long_key = format!("key-{}", "k".repeat(300));
    let reply = app
        .post_with(
            &deposits,
            &app.teller(),
            &[("Idempotency-Key", long_key.as_str())],
            Some(json!({"amount": 5, "currency": "EUR"})),
        )
        .await;
    assert_eq!(
        (reply.status, reply.problem()),
        (StatusCode::BAD_REQUEST, "invalid-header")
    );
}

#[tokio::test]
async fn invalid_values_are_422_with_a_type_per_kind() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let deposits = format!("/v1/accounts/{account}/deposits");
    let withdrawals = format!("/v1/accounts/{account}/withdrawals");
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for amount in [0, -1, 1_000_000_000_000_001, i64::MAX] {
        let body = bytes(json!({"amount": amount, "currency": "EUR"}));
        refused(&app, &deposits, &body, unprocessable, "amount-out-of-range").await;
        refused(
            &app,
            &withdrawals,
            &body,
            unprocessable,
            "amount-out-of-range",
        )
        .await;
    }
    for currency in ["XXX", "eur", "EURO", ""] {
        let body = bytes(json!({"amount": 1, "currency": currency}));
        refused(
            &app,
            &deposits,
            &body,
            unprocessable,
            "unsupported-currency",
        )
        .await;
    }
    let open = |owner: &str, currency: &str, overdraft: i64| {
        bytes(json!({"owner": owner, "currency": currency, "overdraft_limit": overdraft}))
    };
    refused(
        &app,
        "/v1/accounts",
        &open("Ada", "ZZZ", 0),
        unprocessable,
        "unsupported-currency",
    )
    .await;
    refused(
        &app,
        "/v1/accounts",
        &open("Ada", "EUR", -1),
        unprocessable,
        "overdraft-out-of-range",
    )
    .await;
    refused(
        &app,
        "/v1/accounts",
        &open("  ", "EUR", 0),
        unprocessable,
        "invalid-owner",
    )
    .await;
    refused(
        &app,
        "/v1/accounts",
        &open(&"x".repeat(201), "EUR", 0),
        unprocessable,
        "invalid-owner",
    )
    .await;
}

#[tokio::test]
async fn business_rule_violations_are_422_with_a_type_per_rule() {
    let app = TestApp::spawn().await;
    let teller = app.teller();
    let account = app.open_account(&teller, 50).await;
    let path = |action: &str| format!("/v1/accounts/{account}/{action}");
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    app.deposit(account, 100).await.version();

    refused(
        &app,
        &path("withdrawals"),
        &bytes(json!({"amount": 151, "currency": "EUR"})),
        unprocessable,
        "insufficient-funds",
    )
    .await;
    refused(
        &app,
        &path("deposits"),
        &bytes(json!({"amount": 1, "currency": "USD"})),
        unprocessable,
        "currency-mismatch",
    )
    .await;
    refused(&app, &path("close"), b"", unprocessable, "non-zero-balance").await;
    refused(
        &app,
        &path("unfreeze"),
        b"",
        unprocessable,
        "account-not-frozen",
    )
    .await;

    app.post_with(&path("freeze"), &teller, &[], None)
        .await
        .version();
    refused(
        &app,
        &path("deposits"),
        &bytes(json!({"amount": 1, "currency": "EUR"})),
        unprocessable,
        "account-frozen",
    )
    .await;
    refused(&app, &path("freeze"), b"", unprocessable, "account-frozen").await;
    app.post_with(&path("unfreeze"), &teller, &[], None)
        .await
        .version();

    app.post_with(
        &path("withdrawals"),
        &teller,
        &[],
        Some(json!({"amount": 100, "currency": "EUR"})),
    )
    .await
    .version();
    app.post_with(&path("close"), &teller, &[], None)
        .await
        .version();
    refused(
        &app,
        &path("deposits"),
        &bytes(json!({"amount": 1, "currency": "EUR"})),
        unprocessable,
        "account-closed",
    )
    .await;
    refused(&app, &path("close"), b"", unprocessable, "account-closed").await;

    let insufficient = app
        .post_with(
            &path("withdrawals"),
            &teller,
            &[],
            Some(json!({"amount": 1, "currency": "EUR"})),
        )
        .await;
    assert_eq!(insufficient.problem(), "account-closed");
}

#[tokio::test]
async fn insufficient_funds_says_what_is_available() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 20).await;
    let reply = app
        .post(
            &format!("/v1/accounts/{account}/withdrawals"),
            json!({"amount": 21, "currency": "EUR"}),
        )
        .await;
    assert_eq!(reply.problem(), "insufficient-funds");
    assert_eq!(reply.body["available"], 20);
    assert_eq!(reply.body["requested"], 21);
}

#[tokio::test]
async fn unknown_and_foreign_accounts_are_404() {
    let app = TestApp::spawn().await;
    let theirs = app.open_account(&app.token("globex", &["teller"]), 0).await;
    let body = bytes(json!({"amount": 1, "currency": "EUR"}));
    let not_found = StatusCode::NOT_FOUND;
    let missing = uuid::Uuid::new_v4();
    refused(
        &app,
        &format!("/v1/accounts/{missing}/deposits"),
        &body,
        not_found,
        "not-found",
    )
    .await;
    refused(
        &app,
        "/v1/accounts/not-a-uuid/deposits",
        &body,
        not_found,
        "not-found",
    )
    .await;
    for action in ["deposits", "withdrawals"] {
        refused(
            &app,
            &format!("/v1/accounts/{theirs}/{action}"),
            &body,
            not_found,
            "not-found",
        )
        .await;
    }
    for action in ["freeze", "unfreeze", "close"] {
        refused(
            &app,
            &format!("/v1/accounts/{theirs}/{action}"),
            b"",
            not_found,
            "not-found",
        )
        .await;
    }
    // Even a version check tells another tenant nothing.
    let reply = app
        .post_with(
            &format!("/v1/accounts/{theirs}/deposits"),
            &app.teller(),
            &[("if-match", "\"9\"")],
            Some(json!({"amount": 1, "currency": "EUR"})),
        )
        .await;
    assert_eq!(reply.problem(), "not-found");
    assert!(reply.body.get("current_version").is_none());
}

#[tokio::test]
async fn transport_errors_have_their_own_types() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let deposits = format!("/v1/accounts/{account}/deposits");
    let before = app.event_count().await;

    let huge = format!(
        r#"{{"amount":1,"currency":"EUR","pad":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    refused(
        &app,
        &deposits,
        huge.as_bytes(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
    )
    .await;

    for content_type in [None, Some("text/plain")] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .collect();
        let reply = app
            .send(
                Method::POST,
                &deposits,
                Some(&app.teller()),
                &headers,
                Some(bytes(json!({"amount": 1, "currency": "EUR"}))),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(reply.problem(), "unsupported-media-type");
    }

    for (name, value) in [
        ("if-match", "3"),
        ("if-match", "\"x\""),
        ("idempotency-key", ""),
    ] {
        let reply = app
            .post_with(
                &deposits,
                &app.teller(),
                &[(name, value)],
                Some(json!({"amount": 1, "currency": "EUR"})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{name}: {value}");
        assert_eq!(reply.problem(), "invalid-header");
    }
    let long_key = "k".repeat(256);
    let reply = app
        .post_with(
            &deposits,
            &app.teller(),
            &[("idempotency-key", &long_key)],
            Some(json!({"amount": 1, "currency": "EUR"})),
        )
        .await;
    assert_eq!(reply.problem(), "invalid-header");
    assert_eq!(app.event_count().await, before);
}

/// Every error is problem+json, routing errors included: an unknown path is a 404 problem, a
/// known path with another method a 405 problem with `Allow`.
#[tokio::test]
async fn unknown_routes_and_wrong_methods_are_problems() {
    let app = TestApp::spawn().await;
    let unknown = app
        .send(reqwest::Method::GET, "/nope", None, &[], None)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.problem(), "not-found");

    let wrong = app
        .send(
            reqwest::Method::GET,
            "/v1/accounts",
            Some(&app.teller()),
            &[],
            None,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.problem(), "method-not-allowed");
    assert_eq!(wrong.headers["allow"], "POST");

    let ops = app.ops_get("/nope").await;
    assert_eq!(ops.status, StatusCode::NOT_FOUND);
    assert_eq!(ops.problem(), "not-found");
}

/// A body declared too big is refused before it is sent: the 413 comes back while the client
/// has uploaded nothing, rather than after a broken pipe.
#[tokio::test]
async fn a_body_declared_too_big_is_refused_before_it_is_uploaded() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn().await;
    let mut socket = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n",
        app.teller()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let response = crate::helpers::problem_on(&mut socket, std::time::Duration::from_secs(2))
        .await
        .expect("no answer before the body was sent");
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("payload-too-large"), "{response}");
    assert_eq!(app.event_count().await, 0);
}
