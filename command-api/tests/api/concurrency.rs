use futures::future::join_all;
use reqwest::StatusCode;

use crate::helpers::TestApp;

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

    let mut accepted_sum = 0;
    let mut accepted = 0;
    for (amount, reply) in &replies {
        match reply.status {
            StatusCode::OK => {
                accepted_sum += amount;
                accepted += 1;
            }
            // Retries are bounded: a command that kept losing the race is refused, not applied.
            StatusCode::CONFLICT => assert_eq!(reply.problem(), "conflict"),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert!(accepted > 0);
    assert_eq!(first.balance(account).await, accepted_sum);

    // Per-stream commit order: a later version is always written by a later transaction, which
    // is what lets the relay read the log in commit order without gaps.
    let tx_ids: Vec<String> = sqlx::query_scalar(
        "SELECT tx_id::text FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(account.to_string())
    .fetch_all(&first.pool)
    .await
    .unwrap();
    assert_eq!(tx_ids.len(), 1 + accepted);
    let tx_ids: Vec<u64> = tx_ids.iter().map(|t| t.parse().unwrap()).collect();
    assert!(tx_ids.windows(2).all(|w| w[0] < w[1]), "{tx_ids:?}");
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
        let mut accepted_sum = 0;
        let mut accepted = 0;
        for (_, amount, reply) in replies.iter().filter(|(id, _, _)| *id == account) {
            match reply.status {
                StatusCode::OK => {
                    accepted_sum += amount;
                    accepted += 1;
                }
                StatusCode::CONFLICT => assert_eq!(reply.problem(), "conflict"),
                other => panic!("unexpected {other}: {}", reply.body),
            }
        }
        assert_eq!(first.balance(account).await, accepted_sum);
        let tx_ids: Vec<String> = sqlx::query_scalar(
            "SELECT tx_id::text FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(account.to_string())
        .fetch_all(&first.pool)
        .await
        .unwrap();
        assert_eq!(tx_ids.len(), 1 + accepted);
        let tx_ids: Vec<u64> = tx_ids.iter().map(|t| t.parse().unwrap()).collect();
        assert!(tx_ids.windows(2).all(|w| w[0] < w[1]), "{tx_ids:?}");
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
