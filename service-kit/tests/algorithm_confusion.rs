//! A production deployment verifies RS256 with a public key. The classic attack signs an HS256
//! token using that public key (which is public) as the HMAC secret; a verifier that lets the
//! token choose its algorithm accepts it. Ours fixes the algorithm per deployment.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use service_kit::auth::{AuthConfig, AuthError, Authenticator, ClaimMapping, VerificationKey};

/// Test-only key pair, generated for these tests; never used anywhere else.
const PRIVATE_PEM: &str = include_str!("fixtures/test-rsa-private.pem");
const PUBLIC_PEM: &str = include_str!("fixtures/test-rsa-public.pem");

fn rs256_authenticator() -> Authenticator {
    Authenticator::new(&AuthConfig {
        issuer: "ledger".into(),
        audience: "ledger".into(),
        key: VerificationKey::PublicKey {
            algorithm: Algorithm::RS256,
            pem: PUBLIC_PEM.into(),
        },
        claims: ClaimMapping::default(),
        rate_limit: None,
    })
    .unwrap()
}

fn claims() -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"sub": "mallory", "tenant": "acme", "roles": ["teller"], "iss": "ledger",
           "aud": "ledger", "exp": now + 600})
}

#[tokio::test]
async fn a_genuine_rs256_token_is_accepted() {
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(),
        &EncodingKey::from_rsa_pem(PRIVATE_PEM.as_bytes()).unwrap(),
    )
    .unwrap();
    let principal = rs256_authenticator().verify(&token).await.unwrap();
    assert_eq!(principal.tenant, "acme");
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_public_key_is_refused() {
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(PUBLIC_PEM.as_bytes()),
    )
    .unwrap();
    let refused = rs256_authenticator().verify(&forged).await.unwrap_err();
    assert!(matches!(refused, AuthError::InvalidToken(_)), "{refused:?}");
    let response = refused.into_response();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn a_token_in_any_other_algorithm_is_refused() {
    let other = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &claims(),
        &EncodingKey::from_secret(b"whatever-secret-the-attacker-likes-000"),
    )
    .unwrap();
    assert!(matches!(
        rs256_authenticator().verify(&other).await,
        Err(AuthError::InvalidToken(_))
    ));
}
