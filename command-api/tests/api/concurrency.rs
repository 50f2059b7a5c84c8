use futures::future::join_all;
use reqwest::StatusCode;

use crate::helpers::{Reply, TestApp};

/// How many deposits were accepted and their sum, asserting the others lost the race.
fn accepted<'a>(replies: impl Iterator<Item = (i64, &'a Reply)>) -> (usize, i64) {
    let (mut accepted, mut sum) = (0, 0);
    for (amount, reply) in replies {
        match reply.status {
            StatusCode::OK => {
                accepted += 1;
                sum += amount;
            }
            // Retries are bounded: a command that kept losing the race is refused, not applied.
            StatusCode::CONFLICT => assert_eq!(reply.problem(), "conflict"),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    (accepted, sum)
}

/// Asserts the stream's events are in commit order, and returns how many there are.
///
/// A later version is written by a later transaction, or later in the same one: what lets the
/// relay read the log in commit order, `(tx_id, global_position)`, without gaps.
async fn commit_order(pool: &sqlx::PgPool, account: uuid::Uuid) -> usize {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, global_position FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(account.to_string())
    .fetch_all(pool)
    .await
    .unwrap();
    let order: Vec<(u64, i64)> = rows
        .iter()
        .map(|(tx_id, position)| (tx_id.parse().unwrap(), *position))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    order.len()
}

#[tokio::test]
async fn fifty_parallel_deposits_each_append_exactly_one_event() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let replies = join_all((1..=50).map(|amount| {
        let app = &app;
        async move { (amount, app.deposit(account, amount).await) }
    }))
    .await;

    let mut accepted_sum = 0;
    let mut versions = Vec::new();
    for (amount, reply) in &replies {
        assert!(!reply.status.is_server_error(), "5xx: {}", reply.body);
        if reply.status == StatusCode::OK {
            accepted_sum += amount;
            versions.push(reply.version());
        } else {
            assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
        }
    }
    versions.sort_unstable();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(account.to_string())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 1 + versions.len() as i64, "one event per 2xx");
    assert_eq!(
        versions,
        (2..2 + versions.len() as i64).collect::<Vec<_>>(),
        "distinct, dense versions"
    );
    assert_eq!(app.balance(account).await, accepted_sum);
}

#[tokio::test]
async fn two_replicas_racing_on_one_account_lose_nothing_and_apply_nothing_twice() {
    let first = TestApp::spawn().await;
    let second = first.replica().await;
    let account = first.open_account(&first.teller(), 0).await;
    let replies = join_all((1..=60).map(|amount| {
        let app = if amount % 2 == 0 { &first } else { &second };
        async move { (amount, app.deposit(account, amount).await) }
    }))
    .await;

    let (accepted, accepted_sum) = accepted(replies.iter().map(|(amount, reply)| (*amount, reply)));
    assert!(accepted > 0);
    assert_eq!(first.balance(account).await, accepted_sum);

    assert_eq!(commit_order(&first.pool, account).await, 1 + accepted);
}

#[tokio::test]
async fn two_replicas_group_committing_over_many_accounts_lose_nothing() {
    let first = TestApp::spawn().await;
    let second = first.replica().await;
    let teller = first.teller();
    let accounts = join_all((0..10).map(|_| first.open_account(&teller, 0))).await;
    // Each replica's cached state goes stale as the other writes, so batches carry both
    // appends that conflict and appends that do not.
    let replies = join_all(
        accounts
            .iter()
            .flat_map(|&account| (1..=20).map(move |amount| (account, amount)))
            .map(|(account, amount)| {
                let app = if amount % 2 == 0 { &first } else { &second };
                async move { (account, amount, app.deposit(account, amount).await) }
            }),
    )
    .await;

    for &account in &accounts {
        let (accepted, accepted_sum) = accepted(
            replies
                .iter()
                .filter(|(id, _, _)| *id == account)
                .map(|(_, amount, reply)| (*amount, reply)),
        );
        assert_eq!(first.balance(account).await, accepted_sum);
        assert_eq!(commit_order(&first.pool, account).await, 1 + accepted);
    }

    let (events, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT tx_id) FROM events WHERE event_type = 'MoneyDeposited'",
    )
    .fetch_one(&first.pool)
    .await
    .unwrap();
    assert!(
        transactions < events,
        "{events} deposits in {transactions} transactions: none were group-committed"
    );
}

#[tokio::test]
async fn commands_waiting_for_one_account_share_commits_and_each_get_their_own_version() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    let replies = join_all((1..=40).map(|amount| app.deposit(account, amount))).await;

    let mut versions: Vec<i64> = replies.iter().map(|reply| reply.version()).collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<_>>());
    assert_eq!(app.balance(account).await, (1..=40).sum::<i64>());
    assert_eq!(commit_order(&app.pool, account).await, 41);
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT tx_id) FROM events WHERE event_type = 'MoneyDeposited'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(transactions < 40, "40 deposits in {transactions} commits");
}

#[tokio::test]
async fn a_command_is_decided_on_what_the_commands_before_it_in_its_group_did() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    assert_eq!(app.deposit(account, 100).await.status, StatusCode::OK);
    let path = format!("/v1/accounts/{account}/withdrawals");
    let withdrawals = join_all(
        (0..10).map(|_| app.post(&path, serde_json::json!({"amount": 30, "currency": "EUR"}))),
    )
    .await;
    let accepted = withdrawals
        .iter()
        .filter(|reply| reply.status == StatusCode::OK)
        .count();
    assert_eq!(accepted, 3);
    for refused in withdrawals
        .iter()
        .filter(|reply| reply.status != StatusCode::OK)
    {
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(refused.problem(), "insufficient-funds");
    }
    assert_eq!(app.balance(account).await, 10);

    // Every If-Match names the same version: one command gets it, the rest see it taken.
    let path = format!("/v1/accounts/{account}/deposits");
    let version = format!("\"{}\"", 2 + accepted);
    let teller = app.teller();
    let headers = [("if-match", version.as_str())];
    let deposits = join_all((0..10).map(|_| {
        app.post_with(
            &path,
            &teller,
            &headers,
            Some(serde_json::json!({"amount": 1, "currency": "EUR"})),
        )
    }))
    .await;
    let statuses: Vec<StatusCode> = deposits.iter().map(|reply| reply.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        deposits
            .iter()
            .filter(|reply| reply.status != StatusCode::OK)
            .all(|reply| reply.problem() == "conflict")
    );
    assert_eq!(app.balance(account).await, 11);
}

/// Accepted and refused commands racing on one account: each accepted one gets a version of
/// its own, a refused one appends nothing, and the stream's versions run 1..=n without a gap.
#[tokio::test]
async fn refused_commands_among_accepted_ones_leave_no_gap_in_the_versions() {
    let app = TestApp::spawn().await;
    let account = app.open_account(&app.teller(), 0).await;
    // 30 deposits of 20 bring in 600; 30 withdrawals of 30 would take 900, so at least ten
    // withdrawals are refused whatever the order.
    let replies = join_all((0..60).map(|i| {
        let app = &app;
        async move {
            let (kind, amount) = if i % 2 == 0 {
                ("deposits", 20)
            } else {
                ("withdrawals", 30)
            };
            let reply = app
                .post(
                    &format!("/v1/accounts/{account}/{kind}"),
                    serde_json::json!({"amount": amount, "currency": "EUR"}),
                )
                .await;
            (if kind == "deposits" { amount } else { -amount }, reply)
        }
    }))
    .await;
    let (mut versions, mut refused, mut balance) = (Vec::new(), 0, 0);
    for (amount, reply) in &replies {
        match reply.status {
            StatusCode::OK => {
                versions.push(reply.version());
                balance += amount;
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(reply.problem(), "insufficient-funds");
                refused += 1;
            }
            StatusCode::CONFLICT => assert_eq!(reply.problem(), "conflict"),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert!(refused >= 10, "only {refused} refused");
    versions.sort_unstable();
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(account.to_string())
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let n = sequences.len() as i64;
    assert_eq!(sequences, (1..=n).collect::<Vec<_>>(), "dense versions");
    assert_eq!(
        n,
        1 + versions.len() as i64,
        "one event per 2xx, none per refusal"
    );
    assert_eq!(
        versions,
        (2..=n).collect::<Vec<_>>(),
        "each accepted command got its own version"
    );
    assert_eq!(app.balance(account).await, balance);
    assert_eq!(commit_order(&app.pool, account).await as i64, n);
}
