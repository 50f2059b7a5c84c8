//! What a client without a token can do to a public port: add metric series, hold connections
//! open, pile up requests, flood the readiness probe. Each test fails without its bound.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use service_kit::testing::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, problem_on};

/// The methods `http_requests_total` may name; anything else is `other`.
const METHOD_LABELS: &[&str] = &[
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];

/// Probes and metrics (every tenant's volumes) are for operators: served on the ops listener
/// only, never on the port clients reach.
#[tokio::test]
async fn the_public_port_serves_no_probe_and_no_metrics() {
    let app = TestApp::spawn().await;
    for path in ["/metrics", "/health/live", "/health/ready"] {
        let public = app.send(Method::GET, path, None, &[], None).await;
        assert_eq!(public.status, StatusCode::NOT_FOUND, "{path}");
        let ops = app.ops_get(path).await;
        assert_eq!(ops.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn made_up_methods_and_paths_add_no_metric_series() {
    let app = TestApp::spawn().await;
    let mut sent = Vec::new();
    for i in 0..300 {
        let method = format!("XMETHOD{i}");
        let path = format!("/v1/x{}", uuid::Uuid::new_v4().simple());
        let reply = app
            .send(
                Method::from_bytes(method.as_bytes()).unwrap(),
                &path,
                None,
                &[],
                None,
            )
            .await;
        assert!(reply.status.is_client_error(), "{}", reply.status);
        sent.push((method, path));
    }
    let metrics = reqwest::get(format!("{}/metrics", app.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (method, path) in &sent {
        assert!(
            !metrics.contains(method.as_str()),
            "{method} became a label"
        );
        assert!(!metrics.contains(path.as_str()), "{path} became a label");
    }
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("http_requests_total"))
    {
        let method = line
            .split("method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a method label");
        assert!(METHOD_LABELS.contains(&method), "{line}");
    }
    assert!(
        metrics.contains(r#"method="other""#) && metrics.contains(r#"route="unmatched""#),
        "the made-up requests are counted under the catch-all labels"
    );
}

/// Writes `bytes` one at a time, every 100 ms, until the server closes the connection;
/// returns how long that took, or `None` if it was still open at `give_up`.
async fn trickle(address: String, bytes: &'static [u8], give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut socket = TcpStream::connect(address).await.unwrap();
    let mut buffer = [0u8; 1024];
    for byte in bytes.iter().cycle() {
        if started.elapsed() > give_up {
            return None;
        }
        if socket.write_all(&[*byte]).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(100), socket.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            // An answer to headers never finished: the server gave up on them (408).
            Ok(Ok(_)) => return Some(started.elapsed()),
            Err(_) => {}
        }
    }
    unreachable!("cycle never ends")
}

#[tokio::test]
async fn sockets_that_trickle_headers_are_closed_while_real_requests_are_served() {
    let app = TestApp::spawn_adjusted(|config| {
        config.server.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let slow: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(trickle(
                address.clone(),
                b"GET /openapi.json HTTP/1.1\r\nHost: ledger\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa",
                Duration::from_secs(5),
            ))
        })
        .collect();
    // Meanwhile, clients that send whole requests are served.
    for _ in 0..10 {
        let reply = app
            .send(Method::GET, "/openapi.json", None, &[], None)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in slow {
        let closed_after = task
            .await
            .unwrap()
            .expect("a trickling socket was never closed");
        assert!(closed_after < Duration::from_secs(2), "{closed_after:?}");
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = TestApp::spawn_adjusted(|config| {
        config.server.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut socket = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    socket
        .write_all(b"GET /nowhere HTTP/1.1\r\nHost: ledger\r\n\r\n")
        .await
        .unwrap();
    // A small answer, read whole: the connection is then idle.
    let mut buffer = [0u8; 4096];
    let read = socket.read(&mut buffer).await.unwrap();
    assert!(buffer[..read].starts_with(b"HTTP/1.1 404"));
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
        .await
        .expect("the idle connection was never closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Sends a command's headers and half of its body, and holds the request open.
async fn half_sent_command(app: &TestApp) -> TcpStream {
    let mut socket = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"owner\":",
        app.teller()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

#[tokio::test]
async fn requests_beyond_the_in_flight_bound_are_shed_with_retry_after() {
    let app = TestApp::spawn_adjusted(|config| {
        config.server.max_in_flight = 2;
    })
    .await;
    let held = [half_sent_command(&app).await, half_sent_command(&app).await];
    // Both are in their handlers, waiting for the rest of the body.
    let shed = eventually(Duration::from_secs(1), || async {
        let reply = app
            .send(Method::GET, "/openapi.json", None, &[], None)
            .await;
        match reply.status {
            StatusCode::SERVICE_UNAVAILABLE => Ok(reply),
            _ => Err("a third request was admitted beyond the bound of two"),
        }
    })
    .await;
    assert_eq!(shed.problem(), "overloaded");
    assert_eq!(shed.headers["retry-after"], "1");

    drop(held);
    eventually(Duration::from_secs(1), || async {
        let reply = app
            .send(Method::GET, "/openapi.json", None, &[], None)
            .await;
        match reply.status {
            StatusCode::OK => Ok(()),
            _ => Err("the bound was not released when the held requests ended"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_not_answered_in_time_gets_a_503_problem() {
    let app = TestApp::spawn_adjusted(|config| {
        config.server.request_timeout = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let mut socket = half_sent_command(&app).await;
    let response = problem_on(&mut socket, Duration::from_secs(5))
        .await
        .expect("no answer to a request held past the timeout");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.contains("urn:ledger:problem:timeout"),
        "{response}"
    );
    assert!(
        response.to_lowercase().contains("retry-after: 1"),
        "{response}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn a_flood_of_readiness_probes_costs_one_database_check() {
    let app = TestApp::spawn().await;
    let connections = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let ready = app.ops_get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    let before = connections().await;
    let probes = (0..500).map(|_| app.ops_get("/health/ready"));
    for reply in futures::future::join_all(probes).await {
        assert_eq!(reply.status, StatusCode::OK);
    }
    let after = connections().await;
    assert!(
        after <= before + 1,
        "500 probes opened {} database connections",
        after - before
    );
}

/// Beyond `HTTP_MAX_CONNECTIONS`, a connection waits in the kernel's backlog until one of the
/// open ones ends, instead of costing the process a task and a socket.
#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let app = TestApp::spawn_adjusted(|config| {
        config.server.max_connections = 2;
    })
    .await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let held = [
        TcpStream::connect(&address).await.unwrap(),
        TcpStream::connect(&address).await.unwrap(),
    ];
    let url = format!("{}/openapi.json", app.base);
    let mut third = tokio::spawn(async move {
        // A client of its own: a new connection, not one of the held ones.
        reqwest::Client::new()
            .get(url)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third connection was served while two were open"
    );
    drop(held);
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}
