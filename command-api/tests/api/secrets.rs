//! Secrets never reach the logs: the real binary, logging JSON at `debug`, is driven through
//! successes and failures, and its whole output is searched for every secret it was given.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use service_kit::ExposeSecret;
use service_kit::testing::{TestDatabase, eventually};
use tokio::io::AsyncReadExt;

use crate::helpers::{TENANT, token_with};

const JWT_SECRET: &str = "log-test-jwt-secret-do-not-print-0123456789";
const DB_PASSWORD: &str = "db-password-do-not-print";

#[tokio::test]
async fn the_logs_never_show_a_secret_a_token_or_a_password() {
    let database = TestDatabase::create().await;
    let (url, password) = with_password(database.config.url.expose_secret());
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, ops_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_command-api"))
        .env("DATABASE_URL", &url)
        .env("JWT_HS256_SECRET", JWT_SECRET)
        .env("COMMAND_API_ADDR", format!("127.0.0.1:{port}"))
        .env("COMMAND_API_OPS_ADDR", format!("127.0.0.1:{ops_port}"))
        .env("COMMAND_API_RELAY", "false")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{ops_port}/health/ready");
    eventually(Duration::from_secs(10), || async {
        match client.get(&ready).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("command-api not ready: {}", response.status())),
            Err(err) => Err(format!("command-api did not start: {err}")),
        }
    })
    .await;

    let token = token_with(JWT_SECRET, TENANT, &["teller"], 600);
    let forged = token_with(
        "some-other-secret-of-enough-length-000",
        TENANT,
        &["teller"],
        600,
    );
    let opened = client
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "log-test-key")
        .json(&json!({"owner": "Ada", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), StatusCode::CREATED);
    let account: serde_json::Value = opened.json().await.unwrap();
    let account = account["account_id"].as_str().unwrap().to_owned();
    let funded = client
        .post(format!("{base}/v1/accounts/{account}/deposits"))
        .bearer_auth(&token)
        .json(&json!({"amount": 10_000, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(funded.status(), StatusCode::OK);
    // Each kind of outcome once, so that each one's log lines are searched: applied, refused
    // by validation, refused by a rule, and a forged token, which must not be accepted.
    for (bearer, body, expected, problem) in [
        (
            &token,
            json!({"amount": 5, "currency": "EUR"}),
            StatusCode::OK,
            None,
        ),
        (
            &token,
            json!({"amount": 5000, "currency": "EUR"}),
            StatusCode::OK,
            None,
        ),
        (
            &token,
            json!({"amount": -1, "currency": "EUR"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("amount-out-of-range"),
        ),
        (
            &token,
            json!({"amount": 1_000_000, "currency": "EUR"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("insufficient-funds"),
        ),
        (
            &forged,
            json!({"amount": 5, "currency": "EUR"}),
            StatusCode::UNAUTHORIZED,
            Some("invalid-token"),
        ),
    ] {
        let response = client
            .post(format!("{base}/v1/accounts/{account}/withdrawals"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, expected, "{body}: {text}");
        if let Some(problem) = problem {
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                reply["type"],
                format!("urn:ledger:problem:{problem}"),
                "{text}"
            );
        }
        for secret in [
            JWT_SECRET,
            password.as_str(),
            token.as_str(),
            forged.as_str(),
        ] {
            assert!(
                !text.contains(secret),
                "a response carries a secret: {text}"
            );
        }
    }

    child.start_kill().unwrap();
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(
        logs.contains("\"response\""),
        "the test saw no request logs:\n{logs}"
    );
    for (name, secret) in [
        ("the JWT secret", JWT_SECRET),
        ("the database password", password.as_str()),
        ("a bearer token", token.as_str()),
        ("a forged token", forged.as_str()),
    ] {
        assert!(!logs.contains(secret), "{name} is in the logs");
    }
}

/// The URL with a password in it, and that password: the one it has (a password-checking
/// server), or one added (the local server trusts loopback and ignores it).
fn with_password(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user_info, host) = rest.split_once('@').expect("a user in the URL");
    match user_info.split_once(':') {
        Some((_, password)) => (url.to_owned(), password.to_owned()),
        None => (
            format!("{scheme}://{user_info}:{DB_PASSWORD}@{host}"),
            DB_PASSWORD.to_owned(),
        ),
    }
}
