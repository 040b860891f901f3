//! What every AIGateway service binary shares.
//!
//! - [`OpsArgs`]: the flags (and env vars) every binary takes for logging and its ops listener.
//! - [`init_tracing`]: JSON logs by default (the seed's log format), text for local development;
//!   OpenTelemetry traces over OTLP when an endpoint is configured ([`telemetry`]).
//! - [`ops`]: `/healthz`, `/readyz` and `/metrics` on a separate listener, so probes and scrapes
//!   never queue behind product traffic.
//! - [`shutdown`]: a future that resolves on SIGTERM or Ctrl-C, for graceful shutdown.

pub mod events;
pub mod logfmt;
pub mod ops;
pub mod probe;
#[cfg(feature = "redis")]
pub mod quota;
pub mod secret;
pub mod shutdown;
pub mod telemetry;

use std::net::SocketAddr;

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (production; what log shippers expect).
    Json,
    /// Human-readable lines (local development).
    Text,
}

/// Flags shared by every service binary.
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// Address of the ops listener serving `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "AIGW_OPS_ADDR")]
    pub ops_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "AIGW_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter in `tracing` `EnvFilter` syntax, e.g. `info,aigw_operator=debug`.
    #[arg(long, env = "AIGW_LOG", default_value = "info")]
    pub log: String,
}

/// Errors while setting up process-wide state.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid log filter {filter:?}: {source}")]
    LogFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialised,
    #[error("traces: {0}")]
    Telemetry(String),
}

/// Installs the global tracing subscriber: logs in `format` filtered by `filter`, and, when an
/// OTLP endpoint is configured, span export ([`telemetry`]). Keep the returned guard until the
/// process ends: dropping it flushes the spans not yet sent.
///
/// # Errors
/// A malformed filter, a subscriber already installed, or an exporter that cannot be built.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<telemetry::Guard, InitError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| InitError::LogFilter {
        filter: filter.to_owned(),
        source,
    })?;
    let seed = logfmt::SeedJson::for_this_process();
    let provider = if telemetry::enabled() {
        Some(telemetry::provider(seed.service()).map_err(InitError::Telemetry)?)
    } else {
        None
    };
    let otel = provider.as_ref().map(telemetry::layer);
    let registry = tracing_subscriber::registry().with(env_filter).with(otel);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .fmt_fields(fmt::format::JsonFields::new())
                    .event_format(seed),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(true)).try_init(),
    };
    result.map_err(|_| InitError::AlreadyInitialised)?;
    Ok(telemetry::guard(provider))
}
