//! The process-wide `tracing` subscriber, and OpenTelemetry traces when configured.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported by OTLP over HTTP, and a
//! trace crosses the system: the request span continues the caller's W3C `traceparent`, the
//! command writes its own span's `traceparent` into the event metadata, the relay copies it
//! into the Kafka headers, and the projector and the process manager continue it for each
//! message. Unset (the default), nothing is exported and none of this costs anything.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
pub use opentelemetry_otlp::Protocol;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_log::NormalizeEvent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ConfigError, Optional, Setting, Value};

/// Whether spans are exported: only then is there a span context worth propagating.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub const LOG_FORMAT: Setting<LogFormat> = Setting::new(
    "LOG_FORMAT",
    LogFormat::Pretty,
    "`json` for one JSON object per line",
);
/// Read by [`init`]; a filter it cannot parse counts as unset.
pub const RUST_LOG: Setting<&str> = Setting::new("RUST_LOG", "info", "log filter");
pub const OTEL_EXPORTER_OTLP_ENDPOINT: Optional<&str> = Optional::new(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "(none)",
    "OpenTelemetry collector for traces, by OTLP (`http://jaeger:4318`); unset: no export",
);
pub const OTEL_EXPORTER_OTLP_PROTOCOL: Setting<Protocol> = Setting::new(
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    Protocol::HttpBinary,
    "`http/json` for collectors that take OTLP as JSON",
);
pub const OTEL_SERVICE_NAME: Optional<&str> = Optional::new(
    "OTEL_SERVICE_NAME",
    "the service",
    "the service name the traces carry; the compose file and `deploy/k8s/` set it for each process",
);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Pretty,
    /// One JSON object per line, for a log pipeline.
    Json,
}

impl LogFormat {
    /// [`LOG_FORMAT`].
    pub fn from_env() -> Result<Self, ConfigError> {
        LOG_FORMAT.read()
    }
}

impl Value for LogFormat {
    type Owned = Self;
    fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("expected `pretty` or `json`, got `{other}`")),
        }
    }
    fn to_owned_value(&self) -> Self {
        *self
    }
    fn show(&self) -> String {
        match self {
            Self::Pretty => "pretty",
            Self::Json => "json",
        }
        .to_owned()
    }
}

impl Value for Protocol {
    type Owned = Self;
    fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "http/protobuf" => Ok(Self::HttpBinary),
            "http/json" => Ok(Self::HttpJson),
            other => Err(format!(
                "expected `http/protobuf` or `http/json`, got `{other}`"
            )),
        }
    }
    fn to_owned_value(&self) -> Self {
        *self
    }
    fn show(&self) -> String {
        match self {
            Self::HttpBinary => "http/protobuf",
            Self::HttpJson => "http/json",
            // Not built in, so never parsed from a setting.
            Self::Grpc => "grpc",
        }
        .to_owned()
    }
}

/// Where traces go, if anywhere.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// [`OTEL_EXPORTER_OTLP_ENDPOINT`], e.g. `http://jaeger:4318`; `None`: no export.
    pub endpoint: Option<String>,
    /// [`OTEL_SERVICE_NAME`], defaulting to the process's own name.
    pub service_name: String,
    /// [`OTEL_EXPORTER_OTLP_PROTOCOL`].
    pub protocol: Protocol,
}

impl TracingConfig {
    pub fn from_env(service: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            endpoint: OTEL_EXPORTER_OTLP_ENDPOINT.read()?,
            service_name: OTEL_SERVICE_NAME.read()?.unwrap_or_else(|| service.into()),
            protocol: OTEL_EXPORTER_OTLP_PROTOCOL.read()?,
        })
    }
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard at once stops trace export"]
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(error = %err, "flushing traces failed");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber: log lines (filtered by [`RUST_LOG`]) and, when
/// configured, the OTLP exporter. Call once, from `main`, and keep the guard until exit.
pub fn init(format: LogFormat, tracing: &TracingConfig) -> Result<TelemetryGuard, TelemetryError> {
    let provider = tracing
        .endpoint
        .as_ref()
        .map(|endpoint| tracer_provider(endpoint, tracing))
        .transpose()?;
    // `RUST_LOG` filters the log lines only: spans are exported at `info` whatever it says,
    // so quieter logs do not silently cut the traces.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ledger"))
            .with_filter(LevelFilter::INFO)
    });
    let filter =
        EnvFilter::try_new(RUST_LOG.read()?).unwrap_or_else(|_| EnvFilter::new(RUST_LOG.default));
    let logs = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_span_events(FmtSpan::NONE)
            .boxed(),
        // json-subscriber writes the same lines as tracing-subscriber's JSON format but keeps
        // each span's fields serialised once, where the latter parses them back from text for
        // every line, which perf found a sixth of the query API's CPU per read.
        LogFormat::Json => {
            let mut layer = json_subscriber::fmt::layer().flatten_event(true);
            // Records of the `log` crate (librdkafka's, through rdkafka) reach `tracing` with
            // the target `log`: named by their own, as tracing-subscriber's format did.
            layer
                .inner_layer_mut()
                .add_dynamic_field("target", |event, _| {
                    Some(
                        event
                            .normalized_metadata()
                            .map_or(Cow::Borrowed(event.metadata().target()), |metadata| {
                                Cow::Owned(metadata.target().to_owned())
                            }),
                    )
                });
            layer.boxed()
        }
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(TelemetryGuard(provider))
}

fn tracer_provider(
    endpoint: &str,
    tracing: &TracingConfig,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let traces = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(tracing.protocol)
        .with_endpoint(traces)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(tracing.service_name.clone())
                .build(),
        )
        .build())
}

/// Whether spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` is set).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` a child of the W3C `traceparent` it was handed (an HTTP header, a Kafka
/// header), so the trace continues here. Does nothing when not exporting or when absent.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|_| exporting()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only if the span is disabled, which leaves nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` of the current span, to hand on (event metadata, Kafka headers); `None`
/// when not exporting.
pub fn current_traceparent() -> Option<String> {
    if !exporting() {
        return None;
    }
    let context = Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}
