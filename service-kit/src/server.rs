//! Serving a router over HTTP/1.1 with every bound a public port needs: a header-read timeout
//! (which hyper also applies to an idle keep-alive connection), a request timeout, a cap on
//! open connections, a cap on requests in flight that sheds the excess with 503 and
//! `Retry-After`, and a graceful shutdown that gives up after a grace period.
//!
//! `axum::serve` has none of these (it runs hyper without a timer, so even hyper's own header
//! timeout is off), hence this accept loop, modelled on mini-redis's: a semaphore permit per
//! connection, taken before `accept`, so a full server stops accepting instead of failing
//! connections it already took. HTTP/2 is not offered: nothing in front of these services
//! needs cleartext HTTP/2, and hyper has no header or idle timeout for it.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

use crate::config::{ConfigError, Setting, Settings};
use crate::problem::{Problem, ProblemType};

pub const HTTP_HEADER_READ_TIMEOUT: Setting<Duration> = Setting::new(
    "HTTP_HEADER_READ_TIMEOUT_MS",
    Duration::from_secs(10),
    "a connection that has not sent a request's headers this long after connecting or after its last response is closed (the idle keep-alive timeout too)",
);
pub const HTTP_REQUEST_TIMEOUT: Setting<Duration> = Setting::new(
    "HTTP_REQUEST_TIMEOUT_MS",
    Duration::from_secs(15),
    "a request not answered this long after its headers gets 503 `timeout`",
);
pub const HTTP_MAX_CONNECTIONS: Setting<usize> = Setting::new(
    "HTTP_MAX_CONNECTIONS",
    4096,
    "connections open at once per listener; further ones wait to be accepted",
);
pub const HTTP_MAX_IN_FLIGHT: Setting<usize> = Setting::new(
    "HTTP_MAX_IN_FLIGHT",
    1024,
    "requests handled at once per listener; further ones get 503 `overloaded` with `Retry-After`",
);
pub const HTTP_SHUTDOWN_GRACE: Setting<Duration> = Setting::new(
    "HTTP_SHUTDOWN_GRACE_MS",
    Duration::from_secs(10),
    "on SIGTERM, how long requests in flight may finish before their connections are closed",
);

/// The variables [`ServerLimits::from_env`] reads; every listener (APIs and ops) uses them.
pub const SETTINGS: Settings = &[
    &HTTP_HEADER_READ_TIMEOUT,
    &HTTP_REQUEST_TIMEOUT,
    &HTTP_MAX_CONNECTIONS,
    &HTTP_MAX_IN_FLIGHT,
    &HTTP_SHUTDOWN_GRACE,
];

/// Where a test or a tool listens: a free port on the loopback interface.
pub const ANY_LOCAL_PORT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// The bounds of one listener, read from the environment by [`ServerLimits::from_env`]; the
/// settings' defaults make [`ServerLimits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Longest wait for a request's headers, from the moment the connection is idle.
    pub header_read_timeout: Duration,
    /// Longest time from a request's headers to its response.
    pub request_timeout: Duration,
    /// Connections held open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Requests handled at once; more are answered 503 at once.
    pub max_in_flight: usize,
    /// How long shutdown waits for requests in flight before closing their connections.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HTTP_HEADER_READ_TIMEOUT.default,
            request_timeout: HTTP_REQUEST_TIMEOUT.default,
            max_connections: HTTP_MAX_CONNECTIONS.default,
            max_in_flight: HTTP_MAX_IN_FLIGHT.default,
            shutdown_grace: HTTP_SHUTDOWN_GRACE.default,
        }
    }
}

impl ServerLimits {
    pub fn from_env() -> Result<Self, ConfigError> {
        let millis = |setting: Setting<Duration>| -> Result<Duration, ConfigError> {
            let value = setting.read()?;
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    name: setting.name,
                    reason: "must be at least 1 ms".into(),
                });
            }
            Ok(value)
        };
        let count = |setting: Setting<usize>| -> Result<usize, ConfigError> {
            let value = setting.read()?;
            if value == 0 {
                return Err(ConfigError::Invalid {
                    name: setting.name,
                    reason: "must be at least 1".into(),
                });
            }
            Ok(value)
        };
        Ok(Self {
            header_read_timeout: millis(HTTP_HEADER_READ_TIMEOUT)?,
            request_timeout: millis(HTTP_REQUEST_TIMEOUT)?,
            max_connections: count(HTTP_MAX_CONNECTIONS)?,
            max_in_flight: count(HTTP_MAX_IN_FLIGHT)?,
            shutdown_grace: millis(HTTP_SHUTDOWN_GRACE)?,
        })
    }
}

/// Bounds the work of `router`'s routes: at most `max_in_flight` requests at once across all
/// of them (the excess is answered 503 `overloaded` at once, never queued), each answered
/// within `request_timeout` (else 503 `timeout`). Applied inside the request-id, tracing and
/// metrics layers, so shed and timed-out requests are logged and counted like any other.
pub(crate) fn bound_requests(router: Router, limits: &ServerLimits) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|error: tower::BoxError| async move {
                refusal(&error)
            }))
            .load_shed()
            // Global: `Router::layer` clones the layer into every route, and a plain
            // concurrency limit would give each route its own budget.
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.max_in_flight,
            ))
            .timeout(limits.request_timeout),
    )
}

fn refusal(error: &tower::BoxError) -> Response {
    let problem = if error.is::<tower::load_shed::error::Overloaded>() {
        Problem::new(ProblemType::Overloaded, "Overloaded")
            .detail("The server is handling as many requests as it takes; retry shortly.")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        tracing::warn!("request timed out");
        Problem::new(ProblemType::Timeout, "Request timed out")
            .detail("The request was not answered in time; retry it (with its idempotency key).")
    } else {
        tracing::error!(%error, "request failed in the middleware");
        return Problem::internal().into_response();
    };
    problem
        .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        .into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish for at most `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    // Tells every connection to finish its request in flight and close. (hyper-util's
    // `GracefulShutdown` cannot watch a connection that allows upgrades.)
    let (stop, stopping) = tokio::sync::watch::channel(false);
    // Every connection's task, so that the ones still open after the grace period are
    // aborted rather than left running.
    let mut tasks = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // back off a little instead of spinning.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        // With upgrades: the query API's GraphQL subscriptions run over WebSocket (an
        // upgraded connection leaves this loop's count and runs on a task of its own).
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stopping = stopping.clone();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Header timeouts, resets and clients that hang up all end here; none is ours.
            if let Err(err) = ended {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    stop.send_replace(true);
    let finished = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, finished)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "requests still in flight after the shutdown grace period; closing their connections"
        );
    }
    tasks.abort_all();
}

/// One shutdown signal shared by every task of a process (its listeners, its background
/// loops): each waits on a future of its own.
#[derive(Clone)]
pub struct Stopping(tokio::sync::watch::Receiver<bool>);

impl Stopping {
    /// Fires when `shutdown` resolves.
    pub fn on(shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        Self(stopped)
    }

    /// Resolves once the signal fired.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.0.clone();
        async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
    }
}
