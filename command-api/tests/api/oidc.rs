//! The command API with an OpenID Connect provider (the certified `oidc-provider` of
//! `deploy/oidc-dev`, on loopback): not ready and refusing to guess while the provider is down
//! at start, then accepting what the provider issues and refusing what it did not.

use reqwest::StatusCode;
use serde_json::json;
use service_kit::auth::{AuthConfig, VerificationKey};
use service_kit::browser::{Browser, Locator, PAGE_WAIT};
use service_kit::dev_provider::{DevProvider, ProviderSlot};
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
    let slot = ProviderSlot::reserve().unwrap();
    let app =
        TestApp::spawn_adjusted(|config| config.auth = AuthConfig::for_provider(&slot.issuer))
            .await;
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

    let provider = slot.start(&teller_client()).await.unwrap();
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

/// In Chromium, as a person does it: Swagger UI's Authorize, the provider's sign-in page, back
/// to Swagger UI with a token from the authorization code (with PKCE), then "Try it out" on
/// opening an account, which the command API accepts (201, not 401).
#[tokio::test]
async fn swagger_ui_signs_in_in_chromium_with_authorization_code_and_pkce() {
    let slot = ProviderSlot::reserve().unwrap();
    let app = TestApp::spawn_adjusted(|config| {
        config.auth = AuthConfig::for_provider(&slot.issuer);
        if let VerificationKey::Oidc(oidc) = &mut config.auth.key {
            oidc.swagger_client_id = Some("ledger-swagger".into());
        }
    })
    .await;
    // The API's redirect URI is on its own port, so the provider starts after it.
    let provider = slot
        .start(&json!({"clients": [{
            "client_id": "ledger-swagger", "public": true, "tenant": "acme", "roles": ["teller"],
            "redirect_uris": [format!("{}/docs/oauth2-redirect.html", app.base)],
        }]}))
        .await
        .unwrap();
    eventually(Duration::from_secs(15), || async {
        match app.ops_get("/health/ready").await.status {
            StatusCode::OK => Ok(()),
            status => Err(format!("readiness {status}")),
        }
    })
    .await;

    let browser = Browser::start().await;
    let page = &browser.client;
    page.goto(&format!("{}/docs/", app.base)).await.unwrap();
    let docs = page.window().await.unwrap();
    browser
        .element("button.authorize")
        .await
        .click()
        .await
        .unwrap();
    // The provider's scheme, its flow read from the discovery document: its Authorize opens
    // the provider's sign-in in a window of its own.
    browser
        .element_with_text(".auth-container", "authorization_code")
        .await
        .find(Locator::Css("button.authorize"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let sign_in = eventually(PAGE_WAIT, || async {
        let windows = page.windows().await.map_err(|err| err.to_string())?;
        windows
            .into_iter()
            .find(|window| *window != docs)
            .ok_or_else(|| "no sign-in window yet".to_owned())
    })
    .await;
    page.switch_to_window(sign_in).await.unwrap();
    // oidc-provider's development sign-in: any login, any password.
    browser
        .element("input[name=login]")
        .await
        .send_keys("ada")
        .await
        .unwrap();
    browser
        .element("input[name=password]")
        .await
        .send_keys("any")
        .await
        .unwrap();
    browser
        .element("button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    // Swagger UI's redirect page hands the code back to the docs and closes its window.
    eventually(PAGE_WAIT, || async {
        match page.windows().await {
            Ok(windows) if windows.len() == 1 => Ok(()),
            Ok(_) => Err(format!(
                "the sign-in window is still at {}, showing {:?}",
                page.current_url()
                    .await
                    .map_or_else(|err| err.to_string(), String::from),
                browser.text("body").await,
            )),
            Err(err) => Err(err.to_string()),
        }
    })
    .await;
    page.switch_to_window(docs).await.unwrap();
    browser
        .element_with_text(".auth-container button", "Logout")
        .await;
    browser
        .element("button.btn-done")
        .await
        .click()
        .await
        .unwrap();

    let operation = "#operations-accounts-open_account";
    browser
        .element(&format!("{operation} .opblock-summary-control"))
        .await
        .click()
        .await
        .unwrap();
    browser
        .element(&format!("{operation} .try-out__btn"))
        .await
        .click()
        .await
        .unwrap();
    browser
        .element(&format!("{operation} .execute"))
        .await
        .click()
        .await
        .unwrap();
    let status = browser
        .until(
            "the response's status",
            &format!(
                "const cell = document.querySelector(
                     '{operation} .live-responses-table tr.response .response-col_status');
                 return cell && cell.textContent.trim();"
            ),
        )
        .await;
    assert_eq!(status, "201", "opening an account with the signed-in token");
    let actor: String = sqlx::query_scalar("SELECT metadata::jsonb ->> 'actor' FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(actor, "ada", "the person who signed in");

    let asked = provider.authorizations().await.unwrap();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].client_id.as_deref(), Some("ledger-swagger"));
    assert_eq!(asked[0].response_type.as_deref(), Some("code"));
    assert_eq!(asked[0].code_challenge_method.as_deref(), Some("S256"));
    assert!(asked[0].has_code_challenge);
    browser.close().await;
}
