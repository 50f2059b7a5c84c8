//! The command API without a socket and without a database, for `oneshot` tests: its router,
//! assembled as [`crate::Application::build`] assembles it, over a pool that connects lazily
//! to an address where no database listens. Whatever a request meets before the engine
//! (routing, authentication, extractors, validation) answers as in production, in
//! microseconds; a request that reaches the engine gets 503 `unavailable` once the short
//! acquire timeout passes, as during a database outage.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use serde_json::Value;
use service_kit::auth::Authenticator;
use service_kit::db::{self, DatabaseConfig};
use service_kit::testing;
use tower::ServiceExt;

use crate::{AppState, AppendSignal, Config, engine, router};

/// The tenant of [`teller`]'s token.
pub(crate) const TENANT: &str = "acme";

/// The router of a command API whose database is unreachable.
pub(crate) fn app() -> Router {
    let database = DatabaseConfig {
        acquire_timeout: Duration::from_millis(300),
        // Nothing listens on port 1.
        ..DatabaseConfig::with_url("postgres://ledger@127.0.0.1:1/nowhere")
    };
    let config = Config::for_tests(database, testing::auth());
    let pool = db::connect_lazy(&config.database).expect("a valid database URL");
    let state = AppState {
        commands: Arc::new(engine::CommandService::new(
            pool,
            &config.engine,
            AppendSignal::default(),
        )),
        auth: Arc::new(Authenticator::new(&config.auth).expect("the test secret")),
        query_api_url: config.query_api_url.clone().into(),
        transfer_backlog: Arc::default(),
    };
    router(state, &config)
}

/// A POST to `path` as a teller of [`TENANT`], with a JSON content type.
pub(crate) fn teller(path: &str) -> axum::http::request::Builder {
    Request::post(path)
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", testing::token(TENANT, &["teller"])),
        )
        .header(header::CONTENT_TYPE, "application/json")
}

/// What the API answered.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The body as JSON, `null` if it is not.
    pub(crate) body: Value,
}

impl Answer {
    /// The problem `type` slug, asserting the answer is problem+json with a matching status.
    pub(crate) fn problem(&self) -> &str {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{} {}",
            self.status,
            self.body
        );
        assert_eq!(self.body["status"], self.status.as_u16(), "{}", self.body);
        self.body["type"]
            .as_str()
            .and_then(|slug| slug.strip_prefix("urn:ledger:problem:"))
            .unwrap_or_else(|| panic!("no problem type in {}", self.body))
    }
}

/// Sends `request` to a fresh [`app`].
pub(crate) async fn send(request: Request<Body>) -> Answer {
    let response = app()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("the body");
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}
