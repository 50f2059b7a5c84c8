//! HTTP plumbing shared by the APIs: request ids, request tracing and metrics, panics as
//! problems, health probes, `/metrics`, and graceful shutdown.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::auth::Authenticator;
use crate::config::{ConfigError, Optional};
use crate::db::kept::KeptConnections;
use crate::kafka::BrokerProbe;
use crate::problem::{Problem, ProblemType};
use crate::server::ServerLimits;

/// Header carrying the request id, set by us when the client did not.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long the readiness probe waits for each dependency: under the orchestrator's probe
/// timeout (2 s in `deploy/k8s`), so a slow dependency is a 503 naming it, not a timeout.
const READINESS_TIMEOUT: Duration = Duration::from_millis(1500);

pub const CORS_ALLOWED_ORIGINS: Optional<&str> = Optional::new(
    "CORS_ALLOWED_ORIGINS",
    "(none)",
    "origins whose pages may call the APIs from a browser, comma-separated (`https://app.example.com`); none: no CORS headers, cross-origin calls stay closed",
);

/// [`CORS_ALLOWED_ORIGINS`]: the origins whose pages may call the API from a browser. Unset:
/// none, and no CORS headers at all, so browsers refuse every cross-origin call.
pub fn cors_origins_from_env() -> Result<Vec<HeaderValue>, ConfigError> {
    let Some(origins) = CORS_ALLOWED_ORIGINS.read()? else {
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
                    name: CORS_ALLOWED_ORIGINS.name,
                    reason: format!(
                        "`{origin}` is not an origin like https://app.example.com (no path, no wildcard)"
                    ),
                })
        })
        .collect()
}

/// Lets browsers on `origins` call the API with a bearer token; with no origins, nothing is
/// added and cross-origin calls stay closed. Routing errors become problems first (see
/// [`with_problem_fallbacks`]), so that the CORS layer covers them and their preflights too.
pub fn with_cors(router: Router, origins: Vec<HeaderValue>) -> Router {
    let router = with_problem_fallbacks(router);
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

/// Wraps a router with the layers every listener has, outermost first: a request id on every
/// request and response, one span per request (with method, path, request id and tenant),
/// request metrics, a panic answered as a 500 problem instead of a dropped connection, and the
/// bounds on requests in flight and their duration (see [`crate::server`]).
pub fn with_standard_layers(router: Router, limits: &ServerLimits) -> Router {
    crate::server::bound_requests(router, limits)
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            Problem::internal().into_response()
        }))
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    let span = tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id,
                        tenant = tracing::field::Empty,
                    );
                    crate::telemetry::continue_trace(
                        &span,
                        request
                            .headers()
                            .get("traceparent")
                            .and_then(|value| value.to_str().ok()),
                    );
                    span
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

/// Unknown paths and wrong methods answered as problems, like every other error. Set before
/// any layer: a fallback set later would bypass the layers of the routes.
fn with_problem_fallbacks(router: Router) -> Router {
    router
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
}

/// 404 for a path no route has, as problem+json like every other error; also for a route
/// with a path parameter that names nothing.
pub async fn no_such_route() -> Problem {
    Problem::new(ProblemType::NotFound, "Not found")
        .detail("There is nothing at this path; the routes are in /openapi.json.")
}

/// 405 for a route that exists with other methods; axum adds `Allow` with those.
async fn method_not_allowed() -> Problem {
    Problem::new(ProblemType::MethodNotAllowed, "Method not allowed")
        .detail("This path does not take that method; `Allow` lists the ones it takes.")
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

/// What a UUID in a path names, and the answer when it names nothing.
pub trait PathResource {
    type Rejection: IntoResponse;
    /// The answer to an id that is not a UUID: the same as to one that exists nowhere.
    fn not_found() -> Self::Rejection;
}

/// The `{id}` of a path: a UUID naming an `R`. Anything else names none: `R::not_found()`.
pub struct PathId<R> {
    pub id: uuid::Uuid,
    resource: PhantomData<R>,
}

impl<S: Send + Sync, R: PathResource> FromRequestParts<S> for PathId<R> {
    type Rejection = R::Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| R::not_found())?;
        raw.parse()
            .map(|id| Self {
                id,
                resource: PhantomData,
            })
            .map_err(|_| R::not_found())
    }
}

/// Liveness: the process answers.
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Whether a dependency must answer for the process to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Unreachable: not ready, so the orchestrator stops routing to the process.
    Required,
    /// Unreachable: reported in the probe's body and logs, still ready. For the command API's
    /// relay: the API keeps accepting commands while the broker is away, and the relay
    /// publishes them when it is back; taking the API out of service would turn a delayed
    /// pipeline into an outage.
    Reported,
}

/// What `/health/ready` checks: the database always, the broker when the process uses one,
/// and the token keys when the process checks tokens.
///
/// Probes are unauthenticated, so checks are coalesced: one database query and one broker
/// request per [`READINESS_INTERVAL`] at most, whatever the number of callers. Callers that
/// arrive while a check runs wait for it and share its verdict.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    /// Connections kept out of `pool`, counted `kept_idle` in its gauges while they wait.
    kept: Option<KeptConnections>,
    broker: Option<(BrokerProbe, Need)>,
    /// The APIs': whether tokens can be checked (an identity provider's keys are loaded).
    token_keys: Option<Arc<Authenticator>>,
    /// The projector's: report the account streams it parked.
    parked_streams: bool,
    last: Arc<tokio::sync::Mutex<Option<(Instant, Verdict)>>>,
}

/// How long one readiness verdict is reused.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// The outcome of one readiness check.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    database: bool,
    /// Streams the projector parked, when reported.
    parked_streams: Option<i64>,
    /// Reachable, and whether it must be; `None` without a broker.
    broker: Option<(bool, Need)>,
    /// Whether tokens can be checked; `None` for a process that checks none.
    token_keys: Option<bool>,
}

impl Readiness {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            kept: None,
            broker: None,
            token_keys: None,
            parked_streams: false,
            last: Arc::default(),
        }
    }

    /// Reports the account streams the projector parked (`parked_streams`; `status` is
    /// `degraded` while there are any). Still ready: every other stream is projecting, and
    /// taking the projector out of service would stop them too.
    pub fn reporting_parked_streams(mut self) -> Self {
        self.parked_streams = true;
        self
    }

    /// Counts the idle connections of `kept`, taken from the pool, as `kept_idle` in its gauges.
    pub fn with_kept_connections(mut self, kept: KeptConnections) -> Self {
        self.kept = Some(kept);
        self
    }

    pub fn with_broker(mut self, probe: BrokerProbe, need: Need) -> Self {
        self.broker = Some((probe, need));
        self
    }

    /// Not ready while `authenticator` cannot check tokens: an API whose identity provider
    /// has been unreachable since it started would refuse every request.
    pub fn with_token_keys(mut self, authenticator: Arc<Authenticator>) -> Self {
        self.token_keys = Some(authenticator);
        self
    }

    /// 200 with each dependency's state, or a 503 problem naming the first one missing; from
    /// a verdict at most [`READINESS_INTERVAL`] old.
    pub async fn check(&self) -> Response {
        let verdict = {
            let mut last = self.last.lock().await;
            match *last {
                Some((at, verdict)) if at.elapsed() < READINESS_INTERVAL => verdict,
                _ => {
                    let verdict = self.probe().await;
                    *last = Some((Instant::now(), verdict));
                    verdict
                }
            }
        };
        if !verdict.database {
            return Problem::unavailable("The database").into_response();
        }
        if let Some((false, Need::Required)) = verdict.broker {
            return Problem::unavailable("The Kafka broker").into_response();
        }
        if verdict.token_keys == Some(false) {
            return Problem::unavailable("The identity provider's signing keys").into_response();
        }
        let mut body = serde_json::json!({ "status": "ready", "database": "ok" });
        if let Some((reachable, _)) = verdict.broker {
            body["broker"] = (if reachable { "ok" } else { "unreachable" }).into();
        }
        if verdict.token_keys.is_some() {
            body["token_keys"] = "ok".into();
        }
        if let Some(parked) = verdict.parked_streams {
            body["parked_streams"] = parked.into();
            if parked > 0 {
                body["status"] = "degraded".into();
            }
        }
        (StatusCode::OK, Json(body)).into_response()
    }

    /// Checks every dependency, in parallel, each within [`READINESS_TIMEOUT`].
    async fn probe(&self) -> Verdict {
        let database = async {
            let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
            match tokio::time::timeout(READINESS_TIMEOUT, probe).await {
                Ok(Ok(_)) => true,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "readiness: database error");
                    false
                }
                Err(_) => {
                    tracing::warn!("readiness: database timed out");
                    false
                }
            }
        };
        let broker = async {
            match &self.broker {
                None => None,
                Some((probe, need)) => {
                    let reachable = probe.reachable(READINESS_TIMEOUT).await;
                    if !reachable {
                        tracing::warn!("readiness: no broker answered");
                    }
                    Some((reachable, *need))
                }
            }
        };
        let parked_streams = async {
            if !self.parked_streams {
                return None;
            }
            let count =
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM projector_parked_streams")
                    .fetch_one(&self.pool);
            match tokio::time::timeout(READINESS_TIMEOUT, count).await {
                Ok(Ok(count)) => Some(count),
                _ => None,
            }
        };
        let (database, broker, parked_streams) = tokio::join!(database, broker, parked_streams);
        Verdict {
            database,
            parked_streams,
            broker,
            token_keys: self.token_keys.as_ref().map(|auth| auth.keys_loaded()),
        }
    }
}

/// The routes every process serves for its operators: `/health/live`, `/health/ready` and
/// `/metrics` (Prometheus text; the pool gauges are sampled on each scrape).
fn ops_routes(readiness: Readiness, metrics: PrometheusHandle) -> Router {
    let routes = Router::new()
        .route("/health/live", get(live))
        .route(
            "/health/ready",
            get(|State(readiness): State<Readiness>| async move { readiness.check().await }),
        )
        .with_state(readiness.clone())
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                crate::metrics::record_pool(&readiness.pool, readiness.kept.as_ref());
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        );
    with_problem_fallbacks(routes)
}

/// The health probes and `/metrics` of a process without an API of its own (the projector,
/// the process manager). Bound when the process is built, so a taken port fails start-up;
/// served by its run loop.
pub struct OpsServer {
    listener: TcpListener,
    routes: Router,
    limits: ServerLimits,
}

impl OpsServer {
    /// Binds `addr` for the probes of `readiness` and the metrics of `service`.
    pub async fn bind(
        addr: SocketAddr,
        readiness: Readiness,
        service: &'static str,
        limits: ServerLimits,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            routes: ops_routes(readiness, crate::metrics::install(service)),
            limits,
        })
    }

    /// The bound port (useful when configured with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |addr| addr.port())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let router = with_standard_layers(self.routes, &self.limits);
        crate::server::serve(self.listener, router, self.limits, shutdown).await;
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
