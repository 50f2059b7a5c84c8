//! Traces leave the process by OTLP and continue the caller's trace. Its own test binary: it
//! installs the process-wide subscriber.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use service_kit::telemetry::{self, LogFormat, Protocol, TracingConfig};

const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

#[tokio::test]
async fn spans_continue_the_callers_trace_and_reach_the_collector() {
    // A collector that keeps what it is sent.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    let collector = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let guard = telemetry::init(
        LogFormat::Pretty,
        &TracingConfig {
            endpoint: Some(endpoint),
            service_name: "trace-test".into(),
            protocol: Protocol::HttpJson,
        },
    )
    .unwrap();
    assert!(telemetry::exporting());

    let span = tracing::info_span!("request");
    telemetry::continue_trace(&span, Some(&format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")));
    let handed_on = span.in_scope(telemetry::current_traceparent).unwrap();
    let parts: Vec<&str> = handed_on.split('-').collect();
    assert_eq!(parts[1], CALLER_TRACE, "the trace continues");
    assert_ne!(parts[2], CALLER_SPAN, "under a span of our own");
    drop(span);

    // Dropping the guard flushes; the exporter's HTTP client blocks, so not on this thread.
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    let received = received.lock().unwrap().join("\n");
    assert!(received.contains(CALLER_TRACE), "{received}");
    assert!(received.contains(parts[2]), "{received}");
    assert!(received.contains("trace-test"), "{received}");
}
