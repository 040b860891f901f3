//! The authz HTTP endpoint for Higress `ext-auth` in `forward_auth` mode: any method, any path.
//! 200 with the `x-aigw-*` headers admits the request; anything else is returned to the client.

use std::{sync::Arc, time::Instant};

use aigw_common::{
    quota::{ADMIT, PendingKeys, RETIRE, Reservation, TokenKeys, seen_key},
    telemetry,
};
use aigw_plugin_core::{
    EVENT_VERSION, Outcome as UsageOutcome, TokenUsage, UsageEvent, estimate, headers,
};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use k8s_openapi::jiff::Timestamp;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use redis::aio::ConnectionManager;
use tracing::Instrument as _;

use super::{
    decide::{self, Denial},
    index::Index,
    request,
};

/// Authz settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Output tokens reserved for a request that sets no output limit (`max_tokens`, …).
    pub reserve_estimate: i64,
    /// The most requests one quota-limited token may have in flight (0: no cap).
    pub max_in_flight: i64,
    /// Where admitted requests are recorded until billed (`aigw_common::quota::PENDING`).
    pub pending: PendingKeys,
    /// How long an unsettled reservation holds quota, in milliseconds.
    pub reservation_ttl_ms: i64,
    /// Admit requests when Redis is unreachable (default: refuse with 503).
    pub fail_open: bool,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Authz metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub decisions: Family<Outcome, Counter>,
    pub latency: Histogram,
    pub index_tokens: Gauge,
    pub redis_errors: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            decisions: Family::default(),
            latency: Histogram::new([
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
            ]),
            index_tokens: Gauge::default(),
            redis_errors: Counter::default(),
        };
        registry.register(
            "authz_decisions",
            "Authz decisions by outcome",
            m.decisions.clone(),
        );
        registry.register(
            "authz_latency_seconds",
            "Authz decision latency",
            m.latency.clone(),
        );
        registry.register(
            "authz_index_tokens",
            "Tokens in the authz index",
            m.index_tokens.clone(),
        );
        registry.register(
            "authz_redis_errors",
            "Redis failures during authz",
            m.redis_errors.clone(),
        );
        m
    }
}

/// Shared state of the endpoint.
#[derive(Clone)]
pub struct Authz {
    pub index: Index,
    pub redis: ConnectionManager,
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    admit: Arc<redis::Script>,
    retire: Arc<redis::Script>,
}

impl std::fmt::Debug for Authz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authz")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Authz {
    pub fn new(
        index: Index,
        redis: ConnectionManager,
        settings: Settings,
        metrics: Metrics,
    ) -> Self {
        Self {
            index,
            redis,
            settings: Arc::new(settings),
            metrics,
            admit: Arc::new(redis::Script::new(ADMIT)),
            retire: Arc::new(redis::Script::new(RETIRE)),
        }
    }
}

/// Keeps the index-size gauge current every few seconds, off the request path.
pub fn spawn_index_gauge(authz: &Authz) -> tokio::task::JoinHandle<()> {
    let (index, gauge) = (authz.index.clone(), authz.metrics.index_tokens.clone());
    tokio::spawn(async move {
        loop {
            gauge.set(i64::try_from(index.len()).unwrap_or(i64::MAX));
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    })
}

/// The authz router: `GET /v1/models` (reached by clients through the operator's `aigw-models`
/// route) lists the models a key may call; every other path and method is a decision (ext-auth
/// calls `/authz`).
pub fn router(state: Authz) -> Router {
    Router::new()
        .route(MODELS_PATH, axum::routing::get(models))
        .fallback(handle)
        .layer(DefaultBodyLimit::max(
            aigw_plugin_core::AUTHZ_MAX_BODY_BYTES,
        ))
        .with_state(state)
}

/// The OpenAI-compatible model list path.
pub const MODELS_PATH: &str = "/v1/models";

/// `GET /v1/models`: the models the key may call, in OpenAI's list shape, after the same checks
/// on key, domain and token as a request (an unknown key learns nothing).
async fn models(State(authz): State<Authz>, mut headers: HeaderMap) -> Response {
    let now = Timestamp::now().as_millisecond();
    // Reached straight through a route (no ext-auth in between): the client's own `Host` is the
    // domain; an `X-Forwarded-Host` here is whatever the client wrote.
    headers.remove("x-forwarded-host");
    match decide::check(&authz.index, &headers, now) {
        Ok(admitted) => {
            let data: Vec<serde_json::Value> = authz
                .index
                .models_for(&admitted.token)
                .into_iter()
                .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "aigateway"}))
                .collect();
            Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(denial) => (denial.status(), Json(denial.body())).into_response(),
    }
}

async fn handle(State(authz): State<Authz>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    // The request's trace (the client's `traceparent`, or a new one when traces are on); its
    // fields go on every log line of the decision, and its context back to the gateway.
    let span = tracing::info_span!(
        "authz",
        trace_id = tracing::field::Empty,
        tenant_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    telemetry::set_parent(&span, telemetry::from_headers(&headers));
    let traceparent = telemetry::traceparent(&span).or_else(|| {
        header(&headers, aigw_plugin_core::headers::TRACEPARENT)
            .filter(|v| aigw_plugin_core::is_traceparent(v))
            .map(str::to_owned)
    });
    if let Some(id) = traceparent.as_deref().and_then(telemetry::trace_id) {
        span.record("trace_id", id);
    }
    let result = decide(&authz, &headers, &body)
        .instrument(span.clone())
        .await;
    authz
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    let mut response = respond(&authz, result);
    if let Some(v) = traceparent.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response
            .headers_mut()
            .insert(aigw_plugin_core::headers::TRACEPARENT, v);
    }
    response
}

/// The answer to a decision, counted by outcome.
fn respond(authz: &Authz, result: Result<Allow, Denial>) -> Response {
    match result {
        Ok(allow) => {
            authz
                .metrics
                .decisions
                .get_or_create(&Outcome { outcome: "allowed" })
                .inc();
            allow.into_response()
        }
        Err(denial) => {
            authz
                .metrics
                .decisions
                .get_or_create(&Outcome {
                    outcome: denial.outcome(),
                })
                .inc();
            let mut resp = (denial.status(), Json(denial.body())).into_response();
            if let Denial::RateLimited { retry_after_ms } = denial {
                let secs = (retry_after_ms + 999) / 1000;
                if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                    resp.headers_mut().insert("retry-after", v);
                }
            }
            resp
        }
    }
}

/// An admitted request: the headers Higress passes upstream.
#[derive(Debug)]
pub struct Allow {
    pub tenant: String,
    pub user: String,
    pub token: String,
    pub reservation: Reservation,
    /// The request's id, issued here: the usage event id (see [`headers::EVENT_ID`]).
    pub event_id: String,
    /// The estimate the reservation was sized from (prompt, completion tokens).
    pub estimate: (i64, i64),
    /// The request's fallback grant (see [`headers::GRANT`]).
    pub grant: String,
}

impl IntoResponse for Allow {
    fn into_response(self) -> Response {
        let mut h = HeaderMap::new();
        let (prompt, completion) = self.estimate;
        let pairs = [
            (headers::TENANT, self.tenant),
            (headers::USER, self.user),
            (headers::TOKEN, self.token.clone()),
            (headers::RESERVATION, self.reservation.to_string()),
            (headers::EVENT_ID, self.event_id),
            (
                headers::ESTIMATE,
                estimate::format(prompt.unsigned_abs(), completion.unsigned_abs()),
            ),
            (headers::CONSUMER, self.token),
            (headers::GRANT, self.grant),
        ];
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(k), v);
            }
        }
        (StatusCode::OK, h).into_response()
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// How long a retired first pass stays marked as applied: as long as the billing worker keeps
/// its own dedupe keys by default (`AIGW_DEDUPE_TTL_SECS`), far beyond any late report.
const RETIRED_TTL_SECS: u64 = 7 * 24 * 3600;

async fn decide(authz: &Authz, headers: &HeaderMap, body: &[u8]) -> Result<Allow, Denial> {
    let now = Timestamp::now().as_millisecond();
    // Who first (an unknown key learns nothing about endpoints), then what is asked for.
    let (admitted, second_pass) = match header(headers, headers::FALLBACK) {
        Some(value) => (fallback(authz, headers, value, now).await?, true),
        None => (decide::check(&authz.index, headers, now)?, false),
    };
    admit(authz, admitted, headers, body, now, second_pass).await
}

/// The second pass of a request Envoy's fallback redirect sent to the next tier, admitted on its
/// first pass's `<event id>.<grant>` ([`headers::FALLBACK`]): the client's key is gone by then
/// (ai-proxy put the provider's in `Authorization`). The grant record gives the key hash, the
/// pending event the token; both must agree, and token and tenant must still be in good
/// standing. The host is only checked not to be another tenant's domain (the second pass usually
/// carries the provider's host). The first pass is retired in the same Redis script —
/// reservation released, never swept, its report dropped — so the request is billed once, as the
/// second pass. The grant is random, appears nowhere outside the gateway, and is good once while
/// its first pass is pending: a client-sent value is refused like an unknown key.
async fn fallback(
    authz: &Authz,
    headers: &HeaderMap,
    value: &str,
    now: i64,
) -> Result<decide::Admitted, Denial> {
    let (first, grant) = value.split_once('.').ok_or(Denial::InvalidKey)?;
    let mut conn = authz.redis.clone();
    // The pending event names tenant and token; the grant record holds the grant and the key
    // hash the first pass was admitted under (`<grant>:<hash>`).
    let (pending, recorded): (Option<String>, Option<String>) = redis::pipe()
        .cmd("HGET")
        .arg(&authz.settings.pending.events)
        .arg(first)
        .cmd("HGET")
        .arg(&authz.settings.pending.grants)
        .arg(first)
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_down(authz, &e))?;
    let event = pending
        .and_then(|p| UsageEvent::parse(p.as_bytes()).ok())
        .ok_or(Denial::InvalidKey)?;
    let recorded = recorded.ok_or(Denial::InvalidKey)?;
    let hash = match recorded.split_once(':') {
        Some((g, h)) if g == grant => h.to_owned(),
        _ => return Err(Denial::InvalidKey),
    };
    let token = authz
        .index
        .token(&hash)
        .filter(|t| t.token_id.to_string() == event.token)
        .ok_or(Denial::InvalidKey)?;
    let tenant = authz
        .index
        .tenant(&token.tenant)
        .filter(|t| t.id.to_string() == event.tenant)
        .ok_or(Denial::InvalidKey)?;
    // Never on another tenant's domain. (A real second pass usually carries the top tier's
    // provider host: ai-proxy's `x-envoy-original-host` is removed at the router. The grant's
    // secrecy is the control; this only stops a grant used on another tenant's domain.)
    if let Some(host) = decide::host(headers)
        && !tenant.serves(&host)
        && authz.index.any_tenant_serves(&host)
    {
        return Err(Denial::InvalidKey);
    }
    let admitted = decide::standing(hash, token, tenant, now)?;
    let keys = TokenKeys::new(&admitted.hash);
    let retired: i64 = authz
        .retire
        .key(&authz.settings.pending.set)
        .key(&authz.settings.pending.events)
        .key(&keys.reserved)
        .key(&keys.reservations)
        .key(&keys.expiries)
        .key(seen_key(&event.dedupe_key()))
        .key(&authz.settings.pending.grants)
        .arg(first)
        .arg(RETIRED_TTL_SECS)
        .arg(&recorded)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| redis_down(authz, &e))?;
    if retired == 1 {
        tracing::info!(
            first_pass = first,
            token = admitted.token.token_id,
            "fallback: second pass admitted, first pass retired"
        );
        Ok(admitted)
    } else {
        // Retired by another second pass a moment ago, or billed: the grant is used up.
        Err(Denial::InvalidKey)
    }
}

/// A fallback's second pass when Redis cannot be reached: refused (it has no key to fall open
/// on), and counted.
fn redis_down(authz: &Authz, e: &redis::RedisError) -> Denial {
    authz.metrics.redis_errors.inc();
    tracing::warn!(error = %e, "redis unreachable during a fallback's authz");
    Denial::Unavailable
}

/// What is asked for (endpoint, model, size), then rate, quota and the pending record in Redis.
async fn admit(
    authz: &Authz,
    admitted: decide::Admitted,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    second_pass: bool,
) -> Result<Allow, Denial> {
    // Who is asking, on the request's span: every log line from here on carries it.
    let span = tracing::Span::current();
    span.record("tenant_id", admitted.tenant.id);
    span.record("user_id", &*admitted.token.owner);
    let shape = request::shape(
        header(headers, "x-forwarded-uri"),
        header(headers, headers::MODEL),
        body,
        authz.settings.reserve_estimate,
    )?;
    let token = &admitted.token;
    decide::model_allowed(token, &shape.model)?;
    if shape.stream_usage_implicit && authz.index.generic_serves(&shape.model) {
        return Err(Denial::StreamUsageRequired(shape.model));
    }
    let quota = token.quota;
    let estimate = if quota >= 0 { shape.estimate() } else { 0 };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let grant = uuid::Uuid::new_v4().simple().to_string();
    let reservation_if_held = if quota >= 0 {
        Reservation::Held {
            id: id.clone(),
            amount: estimate,
        }
    } else {
        Reservation::None
    };
    // What billing charges if this request's usage report never arrives (see quota::PENDING).
    let pending = UsageEvent {
        version: EVENT_VERSION,
        event_id: id.clone(),
        tenant: admitted.tenant.id.to_string(),
        user: token.owner.to_string(),
        token: token.token_id.to_string(),
        channel: String::new(),
        model: shape.model.clone(),
        response_model: None,
        reservation: reservation_if_held.to_string(),
        usage: TokenUsage::default(),
        estimated: true,
        estimate: Some(TokenUsage {
            prompt_tokens: Some(shape.prompt.unsigned_abs()),
            completion_tokens: Some(shape.completion.unsigned_abs()),
            ..TokenUsage::default()
        }),
        stream: false,
        status: 0,
        outcome: UsageOutcome::Unreported,
        error: Some("no usage report arrived before the reservation expired".into()),
        started_at_ms: now,
        ended_at_ms: now,
        // The sweep bills it in the request's own trace.
        trace_parent: aigw_common::telemetry::traceparent(&tracing::Span::current()),
    };
    let pending = serde_json::to_string(&pending).unwrap_or_default();
    let keys = TokenKeys::new(&admitted.hash);
    let mut invocation = authz.admit.prepare_invoke();
    for k in keys.all() {
        invocation.key(k);
    }
    invocation
        .key(&authz.settings.pending.set)
        .key(&authz.settings.pending.events)
        .key(&authz.settings.pending.grants)
        // A fallback's second pass is the same request: its first pass took the RPM slot.
        .arg(if second_pass { 0 } else { token.rate_limit })
        .arg(quota)
        .arg(estimate)
        .arg(authz.settings.reservation_ttl_ms)
        .arg(&id)
        .arg(authz.settings.max_in_flight)
        .arg(&pending)
        .arg(token.used_floor)
        .arg(format!("{grant}:{}", admitted.hash));
    let mut conn = authz.redis.clone();
    let reservation = match invocation.invoke_async::<(i64, i64)>(&mut conn).await {
        Ok((0, _)) => reservation_if_held,
        Ok((1, retry_after_ms)) => return Err(Denial::RateLimited { retry_after_ms }),
        Ok((3, _)) => return Err(Denial::TooManyInFlight),
        Ok(_) => return Err(Denial::InsufficientQuota),
        Err(e) => {
            authz.metrics.redis_errors.inc();
            tracing::warn!(error = %e, "redis unreachable during authz");
            if !authz.settings.fail_open {
                return Err(Denial::Unavailable);
            }
            Reservation::None
        }
    };
    Ok(Allow {
        tenant: admitted.tenant.id.to_string(),
        user: token.owner.to_string(),
        token: token.token_id.to_string(),
        reservation,
        event_id: id,
        estimate: (shape.prompt, shape.completion),
        grant,
    })
}
