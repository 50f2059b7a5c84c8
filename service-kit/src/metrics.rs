//! Prometheus metrics: one recorder per process, rendered by `GET /metrics`.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` histograms), and every
//! series carries a `service` label so one dashboard can show all processes. The names are a
//! contract with `deploy/prometheus` and `deploy/grafana`: change them together.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::db::kept::KeptConnections;

/// Request latency buckets, in seconds: from a cached read to a request that waited for a
/// read model.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Events per batch (`*_batch_events`): a group commit's, from one command's few up to the many
/// commands of a full batch, and a relay batch's, up to `RELAY_BATCH_SIZE` (1000 by default).
const BATCH_EVENTS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How often pending histogram samples are folded into buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder, labelling every series with `service`; returns the handle
/// that renders them. Later calls (several services in one test process) return the first
/// handle.
pub fn install(service: &'static str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .add_global_label("service", service)
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the latency buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Suffix("_batch_events".into()),
                    BATCH_EVENTS_BUCKETS,
                )
                .expect("the batch event buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            // Histogram samples are folded into their buckets only by upkeep (or a scrape):
            // without it, a process nobody scrapes would keep every sample.
            let upkeep = handle.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// Middleware: counts and times every request by method, route template (never the raw path,
/// which would make one series per account) and status. Every label comes from a closed set,
/// so no request, with or without a token, can add series.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    // Probes and scrapes come every few seconds from machines: counted, they would drown the
    // clients' traffic in the rate and latency panels.
    if route == "/metrics" || route.starts_with("/health/") {
        return next.run(request).await;
    }
    let response = next.run(request).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, anything else (hyper accepts any token
/// as a method) as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Samples the pool's use; called on each scrape, so the gauges are as fresh as the scrape.
/// Connections `kept` out of the pool are `kept_idle` while they wait for their next use, apart
/// from `idle`: to the pool they are in use, yet nothing else can take them, so
/// `LedgerDbPoolSaturated` compares `in_use` with the maximum less `kept_idle` (what can still
/// be taken). Counted in use, a query API that keeps half its pool looked half saturated at
/// rest; counted idle, its shared half could run out while the alert saw half a pool free.
pub fn record_pool(pool: &PgPool, kept: Option<&KeptConnections>) {
    let size = pool.size() as f64;
    let idle = pool.num_idle() as f64;
    let kept_idle = kept.map_or(0, KeptConnections::idle) as f64;
    metrics::gauge!("ledger_db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("ledger_db_pool_connections", "state" => "kept_idle").set(kept_idle);
    metrics::gauge!("ledger_db_pool_connections", "state" => "in_use").set(size - idle - kept_idle);
    metrics::gauge!("ledger_db_pool_max_connections")
        .set(f64::from(pool.options().get_max_connections()));
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::db::{DatabaseConfig, connect};
    use crate::testing::TestDatabase;

    /// `ledger_db_pool_connections{state}` as [`record_pool`] sets it.
    fn connections(pool: &PgPool, kept: &KeptConnections, state: &str) -> f64 {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || record_pool(pool, Some(kept)));
        let text = recorder.handle().render();
        let prefix = format!(r#"ledger_db_pool_connections{{state="{state}"}} "#);
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {state} gauge in {text}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn a_kept_connection_counts_as_in_use_only_while_it_is() {
        let database = TestDatabase::create().await;
        let pool = connect(&DatabaseConfig {
            max_connections: 4,
            ..database.config.clone()
        })
        .await
        .unwrap();
        let kept = KeptConnections::new(pool.clone(), 2);
        let mut connection = kept.get().await.unwrap();
        let used = sqlx::query("SELECT 1").execute(&mut *connection).await;
        assert_eq!(connections(&pool, &kept, "in_use"), 1.0);
        assert_eq!(connections(&pool, &kept, "kept_idle"), 0.0);
        connection.keep_if_usable(&used);
        assert_eq!(
            connections(&pool, &kept, "in_use"),
            0.0,
            "a kept connection waiting for its next use was counted in use"
        );
        assert_eq!(
            connections(&pool, &kept, "kept_idle"),
            1.0,
            "a kept connection waiting for its next use was not counted kept"
        );
        assert_eq!(
            connections(&pool, &kept, "idle"),
            0.0,
            "a kept connection was counted as one the pool can hand out"
        );
    }
}
