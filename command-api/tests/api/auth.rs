use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{SECRET, TENANT, TestApp, token_with};

#[tokio::test]
async fn tokens_are_checked_before_anything_else() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let path = format!("/v1/accounts/{account}/deposits");
    let body = serde_json::to_vec(&json!({"amount": 1, "currency": "EUR"})).unwrap();
    let before = app.event_count().await;

    let expired = {
        // Signed correctly, but its `exp` is an hour ago.
        let now = jsonwebtoken_now();
        let claims = json!({"sub": "x", "tenant": TENANT, "roles": ["teller"], "iss": "ledger", "aud": "ledger", "exp": now - 3600});
        sign(&claims, SECRET)
    };
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing-token"),
        (Some("not-a-jwt".into()), "invalid-token"),
        (
            Some(token_with(
                "another-secret-of-enough-length-000000",
                TENANT,
                &["teller"],
                60,
            )),
            "invalid-token",
        ),
        (Some(expired), "expired-token"),
    ];
    for (token, problem) in cases {
        let reply = app
            .send(
                Method::POST,
                &path,
                token.as_deref(),
                &[("content-type", "application/json")],
                Some(body.clone()),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{problem}");
        assert_eq!(reply.problem(), problem);
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
    }
    // A malformed body does not reveal anything before authentication.
    let reply = app
        .send(
            Method::POST,
            &path,
            None,
            &[("content-type", "application/json")],
            Some(b"{".to_vec()),
        )
        .await;
    assert_eq!(reply.problem(), "missing-token");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn commands_need_the_teller_role() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let before = app.event_count().await;
    for roles in [&["viewer"][..], &["auditor", "admin"], &[], &["Teller"]] {
        let token = app.token(TENANT, roles);
        let reply = app
            .post_with(
                &format!("/v1/accounts/{account}/deposits"),
                &token,
                &[],
                Some(json!({"amount": 1, "currency": "EUR"})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{roles:?}");
        assert_eq!(reply.problem(), "forbidden");
        let reply = app
            .post_with(
                "/v1/accounts",
                &token,
                &[],
                Some(json!({"owner": "x", "currency": "EUR"})),
            )
            .await;
        assert_eq!(reply.problem(), "forbidden");
    }
    assert_eq!(app.event_count().await, before);
}

fn jsonwebtoken_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 JWT over arbitrary claims, so tests can forge any claim set.
fn sign(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
