use reqwest::{Method, StatusCode};
use serde_json::json;

use service_kit::rate_limit::RateLimit;

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

/// Forged and misissued tokens, each refused before anything is decided: 401 problem+json with
/// its type, and the log untouched.
#[tokio::test]
async fn token_attacks_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let path = format!("/v1/accounts/{account}/deposits");
    let body = serde_json::to_vec(&json!({"amount": 1, "currency": "EUR"})).unwrap();
    let before = app.event_count().await;
    let now = jsonwebtoken_now();
    let claims = |changes: serde_json::Value| {
        let mut claims = json!({"sub": "mallory", "tenant": TENANT, "roles": ["teller"],
                                "iss": "ledger", "aud": "ledger", "exp": now + 600});
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(key);
            } else {
                claims[key] = value.clone();
            }
        }
        claims
    };
    let unsigned = {
        // `alg: none`: the claims with no signature at all.
        use base64::Engine as _;
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = encode(claims(json!({})).to_string().as_bytes());
        format!("{header}.{payload}.")
    };
    let cases = [
        ("alg none", unsigned),
        (
            "not yet valid",
            sign(&claims(json!({"nbf": now + 3600})), SECRET),
        ),
        (
            "wrong issuer",
            sign(&claims(json!({"iss": "someone-else"})), SECRET),
        ),
        (
            "wrong audience",
            sign(&claims(json!({"aud": "another-api"})), SECRET),
        ),
        ("no tenant", sign(&claims(json!({"tenant": null})), SECRET)),
        ("no expiry", sign(&claims(json!({"exp": null})), SECRET)),
        (
            "malformed tenant",
            sign(&claims(json!({"tenant": "acme' OR 1=1"})), SECRET),
        ),
        (
            "wrong signature",
            sign(&claims(json!({})), "a-different-secret-of-enough-bytes-00"),
        ),
    ];
    for (attack, token) in cases {
        let reply = app
            .send(
                Method::POST,
                &path,
                Some(&token),
                &[("content-type", "application/json")],
                Some(body.clone()),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{attack}");
        assert_eq!(reply.problem(), "invalid-token", "{attack}");
        assert_eq!(
            reply.headers["content-type"], "application/problem+json",
            "{attack}"
        );
    }
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_told_when_to_retry_and_others_are_unaffected() {
    // Refilled every two seconds: the eight requests below come well within that.
    let app = TestApp::spawn_adjusted(|config| {
        config.auth.rate_limit = Some(RateLimit {
            per_second: 0.5,
            burst: std::num::NonZeroU32::new(5).unwrap(),
        });
    })
    .await;
    let account = app.open_account(&app.teller(), 0).await;
    let before = app.event_count().await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let reply = app.deposit(account, 1).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.problem(), "rate-limited");
            let retry_after: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "{retry_after}");
        }
        statuses.push(reply.status);
    }
    // The opening spent one of the five; four deposits fit, the rest are refused.
    let accepted = statuses.iter().filter(|s| s.is_success()).count();
    assert_eq!(accepted, 4, "{statuses:?}");
    assert_eq!(app.event_count().await, before + 4);
    // Another tenant has its own budget.
    let other = app.open_account(&app.token("globex", &["teller"]), 0).await;
    assert_ne!(other, account);
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
