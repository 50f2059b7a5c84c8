use std::time::Duration;

use reqwest::StatusCode;

use crate::system::System;
use crate::transfers;

#[tokio::test]
async fn a_rebuild_replays_the_store_and_swaps_in_while_serving() {
    let mut system = System::start().await;
    system.start_process_manager().await;
    let mut accounts = Vec::new();
    for amount in [10, 20, 30] {
        let account = system.open(0).await;
        let version = system.move_money(account, amount).await;
        system.account_at(account, version).await;
        accounts.push(account);
    }
    let transfer = transfers::transfer(&system, accounts[2], accounts[0], 5, "EUR").await;
    assert_eq!(
        transfers::settled(&system, transfer).await["status"],
        "completed"
    );
    // A projection bug: the read models drifted from the event store.
    sqlx::query("UPDATE accounts SET balance = balance + 1")
        .execute(&system.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE transfers SET status = 'requested'")
        .execute(&system.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM account_entries WHERE account_id = $1")
        .bind(accounts[0])
        .execute(&system.pool)
        .await
        .unwrap();
    // Three balances, one account's entries, and the transfer.
    assert_eq!(
        system.differences().await.len(),
        5,
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
    assert_eq!(report.rows_of("accounts"), 3);
    assert_eq!(report.rows_of("transfers"), 1);
    let (status, _, _) = system
        .query(&format!("/v1/accounts/{}", accounts[2]), &system.viewer())
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = system
        .query(&format!("/v1/transfers/{transfer}"), &system.viewer())
        .await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &serde_json::json!("completed"))
    );
    writes.await.unwrap();
    system.converged(Duration::from_secs(20)).await;
    let view = system.account_at(accounts[1], 22).await;
    assert_eq!(view["balance"], 40);
}
