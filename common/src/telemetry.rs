//! Traces: OpenTelemetry over OTLP/HTTP (protobuf), on when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the service name
//! is `OTEL_SERVICE_NAME` or the binary's name. The W3C trace context (`traceparent`) is the one
//! propagation format: authz continues the trace the request arrives with (or starts one) and hands
//! its own context on in its answer; Higress's ext-auth copies it onto the request; the usage
//! reporter puts it in the usage event; ingest and the worker continue from it. So one request is
//! one trace from authz to the billed row (`usage_logs.trace_id`).
//!
//! Spans are `tracing` spans (the `tracing-opentelemetry` layer exports them); their `trace_id`,
//! `tenant_id` and `user_id` fields also appear on every log line inside them (`logfmt`).

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C propagator's field this glue reads and writes (the contract's constant, used by authz,
/// the operator's ext-auth config and the reporter, is `aigw_plugin_core::headers::TRACEPARENT`).
const TRACEPARENT: &str = "traceparent";

/// Keeps the exporter running; dropping it flushes the spans not yet sent (hold it in `main`).
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the exporter"]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether traces are to be exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// The tracer provider for `service`, exporting in batches (`OTEL_BSP_*` tune them).
pub(crate) fn provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}

/// The `tracing` layer exporting spans through `provider`.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("aigateway"))
}

pub(crate) fn guard(provider: Option<SdkTracerProvider>) -> Guard {
    Guard(provider)
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct One<'a>(Option<&'a str>);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0).flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct Out(Option<String>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// The remote context a `traceparent` value names (empty when absent or malformed).
pub fn from_traceparent(traceparent: Option<&str>) -> Context {
    TraceContextPropagator::new().extract(&One(traceparent))
}

/// The remote context of a request's `traceparent` header.
pub fn from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Makes `parent` (when valid) the parent of `span`.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// `span`'s own context as a `traceparent` value, when traces are on.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Out(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// The trace id (32 hex digits) of a `traceparent` value. (The W3C propagator parses leniently;
/// values from outside are checked strictly first: `aigw_plugin_core::is_traceparent`.)
pub fn trace_id(traceparent: &str) -> Option<String> {
    let cx = from_traceparent(Some(traceparent));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_values_are_checked() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
