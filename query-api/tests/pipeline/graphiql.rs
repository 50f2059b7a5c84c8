//! GraphiQL in Chromium: the page the query API serves at `/graphql`, with the GraphiQL build
//! it serves itself (no CDN: this machine, like an air-gapped deployment, has no way to one,
//! and the page's Content-Security-Policy allows its own origin only), runs a query and a
//! subscription with the token put in its headers pane, against an account opened and funded
//! through the command API and projected by the projector, and shows the answers.

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

/// Sets the query editor's text and waits until GraphiQL parsed it (it does a moment after
/// each edit; until then it would run the document as the last one was, a subscription over
/// HTTP for instance).
async fn fill_query(browser: &Browser, query: &str) {
    fill(browser, ".graphiql-query-editor", query).await;
    browser
        .until(
            "GraphiQL parsed the query",
            "const editor = document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror;
             const parsed = editor.documentAST;
             return Boolean(parsed && parsed.loc && parsed.loc.source.body === editor.getValue());",
        )
        .await;
}

/// Runs the query editor's document; the response pane's text once `ready` says it is there.
async fn run(browser: &Browser, ready: &str) -> Value {
    browser
        .element("button.graphiql-execute-button")
        .await
        .click()
        .await
        .unwrap();
    let shown = browser
        .until(
            "GraphiQL's answer",
            &format!(
                "const pane = document.querySelector('.graphiql-response .CodeMirror');
                 const text = pane && pane.CodeMirror.getValue();
                 return text && text.includes({ready:?}) ? text : null;"
            ),
        )
        .await;
    serde_json::from_str(shown.as_str().expect("the pane's text")).expect("JSON in the pane")
}

#[tokio::test]
async fn graphiql_runs_a_query_and_a_subscription_with_a_token_and_shows_the_answers() {
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
    fill_query(
        &browser,
        &format!("{{ account(id: \"{account}\") {{ owner balance version }} }}"),
    )
    .await;
    // The Headers tab shows its editor in place of the variables'.
    browser
        .element_with_text(".graphiql-editor-tools button", "Headers")
        .await
        .click()
        .await
        .unwrap();
    fill(
        &browser,
        ".graphiql-editor-tool .graphiql-editor:not(.hidden)",
        &json!({"Authorization": format!("Bearer {}", system.viewer())}).to_string(),
    )
    .await;
    assert_eq!(
        run(&browser, "data").await,
        json!({"data": {"account": {"owner": "Ada", "balance": 2500, "version": version}}})
    );

    // A subscription, over the WebSocket, with the same token in its `connection_init`: the
    // account as it is comes first.
    fill_query(
        &browser,
        &format!(
            "subscription {{ accountChanged(id: \"{account}\") {{ version account {{ balance }} }} }}"
        ),
    )
    .await;
    assert_eq!(
        run(&browser, "accountChanged").await,
        json!({"data": {"accountChanged": {"version": version, "account": {"balance": 2500}}}})
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
