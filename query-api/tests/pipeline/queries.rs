use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::system::{System, TENANT, problem, token};

#[tokio::test]
async fn accounts_page_by_id_within_the_tenant() {
    let system = System::start().await;
    let mut mine = Vec::new();
    for _ in 0..7 {
        mine.push(system.open(0).await);
    }
    let theirs = system.open_in("globex", "Ada").await;
    let frozen = mine[3];
    let (_, body) = system
        .command(&format!("/v1/accounts/{frozen}/freeze"), None, &[])
        .await;
    system
        .account_at(frozen, body["version"].as_i64().unwrap())
        .await;
    for account in &mine {
        system.account_at(*account, 1).await;
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/accounts?limit=3".to_owned(),
            Some(cursor) => format!("/v1/accounts?limit=3&cursor={cursor}"),
        };
        let (status, _, body) = system.query(&path, &system.viewer()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages += 1;
        for item in body["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = mine.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "every account once, in id order, none of another tenant"
    );
    assert!(!seen.contains(&theirs.to_string()));

    let (_, _, body) = system
        .query("/v1/accounts?status=frozen", &system.viewer())
        .await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], frozen.to_string().as_str());
    let (_, _, body) = system
        .query("/v1/accounts?owner=Nobody", &system.viewer())
        .await;
    assert!(body["items"].as_array().unwrap().is_empty());

    // Another tenant's account is not found, by id or by its entries.
    for path in [
        format!("/v1/accounts/{theirs}"),
        format!("/v1/accounts/{theirs}/entries"),
    ] {
        let (status, _, body) = system.query(&path, &system.viewer()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(problem(&body), "not-found");
    }
}

#[tokio::test]
async fn entries_page_and_accounts_carry_etags() {
    let system = System::start().await;
    let account = system.open(0).await;
    let mut version = 1;
    for amount in 1..=5 {
        version = system.move_money(account, amount).await;
    }
    system.account_at(account, version).await;
    let (_, _, first) = system
        .query(
            &format!("/v1/accounts/{account}/entries?limit=2"),
            &system.viewer(),
        )
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, _, second) = system
        .query(
            &format!("/v1/accounts/{account}/entries?limit=2&cursor={cursor}"),
            &system.viewer(),
        )
        .await;
    let versions: Vec<i64> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3, 4, 5]);

    let (status, headers, _) = system
        .query(&format!("/v1/accounts/{account}"), &system.viewer())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["etag"], "\"6\"");
    // Weak comparison (RFC 9110): a weak tag, or a list naming the version, matches too.
    for tag in ["\"6\"", "W/\"6\"", "\"5\", W/\"6\"", "*"] {
        let response = system
            .client
            .get(format!("{}/v1/accounts/{account}", system.queries))
            .bearer_auth(system.viewer())
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{tag}");
        assert_eq!(response.headers()["etag"], "\"6\"");
    }
    let changed = system
        .client
        .get(format!("{}/v1/accounts/{account}", system.queries))
        .bearer_auth(system.viewer())
        .header("if-none-match", "W/\"5\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_version_not_reached_in_time_is_503_with_retry_after() {
    let mut system = System::start_with_wait(Duration::from_millis(300)).await;
    let account = system.open(0).await;
    system.projected(account, 1).await;
    let started = std::time::Instant::now();
    let (status, headers, body) = system
        .query(
            &format!("/v1/accounts/{account}?min_version=99"),
            &system.viewer(),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem(&body), "not-yet-visible");
    assert!(headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(3));
    // An account the event store does not hold for this tenant is 404 at once: a mistyped id
    // (or another tenant's) is never told to retry.
    let theirs = system.open_in("globex", "Bo").await;
    for id in [uuid::Uuid::new_v4(), theirs] {
        let started = std::time::Instant::now();
        let (status, _, body) = system
            .query(
                &format!("/v1/accounts/{id}?min_version=1"),
                &system.viewer(),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(problem(&body), "not-found");
        assert!(started.elapsed() < Duration::from_millis(300));
    }
    // Stored but not projected yet: on its way, so a wait, then 503.
    system.kill_projector().await;
    let pending = system.open(0).await;
    let (status, _, body) = system
        .query(
            &format!("/v1/accounts/{pending}?min_version=1"),
            &system.viewer(),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn bad_queries_and_bad_callers_get_problems() {
    let system = System::start().await;
    let account = system.open(0).await;
    for path in [
        "/v1/accounts?limit=0".to_owned(),
        "/v1/accounts?limit=501".to_owned(),
        "/v1/accounts?limit=ten".to_owned(),
        "/v1/accounts?status=sleeping".to_owned(),
        "/v1/accounts?cursor=zz".to_owned(),
        "/v1/accounts?colour=blue".to_owned(),
        format!("/v1/accounts/{account}?min_version=x"),
        format!("/v1/accounts/{account}/entries?cursor=00"),
    ] {
        let (status, headers, body) = system.query(&path, &system.viewer()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(problem(&body), "invalid-query", "{path}");
        assert_eq!(headers["content-type"], "application/problem+json");
    }
    let (status, _, body) = system
        .query("/v1/accounts/not-a-uuid", &system.viewer())
        .await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::NOT_FOUND, "not-found")
    );

    let (status, _, _) = system
        .query("/v1/accounts", &token(TENANT, &["teller"]))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = system
        .query("/v1/accounts", &token(TENANT, &["auditor"]))
        .await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let (status, _, body) = system.query("/v1/accounts", "nonsense").await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::UNAUTHORIZED, "invalid-token")
    );

    let doc: Value = system
        .client
        .get(format!("{}/openapi.json", system.queries))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/accounts",
        "/v1/accounts/{id}",
        "/v1/accounts/{id}/entries",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
        assert!(
            doc["paths"][path]["get"]["responses"]["429"]["headers"]["Retry-After"].is_object(),
            "{path} documents no 429 with Retry-After"
        );
    }
}

/// The command API's `Location` (201) is followed as it is, to the query API.
#[tokio::test]
async fn the_location_of_a_new_account_is_followed_to_the_query_api() {
    let system = System::start().await;
    let opened = system
        .client
        .post(format!("{}/v1/accounts", system.commands))
        .bearer_auth(crate::system::token(crate::system::TENANT, &["teller"]))
        .json(&serde_json::json!({"owner": "Ada", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), StatusCode::CREATED);
    let location = opened.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&system.queries), "{location}");
    let followed = system
        .client
        .get(format!("{location}?min_version=1"))
        .bearer_auth(system.viewer())
        .send()
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
}

/// A `min_version` wait longer than the request timeout would be cut short by a 503 `timeout`:
/// such a configuration does not start.
#[tokio::test]
async fn a_wait_longer_than_the_request_timeout_is_refused_at_start_up() {
    let database = service_kit::testing::TestDatabase::create().await;
    let built = query_api::Application::build(query_api::Config {
        max_wait: service_kit::server::HTTP_REQUEST_TIMEOUT.default,
        ..query_api::Config::for_tests(
            database.config_as(service_kit::db::ServiceRole::TenantReader),
            service_kit::testing::auth(),
        )
    })
    .await;
    let err = built
        .err()
        .expect("started with max_wait = request_timeout");
    assert!(err.to_string().contains("QUERY_API_MAX_WAIT_MS"), "{err}");
}
