//! Ingest: the HTTP endpoint the usage reporter posts events to. An event is acknowledged (202)
//! only after Kafka has it (`acks=all`, idempotent producer); when Kafka cannot take it the answer
//! is 503 and the sender retries. A malformed event is answered 400 and kept on the dead-letter
//! topic with the reason, so nothing a plugin sent is lost silently.

use std::{sync::Arc, time::Duration};

use aigw_common::telemetry;
use aigw_plugin_core::{INGEST_SECRET_HEADER, UsageEvent};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use serde_json::json;
use tracing::Instrument as _;

/// Largest accepted event body.
pub const MAX_BODY: usize = 64 * 1024;

/// Ingest settings.
#[derive(Clone)]
pub struct Settings {
    pub topic: String,
    pub dlq_topic: String,
    /// Expected value of the shared-secret header.
    pub secret: String,
    /// How long a produce may take before the request gets a 503.
    pub produce_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("topic", &self.topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("secret", &"<redacted>")
            .field("produce_timeout", &self.produce_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result_ {
    result: &'static str,
}

/// Ingest counters.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    requests: Family<Result_, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ingest_requests",
            "Usage events received, by result (accepted, invalid, unauthorized, unavailable)",
            m.requests.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&Result_ { result }).inc();
    }
}

struct Ingest {
    settings: Settings,
    producer: FutureProducer,
    metrics: Metrics,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The idempotent, `acks=all` producer of everything billing writes to Kafka (ingest's events,
/// dead letters): a message not acknowledged within `timeout` fails instead of waiting forever.
pub fn producer(
    brokers: &str,
    timeout: Duration,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .create()
}

/// The ingest router: `POST /v1/usage`.
pub fn router(settings: Settings, producer: FutureProducer, metrics: Metrics) -> Router {
    let state = Arc::new(Ingest {
        settings,
        producer,
        metrics,
    });
    Router::new()
        .route("/v1/usage", post(accept))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".to_owned(),
            )
        })
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Compares without an early exit, so the time taken does not reveal a prefix.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn accept(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Too large (over MAX_BODY) or unreadable: still a JSON error.
        Err(e) => {
            ingest.metrics.count("invalid");
            return error(e.status(), "invalid_body", e.body_text());
        }
    };
    let given = headers
        .get(INGEST_SECRET_HEADER)
        .map_or(&[][..], |v| v.as_bytes());
    if !same_secret(given, ingest.settings.secret.as_bytes()) {
        ingest.metrics.count("unauthorized");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing or wrong {INGEST_SECRET_HEADER}"),
        );
    }
    let event = match UsageEvent::parse(&body) {
        Ok(event) => event,
        Err(e) => {
            let reason = e.to_string();
            // Keep what was sent, with the reason, before saying it was refused.
            let record = FutureRecord::<(), _>::to(&ingest.settings.dlq_topic)
                .payload(&body[..])
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "reason",
                            value: Some("malformed"),
                        })
                        .insert(Header {
                            key: "detail",
                            value: Some(reason.as_str()),
                        }),
                );
            if let Err((e, _)) = ingest
                .producer
                .send(record, Timeout::After(ingest.settings.produce_timeout))
                .await
            {
                ingest.metrics.count("unavailable");
                tracing::warn!(error = %e, "dead-letter topic unavailable");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "event log unavailable, retry".to_owned(),
                );
            }
            ingest.metrics.count("invalid");
            return error(StatusCode::BAD_REQUEST, "invalid_event", reason);
        }
    };
    let mut event = event;
    let key = event.dedupe_key();
    // The request's trace, continued: this span's context replaces the reporter's in the event,
    // so the worker's span is this one's child (unchanged when traces are off).
    let span = tracing::info_span!(
        "ingest",
        trace_id = tracing::field::Empty,
        tenant_id = event.tenant.as_str(),
        user_id = event.user.as_str(),
    );
    telemetry::set_parent(
        &span,
        telemetry::from_traceparent(event.trace_parent.as_deref()),
    );
    // (An event without a trace stays without: its row keeps its event id as trace id.)
    if event.trace_parent.is_some()
        && let Some(own) = telemetry::traceparent(&span)
    {
        event.trace_parent = Some(own);
    }
    if let Some(id) = event.trace_parent.as_deref().and_then(telemetry::trace_id) {
        span.record("trace_id", id);
    }
    produce(&ingest, &key, &event).instrument(span).await
}

/// Appends the accepted event to the usage topic and answers the reporter.
async fn produce(ingest: &Ingest, key: &str, event: &UsageEvent) -> Response {
    let payload = match serde_json::to_vec(event) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let record = FutureRecord::to(&ingest.settings.topic)
        .key(key)
        .payload(&payload);
    match ingest
        .producer
        .send(record, Timeout::After(ingest.settings.produce_timeout))
        .await
    {
        Ok(_) => {
            ingest.metrics.count("accepted");
            (StatusCode::ACCEPTED, Json(json!({"accepted": key}))).into_response()
        }
        Err((e, _)) => {
            ingest.metrics.count("unavailable");
            tracing::warn!(error = %e, event = %key, "kafka did not take the event");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "event log unavailable, retry".to_owned(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
