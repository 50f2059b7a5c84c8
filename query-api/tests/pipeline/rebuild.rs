use std::time::Duration;

use reqwest::StatusCode;

use crate::system::System;

#[tokio::test]
async fn a_rebuild_replays_the_store_and_swaps_in_while_serving() {
    let system = System::start().await;
    let mut accounts = Vec::new();
    for amount in [10, 20, 30] {
        let account = system.open(0).await;
        let version = system.move_money(account, amount).await;
        system.account_at(account, version).await;
        accounts.push(account);
    }
    // A projection bug: the read model drifted from the event store.
    sqlx::query("UPDATE accounts SET balance = balance + 1")
        .execute(&system.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM account_entries WHERE account_id = $1")
        .bind(accounts[0])
        .execute(&system.pool)
        .await
        .unwrap();
    // Three balances, and one account's entries.
    assert_eq!(
        system.differences().await.len(),
        4,
        "{:#?}",
        system.differences().await
    );

    // Commands and queries go on during the rebuild.
    let writes = {
        let account = accounts[1];
        let base = system.commands.clone();
        let client = system.client.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let response = client
                    .post(format!("{base}/v1/accounts/{account}/deposits"))
                    .bearer_auth(crate::system::token(crate::system::TENANT, &["teller"]))
                    .json(&serde_json::json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success());
            }
        })
    };
    let report = projector::rebuild::rebuild(&system.pool, false)
        .await
        .unwrap();
    assert!(report.events >= 6);
    assert_eq!(report.accounts, 3);
    let (status, _, _) = system
        .query(&format!("/v1/accounts/{}", accounts[2]), &system.viewer())
        .await;
    assert_eq!(status, StatusCode::OK);
    writes.await.unwrap();
    system.converged(Duration::from_secs(20)).await;
    let view = system.account_at(accounts[1], 22).await;
    assert_eq!(view["balance"], 40);
}
