//! The command API with an OpenID Connect provider (the certified `oidc-provider` of
//! `deploy/oidc-dev`, on loopback): not ready and refusing to guess while the provider is down
//! at start, then accepting what the provider issues and refusing what it did not.

use reqwest::StatusCode;
use serde_json::json;
use service_kit::auth::{AuthConfig, VerificationKey};
use service_kit::dev_provider::DevProvider;
use service_kit::testing::eventually;
use std::time::Duration;

use crate::helpers::TestApp;

/// A client of the provider whose tokens are for tenant `acme` with the role `teller`.
fn teller_client() -> serde_json::Value {
    json!({"clients": [{"client_id": "teller-app", "client_secret": "s3cret",
                        "tenant": "acme", "roles": ["teller"]}]})
}

#[tokio::test]
async fn a_provider_token_opens_an_account_once_the_provider_is_up_and_a_forged_one_does_not() {
    // Where the provider will listen: it is not started yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let issuer = format!("http://127.0.0.1:{port}");
    let app =
        TestApp::spawn_adjusted(|config| config.auth = AuthConfig::for_provider(&issuer)).await;
    let body = json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": 0});

    let live = app.ops_get("/health/live").await;
    assert_eq!(live.status, StatusCode::OK);
    let ready = app.ops_get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.body["detail"]
            .as_str()
            .unwrap()
            .contains("identity provider")
    );
    // A token no key can be found for yet: neither accepted nor called invalid.
    let unchecked = app
        .post_with("/v1/accounts", &app.teller(), &[], Some(body.clone()))
        .await;
    assert_eq!(unchecked.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unchecked.problem(), "service-unavailable");
    assert_eq!(app.event_count().await, 0);

    let provider = DevProvider::start(port, &teller_client()).await.unwrap();
    eventually(Duration::from_secs(15), || async {
        let ready = app.ops_get("/health/ready").await;
        match ready.status {
            StatusCode::OK => Ok(()),
            status => Err(format!("readiness {status}: {}", ready.body)),
        }
    })
    .await;
    let token = provider
        .token("teller-app", "s3cret", "teller")
        .await
        .unwrap();
    let opened = app
        .post_with("/v1/accounts", &token, &[], Some(body.clone()))
        .await;
    assert_eq!(opened.status, StatusCode::CREATED, "{}", opened.body);
    let actor: String = sqlx::query_scalar("SELECT metadata::jsonb ->> 'actor' FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(actor, "teller-app");

    // The same claims from another provider (another issuer, keys we never fetched).
    let impostor = DevProvider::start(0, &teller_client()).await.unwrap();
    let forged = impostor
        .token("teller-app", "s3cret", "teller")
        .await
        .unwrap();
    let refused = app
        .post_with("/v1/accounts", &forged, &[], Some(body))
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.problem(), "invalid-token");
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test]
async fn swagger_ui_signs_in_with_the_provider_using_pkce() {
    let issuer = "https://id.example/realms/ledger";
    let app = TestApp::spawn_adjusted(|config| {
        config.auth = AuthConfig::for_provider(issuer);
        if let VerificationKey::Oidc(oidc) = &mut config.auth.key {
            oidc.swagger_client_id = Some("ledger-swagger".into());
        }
    })
    .await;
    let document = app
        .send(reqwest::Method::GET, "/openapi.json", None, &[], None)
        .await;
    assert_eq!(
        document.body["components"]["securitySchemes"]["oidc"],
        json!({"type": "openIdConnect",
               "openIdConnectUrl": format!("{issuer}/.well-known/openid-configuration")})
    );
    let open_account = &document.body["paths"]["/v1/accounts"]["post"]["security"];
    assert_eq!(open_account, &json!([{"bearer": []}, {"oidc": ["openid"]}]));
    let initializer = reqwest::get(format!("{}/docs/swagger-initializer.js", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        initializer.contains(r#""clientId": "ledger-swagger""#),
        "{initializer}"
    );
    assert!(
        initializer.contains(r#""usePkceWithAuthorizationCodeGrant": true"#),
        "{initializer}"
    );
    let redirect = reqwest::get(format!("{}/docs/oauth2-redirect.html", app.base))
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::OK);
}
