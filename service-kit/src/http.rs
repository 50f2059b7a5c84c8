//! HTTP plumbing shared by the APIs: request ids, request tracing, panics as problems, health
//! probes and graceful shutdown.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::config::{self, ConfigError};
use crate::problem::Problem;

/// Header carrying the request id, set by us when the client did not.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long the readiness probe waits for the database.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// `CORS_ALLOWED_ORIGINS`: the origins (comma-separated, e.g. `https://app.example.com`) whose
/// pages may call the API from a browser. Unset: none, and no CORS headers at all, so browsers
/// refuse every cross-origin call.
pub fn cors_origins_from_env() -> Result<Vec<HeaderValue>, ConfigError> {
    let Some(origins) = config::optional("CORS_ALLOWED_ORIGINS") else {
        return Ok(Vec::new());
    };
    origins
        .split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(|origin| {
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && origin != "*";
            HeaderValue::from_str(origin)
                .ok()
                .filter(|_| valid)
                .ok_or_else(|| ConfigError::Invalid {
                    name: "CORS_ALLOWED_ORIGINS",
                    reason: format!(
                        "`{origin}` is not an origin like https://app.example.com (no path, no wildcard)"
                    ),
                })
        })
        .collect()
}

/// Lets browsers on `origins` call the API with a bearer token; with no origins, nothing is
/// added and cross-origin calls stay closed.
pub fn with_cors(router: Router, origins: Vec<HeaderValue>) -> Router {
    if origins.is_empty() {
        return router;
    }
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-correlation-id"),
                REQUEST_ID,
                HeaderName::from_static("traceparent"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                REQUEST_ID,
                HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Wraps a router with the layers every API has, outermost first: a request id on every
/// request and response, one span per request (with method, path, request id and tenant),
/// and a panic answered as a 500 problem instead of a dropped connection.
pub fn with_standard_layers(router: Router) -> Router {
    router
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            Problem::internal().into_response()
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id,
                        tenant = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(|response: &Response, latency: Duration, _span: &Span| {
                    tracing::info!(
                        status = response.status().as_u16(),
                        latency_us = latency.as_micros() as u64,
                        "response"
                    );
                }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// The id of the current request (from `x-request-id`, generated when absent).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty() && value.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(Self(id))
    }
}

/// Liveness: the process answers.
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the database answers within [`READINESS_TIMEOUT`].
pub async fn ready(pool: &PgPool) -> Response {
    let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    match tokio::time::timeout(READINESS_TIMEOUT, probe).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready", "database": "ok" })),
        )
            .into_response(),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness: database error");
            Problem::unavailable("The database").into_response()
        }
        Err(_) => {
            tracing::warn!("readiness: database timed out");
            Problem::unavailable("The database").into_response()
        }
    }
}

/// Resolves on SIGTERM or ctrl-c: pass it to `run_until_stopped`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received, draining requests");
}
