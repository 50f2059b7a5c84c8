//! The process-wide `tracing` subscriber.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{self, ConfigError};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Pretty,
    /// One JSON object per line, for a log pipeline.
    Json,
}

impl LogFormat {
    /// `LOG_FORMAT`: `pretty` (default) or `json`.
    pub fn from_env() -> Result<Self, ConfigError> {
        match config::optional("LOG_FORMAT").as_deref() {
            None | Some("pretty") => Ok(Self::Pretty),
            Some("json") => Ok(Self::Json),
            Some(other) => Err(ConfigError::Invalid {
                name: "LOG_FORMAT",
                reason: format!("expected `pretty` or `json`, got `{other}`"),
            }),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`). Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
