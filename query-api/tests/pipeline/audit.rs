//! The auditors' API: history, state as of any point, the tenant's log, and the hash chain.

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use service_kit::testing;
use uuid::Uuid;

use crate::system::{System, TENANT, problem, token};

fn auditor() -> String {
    token(TENANT, &["auditor"])
}

/// When each version of `account` was recorded, from the store.
async fn recorded(system: &System, account: Uuid) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar("SELECT recorded_at FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(account.to_string())
        .fetch_all(&system.pool)
        .await
        .unwrap()
}

async fn state(system: &System, account: Uuid, query: &str) -> (StatusCode, Value) {
    let (status, _, body) = system
        .query(
            &format!("/v1/audit/accounts/{account}/state?{query}"),
            &auditor(),
        )
        .await;
    (status, body)
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B")
}

#[tokio::test]
async fn history_and_state_as_of_any_point_of_a_long_stream() {
    let system = System::start().await;
    let account = system.open(0).await;
    // Balance after version v (v >= 2) is the sum of 1..=v-1.
    let deposits = 220;
    for amount in 1..=deposits {
        system.move_money(account, amount).await;
    }
    let head = deposits + 1;
    let balance_at = |version: i64| (1..version).sum::<i64>();

    // The whole history, page by page, with metadata and linked hashes.
    let mut events = Vec::new();
    let mut from = Some(1);
    while let Some(version) = from {
        let (status, _, page) = system
            .query(
                &format!("/v1/audit/accounts/{account}/events?from_version={version}&limit=100"),
                &auditor(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        events.extend(page["items"].as_array().unwrap().iter().cloned());
        from = page["next_from_version"].as_i64();
    }
    assert_eq!(events.len() as i64, head);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["version"], json!(index + 1));
        assert_eq!(event["actor"], "tester");
        assert!(
            event["request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        assert!(event["correlation_id"].as_str().is_some());
        if index == 0 {
            assert_eq!(event["event_type"], "AccountOpened");
            assert_eq!(event["prev_hash"], Value::Null);
        } else {
            assert_eq!(event["event_type"], "MoneyDeposited");
            assert_eq!(event["payload"]["MoneyDeposited"]["amount"], json!(index));
            assert_eq!(event["prev_hash"], events[index - 1]["hash"]);
        }
    }

    // State as of a version.
    for version in [1, 2, 57, 200, head] {
        let (status, body) = state(&system, account, &format!("version={version}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], json!(version));
        assert_eq!(
            body["balance"],
            json!(balance_at(version)),
            "version {version}"
        );
    }
    let (status, latest) = state(&system, account, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(latest["version"], json!(head));

    // State as of an instant: at each event's exact time, and between two events.
    let times = recorded(&system, account).await;
    for version in [1, 2, 100, 150, head] {
        let at = times[version as usize - 1];
        let (status, body) = state(&system, account, &format!("at={}", instant(at))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["version"],
            json!(version),
            "at the instant of {version}"
        );
        assert_eq!(body["balance"], json!(balance_at(version)));
        if version < head {
            let next = times[version as usize];
            let between = at + (next - at) / 2;
            if between > at {
                let (_, body) = state(&system, account, &format!("at={}", instant(between))).await;
                assert_eq!(
                    body["version"],
                    json!(version),
                    "between {version} and the next"
                );
            }
        }
    }

    // Before the account existed, past its head, or asked two ways at once.
    let before = times[0] - chrono::TimeDelta::seconds(1);
    let (status, body) = state(&system, account, &format!("at={}", instant(before))).await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::NOT_FOUND, "no-state-at")
    );
    let (status, body) = state(&system, account, &format!("version={}", head + 1)).await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::NOT_FOUND, "no-state-at")
    );
    let (status, body) = state(
        &system,
        account,
        &format!("version=2&at={}", instant(before)),
    )
    .await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::BAD_REQUEST, "invalid-query")
    );
    let (status, body) = state(&system, account, "at=yesterday").await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::BAD_REQUEST, "invalid-query")
    );

    let (status, _, verified) = system
        .query(&format!("/v1/audit/accounts/{account}/verify"), &auditor())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(verified["intact"], true);
    assert_eq!(verified["events_checked"], json!(head));
    assert_eq!(
        verified["verified_head_hash"],
        events.last().unwrap()["hash"]
    );

    // The read models agree with the store once projected.
    system.projected(account, head).await;
    assert!(system.differences().await.is_empty());
}

async fn verify(system: &System, account: Uuid) -> Value {
    let (status, _, body) = system
        .query(&format!("/v1/audit/accounts/{account}/verify"), &auditor())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn tampering_in_sql_is_found_at_the_right_version() {
    let system = System::start().await;
    let mut accounts = Vec::new();
    for _ in 0..5 {
        let account = system.open(0).await;
        for amount in [10, 20, 30, 40, 50] {
            system.move_money(account, amount).await;
        }
        accounts.push(account);
    }
    let rehashed = testing::rewrite_and_rehash(
        2,
        r#"{"MoneyDeposited":{"amount":11,"currency":"EUR","balance_after":11}}"#,
    );
    let cases = [
        (
            r#"UPDATE events SET payload = '{"MoneyDeposited":{"amount":9000,"currency":"EUR","balance_after":9010}}'
                WHERE aggregate_id = $1 AND sequence = 3"#,
            3,
            "hash-mismatch",
        ),
        (
            "DELETE FROM events WHERE aggregate_id = $1 AND sequence = 4",
            4,
            "sequence-gap",
        ),
        // Versions 3 and 4 swapped.
        (
            "UPDATE events SET sequence = sequence + 100 WHERE aggregate_id = $1 AND sequence IN (3, 4);
             UPDATE events SET sequence = 107 - sequence WHERE aggregate_id = $1 AND sequence IN (103, 104)",
            3,
            "previous-hash-mismatch",
        ),
        // Version 2's hash overwritten.
        (
            "UPDATE events SET hash = sha256(hash) WHERE aggregate_id = $1 AND sequence = 2",
            2,
            "hash-mismatch",
        ),
        // Version 2 altered and its hash recomputed the way the trigger does: version 2 holds
        // up on its own, version 3 no longer links to it. (The Kafka check of `ledger-audit`
        // pins such a rewrite to version 2 itself.)
        (rehashed.as_str(), 3, "previous-hash-mismatch"),
    ];
    for (account, (statement, version, reason)) in accounts.iter().zip(cases) {
        assert_eq!(verify(&system, *account).await["intact"], true);
        testing::tamper(&system.pool, statement, &account.to_string()).await;
        let report = verify(&system, *account).await;
        assert_eq!(report["intact"], false, "{statement}");
        assert_eq!(report["first_break"]["version"], json!(version), "{report}");
        assert_eq!(report["first_break"]["reason"], reason, "{report}");
        assert!(report["first_break"]["explanation"].as_str().is_some());
    }
}

#[tokio::test]
async fn auditors_see_their_own_tenant_only_and_the_log_in_commit_order() {
    let system = System::start().await;
    let mine = system.open(0).await;
    for amount in [1, 2, 3, 4] {
        system.move_money(mine, amount).await;
    }
    let theirs = system.open_in("globex", "Grace").await;
    for amount in [5, 6] {
        system.move_money(mine, amount).await;
    }

    // Another tenant's account is not there, whatever the route; other roles get 403.
    for route in ["events", "state", "verify"] {
        let path = format!("/v1/audit/accounts/{theirs}/{route}");
        let (status, _, body) = system.query(&path, &auditor()).await;
        assert_eq!(
            (status, problem(&body)),
            (StatusCode::NOT_FOUND, "not-found"),
            "{route}"
        );
        let path = format!("/v1/audit/accounts/{mine}/{route}");
        let (status, _, body) = system.query(&path, &system.viewer()).await;
        assert_eq!(
            (status, problem(&body)),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{route}"
        );
    }
    let (status, _, _) = system
        .query(
            &format!("/v1/audit/accounts/{}/events", Uuid::new_v4()),
            &auditor(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The tenant's log, three at a time: every event of ours once, in commit order, none of
    // theirs; the cursor after the last page stays put.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let query = if after.is_empty() {
            "/v1/audit/log?limit=3".to_owned()
        } else {
            format!("/v1/audit/log?limit=3&after={after}")
        };
        let (status, _, page) = system.query(&query, &auditor()).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap().clone();
        let next = page["next_after"].as_str().unwrap().to_owned();
        if items.is_empty() {
            assert_eq!(next, after);
            break;
        }
        after = next;
        seen.extend(items);
    }
    let versions: Vec<(String, i64)> = seen
        .iter()
        .map(|e| {
            (
                e["aggregate_id"].as_str().unwrap().to_owned(),
                e["version"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, i64)> = (1..=7).map(|v| (mine.to_string(), v)).collect();
    assert_eq!(versions, expected);

    let (status, _, page) = system
        .query("/v1/audit/log", &token("globex", &["auditor"]))
        .await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["aggregate_id"], theirs.to_string());

    let (status, _, body) = system.query("/v1/audit/log?after=12", &auditor()).await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::BAD_REQUEST, "invalid-query")
    );
    let (status, _, body) = system.query("/v1/audit/log?limit=501", &auditor()).await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::BAD_REQUEST, "invalid-query")
    );
}

#[tokio::test]
async fn the_openapi_document_has_the_audit_routes_and_parameters_where_they_are_taken() {
    let system = System::start().await;
    let document: Value = system
        .client
        .get(format!("{}/openapi.json", system.queries))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/audit/accounts/{id}/events",
        "/v1/audit/accounts/{id}/state",
        "/v1/audit/accounts/{id}/verify",
        "/v1/audit/log",
    ] {
        assert!(document["paths"][path]["get"].is_object(), "{path}");
    }
    // Every parameter is where the route takes it: `{id}` in the path, the rest optional
    // query parameters.
    for (path, item) in document["paths"].as_object().unwrap() {
        for parameter in item["get"]["parameters"].as_array().into_iter().flatten() {
            let name = parameter["name"].as_str().unwrap();
            let (place, required) = if path.contains(&format!("{{{name}}}")) {
                ("path", true)
            } else {
                ("query", false)
            };
            assert_eq!(parameter["in"], place, "{path} {name}");
            assert_eq!(parameter["required"], required, "{path} {name}");
        }
    }
}
