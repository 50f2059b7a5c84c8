//! GraphiQL in Chromium: the page the query API serves at `/graphql`, with the GraphiQL build
//! it serves itself (no CDN: this machine, like an air-gapped deployment, has no way to one),
//! runs a query with the token put in its headers pane, against an account opened and funded
//! through the command API and projected by the projector, and shows the answer.

use serde_json::{Value, json};
use service_kit::browser::Browser;

use crate::system::System;

/// Sets a GraphiQL editor's text, as typing it would (CodeMirror tells GraphiQL).
async fn fill(browser: &Browser, editor: &str, text: &str) {
    browser.element(&format!("{editor} .CodeMirror")).await;
    browser
        .client
        .execute(
            "document.querySelector(arguments[0] + ' .CodeMirror').CodeMirror.setValue(arguments[1]);",
            vec![json!(editor), json!(text)],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn graphiql_runs_a_query_with_a_token_and_shows_the_answer() {
    let system = System::start().await;
    let account = system.open(0).await;
    let version = system.move_money(account, 2500).await;
    system.projected(account, version).await;

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/graphql", system.queries))
        .await
        .unwrap();
    fill(
        &browser,
        ".graphiql-query-editor",
        &format!("{{ account(id: \"{account}\") {{ owner balance version }} }}"),
    )
    .await;
    browser
        .element_with_text(".graphiql-editor-tools button", "Headers")
        .await
        .click()
        .await
        .unwrap();
    fill(
        &browser,
        ".graphiql-editor-tool [aria-label='Headers']",
        &json!({"Authorization": format!("Bearer {}", system.viewer())}).to_string(),
    )
    .await;
    browser
        .element("button.graphiql-execute-button")
        .await
        .click()
        .await
        .unwrap();
    let shown = browser
        .until(
            "GraphiQL's answer",
            "const pane = document.querySelector('.graphiql-response .CodeMirror');
             const text = pane && pane.CodeMirror.getValue();
             return text && text.includes('balance') ? text : null;",
        )
        .await;
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!(
        shown,
        json!({"data": {"account": {"owner": "Ada", "balance": 2500, "version": version}}})
    );
    // Every file the page loaded came from the query API itself.
    let elsewhere = browser
        .client
        .execute(
            "return performance.getEntriesByType('resource')
                 .map(entry => entry.name)
                 .filter(name => !name.startsWith(location.origin + '/'));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(elsewhere, json!([]));
    browser.close().await;
}
