use std::time::Duration;

use axum::http::HeaderValue;
use command_api::relay::RelayConfig;
use reqwest::{Method, StatusCode};
use service_kit::kafka::KafkaConfig;
use service_kit::testing::eventually;

use crate::helpers::TestApp;

#[tokio::test]
async fn health_probes_answer() {
    let app = TestApp::spawn().await;
    let live = app.ops_get("/health/live").await;
    assert_eq!(live.status, StatusCode::OK);
    let ready = app.ops_get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["database"], "ok");
}

/// The relay needs the broker; the API does not. So a missing broker shows in the probe's body
/// (and the relay's logs) while the API stays in service, accepting commands for later.
#[tokio::test]
async fn readiness_reports_a_missing_broker_without_leaving_service() {
    let app = TestApp::spawn_adjusted(|config| {
        // Nothing listens on port 1.
        config.relay = Some(RelayConfig::for_tests(KafkaConfig::with_brokers(
            "127.0.0.1:1",
        )));
    })
    .await;
    let ready = app.ops_get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["database"], "ok");
    assert_eq!(ready.body["broker"], "unreachable");
    let account = app.open_account(&app.teller(), 0).await;
    assert_eq!(app.deposit(account, 5).await.version(), 2);
}

/// `/metrics` is Prometheus text with the series the dashboards and alerts use: requests by
/// route template (never the raw path), commands by outcome, the pool.
#[tokio::test]
async fn metrics_count_requests_and_commands() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    assert_eq!(app.deposit(account, 5).await.version(), 2);
    let refused = app
        .post(
            &format!("/v1/accounts/{account}/withdrawals"),
            serde_json::json!({"amount": 50, "currency": "EUR"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);

    let response = reqwest::get(format!("{}/metrics", app.ops)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let line_of = |name: &str, labels: &[&str]| {
        text.lines()
            .find(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
    };
    let series = |name: &str, labels: &[&str]| line_of(name, labels).is_some();
    assert!(
        series(
            "http_requests_total",
            &[
                r#"route="/v1/accounts/{id}/deposits""#,
                r#"status="200""#,
                r#"method="POST""#
            ]
        ),
        "{text}"
    );
    assert!(
        series(
            "http_request_duration_seconds_bucket",
            &[r#"route="/v1/accounts""#, r#"status="201""#]
        ),
        "{text}"
    );
    assert!(
        series(
            "ledger_commands_total",
            &[r#"command="deposit""#, r#"outcome="accepted""#]
        ),
        "{text}"
    );
    assert!(
        series(
            "ledger_commands_total",
            &[r#"command="withdraw""#, r#"outcome="rejected""#]
        ),
        "{text}"
    );
    assert!(
        series("ledger_append_batch_events_bucket", &[r#"le="1""#]),
        "{text}"
    );
    for state in ["idle", "in_use"] {
        assert!(
            series(
                "ledger_db_pool_connections",
                &[&format!(r#"state="{state}""#)]
            ),
            "{text}"
        );
    }
    // The append writer keeps its connection once it has written (before it answers).
    let kept_idle: f64 = line_of("ledger_db_pool_connections{", &[r#"state="kept_idle""#])
        .and_then(|line| line.split_whitespace().last())
        .unwrap_or_else(|| panic!("no kept_idle gauge in {text}"))
        .parse()
        .unwrap();
    assert!(kept_idle >= 1.0, "{text}");
    assert!(series("ledger_db_pool_max_connections", &[]), "{text}");
    assert!(
        !text.contains(&account.to_string()),
        "a raw path leaked into a label"
    );
}

/// Every operation of the OpenAPI document, which the code generates: a command added there is
/// checked here without this test naming it. Each documents the problems every command can
/// meet, and each is served where the document says (a request without a token is refused
/// for that, not for an unknown route).
#[tokio::test]
async fn the_openapi_document_describes_every_command() {
    let app = TestApp::spawn().await;
    let doc = app
        .send(Method::GET, "/openapi.json", None, &[], None)
        .await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc.body["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let Ok(method) = Method::from_bytes(method.to_uppercase().as_bytes()) else {
                continue;
            };
            operations += 1;
            let name = format!("{method} {path}");
            let responses = &operation["responses"];
            for status in ["400", "401", "403", "413", "415", "422", "503"] {
                assert_eq!(
                    responses[status]["content"]
                        .as_object()
                        .map(|content| content.contains_key("application/problem+json")),
                    Some(true),
                    "{name} documents no {status} problem"
                );
            }
            assert!(
                responses["429"]["headers"]["Retry-After"].is_object(),
                "{name} documents no 429 with Retry-After"
            );
            let security = operation["security"]
                .as_array()
                .or(doc.body["security"].as_array());
            assert!(
                security.is_some_and(|security| security.iter().any(|s| s.get("bearer").is_some())),
                "{name} is not documented as needing a bearer token"
            );
            let concrete = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
            let served = app.send(method.clone(), &concrete, None, &[], None).await;
            assert_eq!(
                (served.status, served.problem()),
                (StatusCode::UNAUTHORIZED, "missing-token"),
                "{name} is documented but not served"
            );
        }
    }
    assert!(operations > 1, "{}", doc.body);
    assert_eq!(
        doc.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let ui = app.send(Method::GET, "/docs/", None, &[], None).await;
    assert_eq!(ui.status, StatusCode::OK);
}

#[tokio::test]
async fn a_database_outage_is_503_not_a_hang_and_recovers() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let name = app
        .pool
        .connect_options()
        .get_database()
        .unwrap()
        .to_owned();
    let admin = service_kit::db::connect(&app.owner.with_database("postgres").unwrap())
        .await
        .unwrap();
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    // A fresh account id: nothing cached, so the command must reach the database.
    let missing = uuid::Uuid::new_v4();
    for path in [
        format!("/v1/accounts/{account}/deposits"),
        format!("/v1/accounts/{missing}/deposits"),
    ] {
        let reply = app
            .post(&path, serde_json::json!({"amount": 1, "currency": "EUR"}))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.body
        );
        assert_eq!(reply.problem(), "service-unavailable");
        assert!(reply.headers.contains_key("retry-after"));
    }
    let ready = app.ops_get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < std::time::Duration::from_secs(15));

    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    assert_eq!(app.deposit(account, 1).await.version(), 2);
    // Readiness verdicts are reused for a second, so probes see the recovery within one.
    eventually(Duration::from_secs(3), || async {
        match app.ops_get("/health/ready").await {
            ready if ready.status == StatusCode::OK => Ok(()),
            ready => Err(format!("still {} {}", ready.status, ready.body)),
        }
    })
    .await;
}

/// Browsers may call from the configured origins only; with none configured (the default)
/// no CORS header is ever sent, so every cross-origin call stays closed.
#[tokio::test]
async fn cross_origin_calls_are_closed_unless_an_origin_is_allowed() {
    let allowed = "https://app.example.com";
    let open = TestApp::spawn_adjusted(|config| {
        config.cors_origins = vec![HeaderValue::from_static(allowed)];
    })
    .await;
    let closed = TestApp::spawn().await;
    let preflight = |base: &str, origin: &str| {
        reqwest::Client::new()
            .request(Method::OPTIONS, format!("{base}/v1/accounts"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
    };
    let granted = preflight(&open.base, allowed).await.unwrap();
    assert_eq!(granted.headers()["access-control-allow-origin"], allowed);
    let methods = granted.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    for (app, origin) in [(&open, "https://evil.example.com"), (&closed, allowed)] {
        let refused = preflight(&app.base, origin).await.unwrap();
        assert!(
            refused
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{origin} was allowed"
        );
    }
}
