//! The second wall between tenants: row-level security under every read the query API makes.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use service_kit::db;
use sqlx::PgPool;

use crate::system::{System, TENANT, token};

/// What a deliberately unfiltered query returns through `tenant`'s scope, as the query API
/// reads: the distinct tenants it can see in each table.
async fn visible_tenants(pool: &PgPool, tenant: &str) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    for query in [
        "SELECT DISTINCT tenant FROM accounts ORDER BY 1",
        "SELECT DISTINCT tenant FROM account_entries ORDER BY 1",
        "SELECT DISTINCT tenant FROM transfers ORDER BY 1",
        "SELECT DISTINCT tenant FROM events ORDER BY 1",
    ] {
        let mut scope = db::tenant_scope(pool, tenant).await.unwrap();
        seen.push(
            sqlx::query_scalar(query)
                .fetch_all(&mut *scope)
                .await
                .unwrap(),
        );
    }
    seen
}

async fn activity(system: &System, tenant: &str) -> serde_json::Value {
    let teller = token(tenant, &["teller"]);
    let ids = [
        system.open_in(tenant, "Ada").await,
        system.open_in(tenant, "Ada").await,
    ];
    let deposit = system
        .client
        .post(format!(
            "{}/v1/accounts/{}/deposits",
            system.commands, ids[0]
        ))
        .bearer_auth(&teller)
        .json(&json!({"amount": 100, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(deposit.status(), StatusCode::OK);
    let transfer: Value = system
        .client
        .post(format!("{}/v1/transfers", system.commands))
        .bearer_auth(&teller)
        .json(
            &json!({"from_account": ids[0], "to_account": ids[1], "amount": 10, "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    transfer
}

#[tokio::test]
async fn an_unfiltered_query_through_a_tenant_scope_sees_that_tenant_only() {
    let system = System::start().await;
    activity(&system, TENANT).await;
    activity(&system, "globex").await;
    system.converged(Duration::from_secs(30)).await;
    // Every table has both tenants' rows, once projected.
    let everyone: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant FROM transfers ORDER BY 1")
            .fetch_all(&system.pool)
            .await
            .unwrap();
    assert_eq!(everyone, ["acme", "globex"]);

    let only = |tenant: &str| vec![vec![tenant.to_owned()]; 4];
    assert_eq!(visible_tenants(&system.pool, TENANT).await, only(TENANT));
    assert_eq!(
        visible_tenants(&system.pool, "globex").await,
        only("globex")
    );
    assert_eq!(
        visible_tenants(&system.pool, "nobody").await,
        vec![Vec::<String>::new(); 4]
    );

    // The scope reads; it cannot write.
    let mut scope = db::tenant_scope(&system.pool, TENANT).await.unwrap();
    let write = sqlx::query("UPDATE accounts SET balance = 0")
        .execute(&mut *scope)
        .await
        .unwrap_err();
    assert!(write.to_string().contains("permission denied"), "{write}");
    drop(scope);

    // A rebuild swaps in new tables; the wall comes with them.
    projector::rebuild::rebuild(&system.pool, false)
        .await
        .unwrap();
    assert_eq!(visible_tenants(&system.pool, TENANT).await, only(TENANT));
    let (status, _, page) = system.query("/v1/accounts", &system.viewer()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
}
