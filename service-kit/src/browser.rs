//! A real browser for the tests of the pages people use (GraphiQL, Swagger UI's sign-in):
//! Debian's `chromium`, headless, driven over WebDriver by its own `chromedriver` through
//! fantoccini. `cargo xtask test` installs both packages when they are missing.
//!
//! WebDriver rather than a Node.js driver keeps the tests in Rust with one harness, and the
//! driver is the one Debian builds for that very Chromium, so the two never disagree on the
//! protocol's version.

use std::process::Stdio;
use std::time::Duration;

pub use fantoccini::elements::Element;
pub use fantoccini::{Client, Locator};

use fantoccini::ClientBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::testing::eventually;

/// Where Debian's packages put them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long a page may take to show what a test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);

/// A headless Chromium and its driver; [`Browser::close`] ends both.
pub struct Browser {
    pub client: Client,
    /// The driver, leading a process group of its own with the Chromium it starts: ended
    /// with it when dropped, so that a failing test leaves no browser behind.
    driver: Child,
}

impl Browser {
    /// Starts `chromedriver` on a spare loopback port and opens a session in a fresh profile.
    pub async fn start() -> Self {
        let port = crate::dev_provider::spare_port().expect("a free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; `cargo xtask test` installs it)");
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // No sandbox: tests run as root in containers, where Chromium's sandbox cannot
                // start. Its own shared memory, since /dev/shm is small there.
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--window-size=1400,1000"],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        let url = format!("http://127.0.0.1:{port}");
        // The driver listens a moment after it starts.
        let client = eventually(PAGE_WAIT, || {
            let mut builder = ClientBuilder::new(HttpConnector::new());
            builder.capabilities(capabilities.clone());
            let url = url.clone();
            async move { builder.connect(&url).await }
        })
        .await;
        Self { client, driver }
    }

    /// Waits until an element matching `css` is on the page.
    pub async fn element(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no `{css}` on the page within {PAGE_WAIT:?}: {err}"))
    }

    /// Waits until an element matching `css` whose text contains `text` is on the page.
    pub async fn element_with_text(&self, css: &str, text: &str) -> Element {
        eventually(PAGE_WAIT, || async {
            let found = self
                .client
                .find_all(Locator::Css(css))
                .await
                .map_err(|err| err.to_string())?;
            for element in found {
                if element.text().await.is_ok_and(|shown| shown.contains(text)) {
                    return Ok(element);
                }
            }
            Err(format!("no `{css}` showing {text:?}"))
        })
        .await
    }

    /// The text of the first element matching `css`, or why there is none: for messages.
    pub async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_else(|err| err.to_string()),
            Err(err) => err.to_string(),
        }
    }

    /// Waits until `script` (a function body returning a value) returns something other than
    /// `null`, `false` or an empty string, and returns that.
    pub async fn until(&self, what: &str, script: &str) -> serde_json::Value {
        eventually(PAGE_WAIT, || async {
            match self.client.execute(script, vec![]).await {
                Ok(value) if !(value.is_null() || value == false || value == "") => Ok(value),
                Ok(value) => Err(format!("{what}: still {value}")),
                Err(err) => Err(format!("{what}: {err}")),
            }
        })
        .await
    }

    /// Ends the session (Chromium quits), then the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium outlives a driver that is killed: end the whole group.
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
    }
}
