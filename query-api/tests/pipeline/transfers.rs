//! Transfers end to end: the command API takes them, the process manager drives them through
//! the accounts, the projector shows them. Every path, then conservation under chaos.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use service_kit::db::ServiceRole;
use service_kit::testing;
use uuid::Uuid;

use crate::system::{System, TENANT, problem, token};
use test_system::eventually;

/// Opens an account in `currency` holding `balance`.
pub(crate) async fn funded(system: &System, currency: &str, balance: i64) -> Uuid {
    let (status, body) = system
        .command(
            "/v1/accounts",
            Some(json!({"owner": "Ada", "currency": currency})),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: Uuid = body["account_id"].as_str().unwrap().parse().unwrap();
    if balance > 0 {
        let (status, body) = system
            .command(
                &format!("/v1/accounts/{id}/deposits"),
                Some(json!({"amount": balance, "currency": currency})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    id
}

pub(crate) async fn transfer(
    system: &System,
    from: Uuid,
    to: Uuid,
    amount: i64,
    currency: &str,
) -> Uuid {
    let (status, body) = system
        .command(
            "/v1/transfers",
            Some(
                json!({"from_account": from, "to_account": to, "amount": amount,
                        "currency": currency, "reference": "test"}),
            ),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Absolute, on the query API: a client follows it as it is.
    assert_eq!(
        body["status_url"],
        format!(
            "{}/v1/transfers/{}",
            system.queries,
            body["transfer_id"].as_str().unwrap()
        )
    );
    body["transfer_id"].as_str().unwrap().parse().unwrap()
}

/// The transfer as the query API shows it once final (within 30 s).
pub(crate) async fn settled(system: &System, id: Uuid) -> Value {
    eventually(Duration::from_secs(30), || async move {
        let (status, headers, body) = system
            .query(&format!("/v1/transfers/{id}"), &system.viewer())
            .await;
        if status == StatusCode::OK
            && matches!(
                body["status"].as_str(),
                Some("completed" | "rejected" | "failed")
            )
        {
            // A transfer carries its version as `ETag`, as an account does.
            assert_eq!(headers["etag"], format!("\"{}\"", body["version"]));
            return Ok(body);
        }
        Err(format!("transfer {id} did not settle: {status} {body}"))
    })
    .await
}

async fn balance(system: &System, account: Uuid) -> i64 {
    let (status, _, body) = system
        .query(&format!("/v1/accounts/{account}"), &system.viewer())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["balance"].as_i64().unwrap()
}

async fn post(system: &System, path: &str) {
    let (status, body) = system.command(path, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
}

#[tokio::test]
async fn every_path_ends_completed_rejected_or_refunded() {
    let system = System::start().await;
    let rich = funded(&system, "EUR", 1000).await;
    let payee = funded(&system, "EUR", 0).await;
    let frozen = funded(&system, "EUR", 500).await;
    post(&system, &format!("/v1/accounts/{frozen}/freeze")).await;
    let closed = funded(&system, "EUR", 0).await;
    post(&system, &format!("/v1/accounts/{closed}/close")).await;
    let dollars = funded(&system, "USD", 500).await;
    let frozen_payee = funded(&system, "EUR", 0).await;
    post(&system, &format!("/v1/accounts/{frozen_payee}/freeze")).await;

    let cases = [
        (rich, payee, 300, "EUR", "completed", None),
        (
            rich,
            payee,
            10_000,
            "EUR",
            "rejected",
            Some("insufficient_funds"),
        ),
        (frozen, payee, 10, "EUR", "rejected", Some("frozen")),
        (closed, payee, 10, "EUR", "rejected", Some("closed")),
        (rich, frozen_payee, 100, "EUR", "failed", Some("frozen")),
        (rich, closed, 100, "EUR", "failed", Some("closed")),
    ];
    let mut transfers = Vec::new();
    for (from, to, amount, currency, _, _) in cases {
        transfers.push(transfer(&system, from, to, amount, currency).await);
    }
    for (id, (from, to, amount, _, status, reason)) in transfers.iter().zip(cases) {
        let view = settled(&system, *id).await;
        assert_eq!(view["status"], status, "{view}");
        assert_eq!(view["reference"], "test", "{view}");
        assert_eq!(view["reason"].as_str(), reason, "{view}");
        assert_eq!(
            (
                view["from_account"].as_str(),
                view["to_account"].as_str(),
                view["amount"].as_i64()
            ),
            (
                Some(from.to_string().as_str()),
                Some(to.to_string().as_str()),
                Some(amount)
            ),
        );
    }
    system.converged(Duration::from_secs(30)).await;
    // Only the first transfer moved money; the failed ones were refunded.
    assert_eq!(balance(&system, rich).await, 700);
    assert_eq!(balance(&system, payee).await, 300);
    assert_eq!(balance(&system, dollars).await, 500);
    assert_eq!(balance(&system, frozen_payee).await, 0);

    // The source's statement shows the debit, and the refunds of the failed transfers.
    let (_, _, entries) = system
        .query(&format!("/v1/accounts/{rich}/entries"), &system.viewer())
        .await;
    let kinds: Vec<(&str, Option<&str>)> = entries["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["transfer_id"].as_str()))
        .collect();
    let id = |i: usize| Some(transfers[i].to_string());
    assert_eq!(kinds.len(), 6, "{entries}");
    assert_eq!(kinds[0].0, "deposit");
    for (kind, transfer) in &kinds[1..] {
        assert!(
            matches!(*kind, "transfer_debit" | "transfer_refund"),
            "{kind}"
        );
        assert!([id(0), id(4), id(5)].contains(&transfer.map(str::to_owned)));
    }
    let (_, _, listed) = system
        .query(
            &format!("/v1/accounts/{payee}/transfers?limit=3"),
            &system.viewer(),
        )
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    assert!(listed["next_cursor"].is_string());

    // Without a reference, the transfer shows `null`, not an empty string.
    let (status, body) = system
        .command(
            "/v1/transfers",
            Some(
                json!({"from_account": rich, "to_account": payee, "amount": 1, "currency": "EUR"}),
            ),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let view = settled(
        &system,
        body["transfer_id"].as_str().unwrap().parse().unwrap(),
    )
    .await;
    assert!(view["reference"].is_null(), "{view}");
}

#[tokio::test]
async fn bad_transfers_are_refused_up_front_and_retries_are_idempotent() {
    let system = System::start().await;
    let from = funded(&system, "EUR", 100).await;
    let to = funded(&system, "EUR", 0).await;
    let request = |from: Uuid, to: Uuid| json!({"from_account": from, "to_account": to, "amount": 10, "currency": "EUR"});

    let (status, body) = system
        .command("/v1/transfers", Some(request(from, from)), &[])
        .await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "same-account")
    );

    // Another tenant's account is as absent as a missing one, on either side.
    let theirs = system.open_in("globex", "Grace").await;
    for (a, b) in [(from, theirs), (theirs, to), (from, Uuid::new_v4())] {
        let (status, body) = system
            .command("/v1/transfers", Some(request(a, b)), &[])
            .await;
        assert_eq!(
            (status, problem(&body)),
            (StatusCode::NOT_FOUND, "not-found"),
            "{body}"
        );
    }
    // A currency either account does not hold: refused now, not after a debit and a refund.
    let dollars = funded(&system, "USD", 100).await;
    for (body, expected) in [
        (
            json!({"from_account": from, "to_account": to, "amount": 1, "currency": "USD"}),
            "currency-mismatch",
        ),
        (
            json!({"from_account": from, "to_account": dollars, "amount": 1, "currency": "EUR"}),
            "currency-mismatch",
        ),
        (
            json!({"from_account": dollars, "to_account": to, "amount": 1, "currency": "USD"}),
            "currency-mismatch",
        ),
        (
            json!({"from_account": from, "to_account": to, "amount": 0, "currency": "EUR"}),
            "amount-out-of-range",
        ),
        (
            json!({"from_account": from, "to_account": to, "amount": 1, "currency": "XXX"}),
            "unsupported-currency",
        ),
        (
            json!({"from_account": from, "to_account": to, "amount": 1, "currency": "EUR", "reference": "x".repeat(141)}),
            "invalid-reference",
        ),
    ] {
        let (status, reply) = system.command("/v1/transfers", Some(body), &[]).await;
        assert_eq!(
            (status, problem(&reply)),
            (StatusCode::UNPROCESSABLE_ENTITY, expected)
        );
    }
    let (status, body) = system
        .command(
            "/v1/transfers",
            Some(json!({"from_account": "nope", "to_account": to, "amount": 1, "currency": "EUR"})),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let requested: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'transfer'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(requested, 0, "a refused request appends nothing");

    // The same key and body: one transfer, the same answer.
    let key = [("Idempotency-Key", "transfer-1")];
    let (first_status, first) = system
        .command("/v1/transfers", Some(request(from, to)), &key)
        .await;
    let (again_status, again) = system
        .command("/v1/transfers", Some(request(from, to)), &key)
        .await;
    assert_eq!(
        (first_status, again_status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(first["transfer_id"], again["transfer_id"]);
    let (status, body) = system
        .command(
            "/v1/transfers",
            Some(json!({"from_account": from, "to_account": to, "amount": 11, "currency": "EUR"})),
            &key,
        )
        .await;
    assert_eq!(
        (status, problem(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused")
    );
    let id: Uuid = first["transfer_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(settled(&system, id).await["status"], "completed");
    let requested: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'transfer' AND event_type = 'TransferRequested'",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(requested, 1);

    // Another tenant cannot see it.
    let (status, _, _) = system
        .query(
            &format!("/v1/transfers/{id}"),
            &token("globex", &["viewer"]),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = system
        .query(
            &format!("/v1/accounts/{from}/transfers"),
            &token("globex", &["viewer"]),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn money_is_conserved_while_every_process_is_killed_and_restarted() {
    const ACCOUNTS: usize = 100;
    const TRANSFERS: usize = 5000;
    const CLIENTS: usize = 8;
    const INITIAL: i64 = 10_000;
    let mut system = System::start().await;
    let mut accounts = Vec::with_capacity(ACCOUNTS);
    for _ in 0..ACCOUNTS {
        accounts.push(funded(&system, "EUR", INITIAL).await);
    }
    // A few accounts frozen along the way exercise rejections and refunds.
    let frozen: Vec<Uuid> = accounts.iter().step_by(25).copied().collect();

    let load = {
        let base = system.commands.clone();
        let client = system.client.clone();
        let accounts = accounts.clone();
        tokio::spawn(async move {
            let teller = token(TENANT, &["teller"]);
            let per_client = TRANSFERS / CLIENTS;
            let clients = (0..CLIENTS).map(|client_no| {
                let (base, client, accounts, teller) =
                    (base.clone(), client.clone(), accounts.clone(), teller.clone());
                async move {
                    // A deterministic spread of pairs and amounts.
                    let mut seed = client_no as u64 * 7919 + 1;
                    let mut next = |below: u64| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (seed >> 33) % below
                    };
                    let mut accepted = 0;
                    for _ in 0..per_client {
                        let from = accounts[next(ACCOUNTS as u64) as usize];
                        let mut to = accounts[next(ACCOUNTS as u64) as usize];
                        if to == from {
                            to = accounts[(accounts.iter().position(|a| *a == from).unwrap() + 1) % ACCOUNTS];
                        }
                        let amount = 1 + next(3000) as i64;
                        // While the manager is down the transfers pile up to the command API's
                        // limit; a refused request recorded nothing, and is sent again after
                        // the wait it was told, as a client does.
                        loop {
                            let response = client
                                .post(format!("{base}/v1/transfers"))
                                .bearer_auth(&teller)
                                .json(&json!({"from_account": from, "to_account": to, "amount": amount, "currency": "EUR"}))
                                .send()
                                .await
                                .unwrap();
                            if response.status() != StatusCode::SERVICE_UNAVAILABLE {
                                assert_eq!(response.status(), StatusCode::ACCEPTED);
                                break;
                            }
                            let wait = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                            let body: Value = response.json().await.unwrap();
                            assert_eq!(problem(&body), "overloaded", "{body}");
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                        }
                        accepted += 1;
                    }
                    accepted
                }
            });
            futures::future::join_all(clients)
                .await
                .into_iter()
                .sum::<usize>()
        })
    };

    // Chaos: every background process is killed mid-stream and restarted, several times;
    // each kill checks that it hit while the process had work in hand.
    for round in 0..3 {
        let transfers = system.kill_process_manager_mid_stream().await;
        if round == 1 {
            for account in &frozen {
                post(&system, &format!("/v1/accounts/{account}/freeze")).await;
            }
        }
        system.start_process_manager().await;
        let events = system.kill_relay_mid_stream().await;
        system.start_relay().await;
        let messages = system.kill_projector_mid_stream().await;
        system.start_projector().await;
        eprintln!(
            "killed the process manager with {transfers} transfers unsettled, the relay with \
             {events} events to publish, the projector with {messages} to apply"
        );
    }
    assert_eq!(load.await.unwrap(), TRANSFERS);

    // Every transfer ends completed, rejected, or failed and refunded.
    let pool = &system.pool;
    eventually(Duration::from_secs(120), || async move {
        let unsettled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                 SELECT aggregate_id FROM events WHERE aggregate_type = 'transfer'
                  GROUP BY aggregate_id
                 HAVING bool_and(event_type NOT IN ('TransferCompleted', 'TransferRejected', 'TransferFailed'))
             ) AS open",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        match unsettled {
            0 => Ok(()),
            _ => Err(format!("{unsettled} transfers still in flight")),
        }
    })
    .await;
    let outcomes: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT event_type, count(*) FROM events
          WHERE aggregate_type = 'transfer'
            AND event_type IN ('TransferRequested', 'TransferCompleted', 'TransferRejected', 'TransferFailed', 'SourceRefunded')
          GROUP BY event_type",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let count = |name: &str| outcomes.get(name).copied().unwrap_or(0);
    assert_eq!(count("TransferRequested"), TRANSFERS as i64);
    assert_eq!(
        count("TransferCompleted") + count("TransferRejected") + count("TransferFailed"),
        TRANSFERS as i64
    );
    assert_eq!(count("SourceRefunded"), count("TransferFailed"));
    assert!(
        count("TransferCompleted") > 0 && count("TransferRejected") > 0,
        "{outcomes:?}"
    );

    // No step was taken twice on any account.
    let repeated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT aggregate_id, event_type, (payload::jsonb -> event_type ->> 'transfer_id') AS transfer
               FROM events
              WHERE aggregate_type = 'account' AND event_type LIKE 'Transfer%'
              GROUP BY 1, 2, 3 HAVING count(*) > 1
         ) AS twice",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(repeated, 0);

    // Money is conserved and no balance ever went below zero (no overdrafts here).
    let (total, lowest): (i64, i64) = sqlx::query_as(
        "SELECT sum(last)::int8, min(lowest)::int8 FROM (
             SELECT (array_agg((payload::jsonb -> event_type ->> 'balance_after')::int8 ORDER BY sequence DESC))[1] AS last,
                    min((payload::jsonb -> event_type ->> 'balance_after')::int8) AS lowest
               FROM events
              WHERE aggregate_type = 'account' AND payload::jsonb -> event_type ? 'balance_after'
              GROUP BY aggregate_id
         ) AS balances",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(total, ACCOUNTS as i64 * INITIAL);
    assert!(lowest >= 0, "a balance went to {lowest}");

    // The read models equal a fold of the event store.
    system.converged(Duration::from_secs(120)).await;
    let (status, _, page) = system
        .query("/v1/accounts?limit=500", &system.viewer())
        .await;
    assert_eq!(status, StatusCode::OK);
    let projected: i64 = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|account| account["balance"].as_i64().unwrap())
        .sum();
    assert_eq!(projected, ACCOUNTS as i64 * INITIAL);
}

#[tokio::test]
async fn a_transfer_no_message_announced_is_resumed_from_the_event_store() {
    let mut system = System::start().await;
    let from = funded(&system, "EUR", 100).await;
    let to = funded(&system, "EUR", 0).await;
    // Without the relay no message about the transfer reaches the process manager: only its
    // look into the event store for stuck transfers can find it.
    system.kill_relay().await;
    let id = transfer(&system, from, to, 40, "EUR").await;
    let pool = &system.pool;
    eventually(Duration::from_secs(20), || async move {
        let completed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_id = $1 AND event_type = 'TransferCompleted')",
        )
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
        completed
            .then_some(())
            .ok_or("the stuck transfer was not resumed")
    })
    .await;
    system.start_relay().await;
    assert_eq!(settled(&system, id).await["status"], "completed");
    system.converged(Duration::from_secs(30)).await;
    assert_eq!(balance(&system, to).await, 40);
}

#[tokio::test]
async fn a_transfer_that_makes_no_progress_is_shown_stalled_until_it_settles() {
    let mut system = System::start().await;
    let from = funded(&system, "EUR", 100).await;
    let to = funded(&system, "EUR", 0).await;
    system.kill_process_manager().await;
    let id = transfer(&system, from, to, 40, "EUR").await;
    let stalled = eventually(Duration::from_secs(30), || {
        let system = &system;
        async move {
            let (status, headers, body) = system
                .query(&format!("/v1/transfers/{id}"), &system.viewer())
                .await;
            (status == StatusCode::OK && body["stalled"] == true)
                .then_some((headers, body))
                .ok_or("the transfer is not shown stalled")
        }
    })
    .await;
    let (headers, body) = stalled;
    assert_eq!(body["status"], "requested", "{body}");
    // The flag changes with time alone, so it changes the entity tag: a client revalidating
    // with the tag it had before does not get a 304 that hides it.
    assert_eq!(
        headers["etag"].to_str().unwrap(),
        format!("\"{}s\"", body["version"])
    );
    system.start_process_manager().await;
    let settled = settled(&system, id).await;
    assert_eq!(settled["status"], "completed");
    assert_eq!(settled["stalled"], false, "{settled}");
}

/// Starts another command API of `system` with its transfer limits set by `limit`; its `/v1`.
async fn limited_command_api(
    system: &System,
    limit: impl FnOnce(&mut command_api::Config),
) -> String {
    let mut config = command_api::Config {
        query_api_url: system.queries.clone(),
        ..command_api::Config::for_tests(
            system.database.config_as(ServiceRole::Writer),
            testing::auth(),
        )
    };
    limit(&mut config);
    let limited = command_api::Application::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}/v1", limited.port());
    tokio::spawn(limited.run_until_stopped(std::future::pending()));
    base
}

#[tokio::test]
async fn new_transfers_are_refused_while_too_many_are_in_flight_and_admitted_once_they_settle() {
    let mut system = System::start().await;
    let from = funded(&system, "EUR", 100_000).await;
    let to = funded(&system, "EUR", 0).await;
    system.kill_process_manager().await;
    // A command API of the same system that admits three transfers in flight.
    let limited_url = format!(
        "{}/transfers",
        limited_command_api(&system, |config| {
            config.max_transfers_in_flight = NonZeroUsize::new(3).unwrap();
        })
        .await
    );
    let client = system.client.clone();
    let request_with_key = |key: Option<&'static str>| {
        let mut request = client
            .post(&limited_url)
            .bearer_auth(token(TENANT, &["teller"]))
            .json(&json!({"from_account": from, "to_account": to, "amount": 1,
                          "currency": "EUR", "reference": "test"}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            (status, headers, response.json::<Value>().await.unwrap())
        }
    };
    let request = || request_with_key(None);

    // Nothing completes them now: the requests pile up until the limit is seen, back to back.
    let (status, _, first) = request_with_key(Some("the-first")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let mut accepted = vec![first["transfer_id"].as_str().unwrap().to_owned()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (refused, refusal) = loop {
        match request().await {
            (StatusCode::ACCEPTED, _, body) => {
                accepted.push(body["transfer_id"].as_str().unwrap().to_owned());
            }
            (StatusCode::SERVICE_UNAVAILABLE, headers, body) => break (headers, body),
            (status, _, body) => panic!("{status}: {body}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still admitted after {} transfers",
            accepted.len()
        );
    };
    assert_eq!(problem(&refusal), "overloaded", "{refusal}");
    assert_eq!(refused["retry-after"], "1");
    assert!(
        accepted.len() >= 3,
        "refused before the limit: {accepted:?}"
    );
    let transfer_streams = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'transfer'",
        )
        .fetch_one(&system.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        transfer_streams().await,
        accepted.len() as i64,
        "a refused request recorded nothing"
    );
    // While new transfers are refused, a retry of one that was accepted is answered as it was;
    // a new one is refused, with a key of its own or without.
    let (status, headers, retried) = request_with_key(Some("the-first")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["transfer_id"], first["transfer_id"]);
    assert_eq!(headers["idempotent-replayed"], "true");
    for key in [Some("a-new-one"), None] {
        let (status, headers, body) = request_with_key(key).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{key:?}: {body}");
        assert_eq!(headers["retry-after"], "1");
    }
    assert_eq!(
        transfer_streams().await,
        accepted.len() as i64,
        "the retry recorded nothing"
    );

    system.start_process_manager().await;
    for id in &accepted {
        assert_eq!(
            settled(&system, id.parse().unwrap()).await["status"],
            "completed"
        );
    }
    let admitted = eventually(Duration::from_secs(10), || async {
        match request().await {
            (StatusCode::ACCEPTED, _, body) => Ok(body),
            (status, _, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    let id = admitted["transfer_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(settled(&system, id).await["status"], "completed");
}

#[tokio::test]
async fn a_tenant_holding_its_share_of_the_transfers_in_flight_is_refused_and_the_others_are_not() {
    let mut system = System::start().await;
    system.kill_process_manager().await;
    // A command API of the same system that admits two transfers in flight per tenant, of a
    // thousand in all.
    let base = limited_command_api(&system, |config| {
        config.max_transfers_in_flight_per_tenant = NonZeroUsize::new(2).unwrap();
    })
    .await;
    let client = system.client.clone();
    let post = |tenant: &'static str, path: String, body: Value| {
        let request = client
            .post(format!("{base}{path}"))
            .bearer_auth(token(tenant, &["teller"]))
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            let body = response.json::<Value>().await.unwrap();
            (status, body, retry_after)
        }
    };
    let accounts = |tenant: &'static str| {
        let post = &post;
        async move {
            let mut ids = Vec::new();
            for deposit in [100, 0] {
                let (status, opened, _) = post(
                    tenant,
                    "/accounts".into(),
                    json!({"owner": "Ada", "currency": "EUR"}),
                )
                .await;
                assert_eq!(status, StatusCode::CREATED, "{opened}");
                let id = opened["account_id"].as_str().unwrap().to_owned();
                if deposit > 0 {
                    let (status, body, _) = post(
                        tenant,
                        format!("/accounts/{id}/deposits"),
                        json!({"amount": deposit, "currency": "EUR"}),
                    )
                    .await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
                ids.push(id);
            }
            (ids[0].clone(), ids[1].clone())
        }
    };
    let transfer = |tenant: &'static str, (from, to): (String, String)| {
        post(
            tenant,
            "/transfers".into(),
            json!({"from_account": from, "to_account": to, "amount": 1,
                   "currency": "EUR", "reference": "test"}),
        )
    };
    let hog = accounts(TENANT).await;
    let other = accounts("globex").await;

    // Nothing completes them now: the hog's requests pile up until its share is seen.
    let mut accepted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match transfer(TENANT, hog.clone()).await {
            (StatusCode::ACCEPTED, _, _) => accepted += 1,
            (StatusCode::SERVICE_UNAVAILABLE, body, retry_after) => {
                assert_eq!(retry_after.unwrap(), "1");
                break body;
            }
            (status, body, _) => panic!("{status}: {body}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still admitted after {accepted} transfers"
        );
    };
    assert_eq!(problem(&refusal), "overloaded", "{refusal}");
    assert!(accepted >= 2, "refused before its share: {accepted}");
    assert!(
        accepted < 500,
        "refused only near the limit of the whole pile (1000): {accepted}"
    );

    // Far below the limit of the whole pile, another tenant is admitted, while the hog is not.
    let (status, body, _) = transfer("globex", other).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body, _) = transfer(TENANT, hog).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
