//! The pure part of an authz decision: key → token → tenant → host, status, expiry, model.
//! Rate limits and quota are decided in Redis afterwards (`service`).

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::index::{Index, TenantRecord, TokenRecord};

/// Why a request is refused, with the status and OpenAI-style error body it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No key, unknown key, or a key whose tenant does not serve this host (no hint which).
    InvalidKey,
    TenantSuspended,
    Disabled,
    Expired,
    Exhausted,
    ModelNotAllowed(String),
    RateLimited {
        retry_after_ms: i64,
    },
    InsufficientQuota,
    /// Redis could not be reached and the gate fails closed.
    Unavailable,
    /// A path whose usage cannot be metered (yet): not served.
    UnsupportedEndpoint(String),
    /// The body is not JSON.
    InvalidBody,
    /// The body names no model.
    ModelRequired,
    /// `x-higress-llm-model` differs from the body's model.
    ModelMismatch,
    /// A stream with `stream_options.include_usage` other than `true`.
    UsageSuppressed,
    /// An output limit (`max_tokens`, …, `n`) that is not a positive integer.
    InvalidLimit(&'static str),
    /// The token already has as many requests in flight as it may.
    TooManyInFlight,
    /// A stream of a model a `generic` channel serves, without `include_usage: true`: nothing on
    /// the way would ask that provider for usage.
    StreamUsageRequired(String),
}

impl Denial {
    /// Status, `type`, `code`, message.
    #[allow(clippy::too_many_lines)] // one arm per denial
    fn parts(&self) -> (StatusCode, &'static str, &'static str, String) {
        match self {
            Self::InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                "Incorrect API key provided.".into(),
            ),
            Self::TenantSuspended => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "account_suspended",
                "This account is suspended.".into(),
            ),
            Self::Disabled => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "api_key_disabled",
                "This API key is disabled.".into(),
            ),
            Self::Expired => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "api_key_expired",
                "This API key has expired.".into(),
            ),
            Self::Exhausted | Self::InsufficientQuota => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
                "You exceeded your current quota.".into(),
            ),
            Self::ModelNotAllowed(m) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "model_not_allowed",
                format!("This API key may not use the model `{m}`."),
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached for requests per minute.".into(),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "authz_unavailable",
                "The gateway cannot authorise requests right now; retry shortly.".into(),
            ),
            Self::UnsupportedEndpoint(p) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unsupported_endpoint",
                format!(
                    "`{p}` is not available on this gateway (served: /v1/chat/completions, \
                     /v1/completions, /v1/embeddings, /v1/responses, /v1/messages)."
                ),
            ),
            Self::InvalidBody => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_body",
                "The request body must be a JSON object.".into(),
            ),
            Self::ModelRequired => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_required",
                "The request body must name a `model`.".into(),
            ),
            Self::ModelMismatch => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_mismatch",
                "The x-higress-llm-model header does not match the body's `model`.".into(),
            ),
            Self::UsageSuppressed => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "stream_usage_required",
                "Streams must report usage on this gateway: leave `stream_options.include_usage` out or set it to true."
                    .into(),
            ),
            Self::InvalidLimit(field) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_limit",
                format!("`{field}` must be a positive integer."),
            ),
            Self::StreamUsageRequired(m) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "stream_usage_required",
                format!(
                    "Streams of `{m}` must set `stream_options.include_usage` to true on this gateway."
                ),
            ),
            Self::TooManyInFlight => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "too_many_requests_in_flight",
                "Too many requests of this API key are in progress; retry when one finishes."
                    .into(),
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// `{"error": {"message", "type", "code", "param": null}}`, as OpenAI answers.
    pub fn body(&self) -> Value {
        let (_, kind, code, message) = self.parts();
        json!({"error": {"message": message, "type": kind, "code": code, "param": null}})
    }

    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        self.parts().2
    }
}

/// The API key of a request: `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(aigw_plugin_core::headers::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let key = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))?;
        return Some(key.trim()).filter(|k| !k.is_empty());
    }
    headers
        .get(aigw_plugin_core::headers::API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The request host Higress forwards (`X-Forwarded-Host`, else `Host`), lowercase, no port.
pub fn host(headers: &HeaderMap) -> Option<String> {
    let raw = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get("host"))
        .and_then(|v| v.to_str().ok())?;
    let first = raw.split(',').next()?.trim();
    let no_port = match first.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => first,
    };
    Some(no_port.to_ascii_lowercase())
}

/// An admitted request before the Redis checks.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub hash: String,
    pub token: std::sync::Arc<TokenRecord>,
    pub tenant: std::sync::Arc<TenantRecord>,
}

/// The checks on who is asking that need no I/O (the model is checked against the request's
/// body afterwards: [`model_allowed`]).
pub fn check(index: &Index, headers: &HeaderMap, now_ms: i64) -> Result<Admitted, Denial> {
    let key = api_key(headers).ok_or(Denial::InvalidKey)?;
    let digest = aigw_crds::token::api_key_digest(key);
    let token = index.token_by_digest(&digest).ok_or(Denial::InvalidKey)?;
    let hash = hex::encode(digest);
    let tenant = index.tenant(&token.tenant).ok_or(Denial::InvalidKey)?;
    // A key presented on another tenant's domain looks exactly like an unknown key.
    let host = host(headers).ok_or(Denial::InvalidKey)?;
    if !tenant.serves(&host) {
        return Err(Denial::InvalidKey);
    }
    standing(hash, token, tenant, now_ms)
}

/// The checks on a token and its tenant that hold whatever the request: suspended, disabled,
/// expired, exhausted. A fallback's second pass (admitted on its first pass's event, without
/// key or domain) goes through these again.
pub fn standing(
    hash: String,
    token: std::sync::Arc<TokenRecord>,
    tenant: std::sync::Arc<TenantRecord>,
    now_ms: i64,
) -> Result<Admitted, Denial> {
    if tenant.suspended {
        return Err(Denial::TenantSuspended);
    }
    if token.disabled {
        return Err(Denial::Disabled);
    }
    if token.expires_at_ms.is_some_and(|at| at <= now_ms) {
        return Err(Denial::Expired);
    }
    if token.exhausted {
        return Err(Denial::Exhausted);
    }
    Ok(Admitted {
        hash,
        token,
        tenant,
    })
}

/// Whether the token may use `model` (an empty allow-list allows all).
pub fn model_allowed(token: &TokenRecord, model: &str) -> Result<(), Denial> {
    if token.models.is_empty() || token.models.iter().any(|allowed| &**allowed == model) {
        Ok(())
    } else {
        Err(Denial::ModelNotAllowed(model.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_and_hosts_are_read_as_higress_sends_them() {
        assert_eq!(
            api_key(&headers(&[("authorization", "Bearer sk-1")])),
            Some("sk-1")
        );
        assert_eq!(api_key(&headers(&[("x-api-key", "sk-2")])), Some("sk-2"));
        assert_eq!(api_key(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(api_key(&headers(&[])), None);
        assert_eq!(
            host(&headers(&[("x-forwarded-host", "API.Acme.example:443")])).as_deref(),
            Some("api.acme.example")
        );
        assert_eq!(
            host(&headers(&[("host", "a.example")])).as_deref(),
            Some("a.example")
        );
    }

    #[test]
    fn error_bodies_follow_openai() {
        let d = Denial::InsufficientQuota;
        assert_eq!(d.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(d.body()["error"]["code"], "insufficient_quota");
        assert_eq!(d.body()["error"]["type"], "insufficient_quota");
        assert_eq!(
            Denial::InvalidKey.body()["error"]["code"],
            "invalid_api_key"
        );
        assert_eq!(Denial::InvalidKey.status(), StatusCode::UNAUTHORIZED);
    }
}
