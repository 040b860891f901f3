//! The usage event: what the plugin sends to billing ingest, what ingest puts on Kafka
//! `usage.events`, and what the billing worker prices. One versioned type, shared by both sides.
//!
//! Token counts follow the normalized usage convention (docs/architecture.md §6): `prompt_tokens`
//! counts **all** input tokens (cached and cache-write ones included), `completion_tokens` all
//! output tokens (reasoning included); the detail fields say which part of them was cached input,
//! cache writes or reasoning. A count the provider did not report is `None`, not 0.

use serde::{Deserialize, Serialize};

/// The event version this build writes and understands.
pub const EVENT_VERSION: u32 = 1;

/// Upper bound of every identifier field, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Token counts of one response, normalized across providers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
}

impl TokenUsage {
    /// Whether the provider reported any count at all.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The amount charged against a token's quota: all input plus all output tokens.
    pub fn billable_tokens(&self) -> u64 {
        self.prompt_tokens
            .unwrap_or(0)
            .saturating_add(self.completion_tokens.unwrap_or(0))
    }
}

/// How the response ended, as far as usage is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The response completed and carried usage.
    #[default]
    Complete,
    /// The response completed but carried no usage (e.g. an OpenAI stream without
    /// `include_usage`): counts are absent, never invented.
    NoUsage,
    /// The stream ended before its final event; counts are what had arrived.
    Truncated,
    /// The upstream answered with an error (HTTP 4xx/5xx, or an in-band error event).
    UpstreamError,
    /// No report arrived for an admitted request before its reservation expired: the event is
    /// authz's pending record, sent by billing's sweep and billed at its estimate.
    Unreported,
}

/// One request's usage, reported once at the end of the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageEvent {
    /// Must equal [`EVENT_VERSION`].
    pub version: u32,
    /// The request id; with the tenant, the dedupe key.
    pub event_id: String,
    /// Tenant id (`x-aigw-tenant`, set by authz).
    pub tenant: String,
    /// Owning user (`x-aigw-user`).
    pub user: String,
    /// Token id (`x-aigw-token`).
    pub token: String,
    /// Channel (upstream) that served the request; empty when unknown.
    #[serde(default)]
    pub channel: String,
    /// Model as requested (`x-higress-llm-model`): the name prices are keyed by.
    pub model: String,
    /// Model the upstream echoed in its response, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_model: Option<String>,
    /// Quota reservation made at admission (`x-aigw-reservation`: `<id>:<amount>` or `none`).
    #[serde(default = "none")]
    pub reservation: String,
    /// Normalized token counts.
    #[serde(default)]
    pub usage: TokenUsage,
    /// Whether counts were estimated rather than reported by the upstream.
    #[serde(default)]
    pub estimated: bool,
    /// What authz estimated at admission (`x-aigw-estimate`: prompt and completion tokens): what
    /// is billed for a served response whose usage never arrived (no usage, cut stream, lost
    /// report). Absent from events of an authz that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<TokenUsage>,
    /// Whether the response was a stream.
    #[serde(default)]
    pub stream: bool,
    /// HTTP status the upstream answered with.
    pub status: u16,
    #[serde(default)]
    pub outcome: Outcome,
    /// Upstream error message or type, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Request start, Unix milliseconds.
    pub started_at_ms: i64,
    /// Response end, Unix milliseconds.
    pub ended_at_ms: i64,
    /// The W3C trace context of the request (`traceparent`, authz's span): ingest and the worker
    /// continue its trace. Absent when the gateway passed none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

/// Whether `value` is a well-formed W3C `traceparent` (version 00 layout, non-zero ids): only such
/// a value is carried on, never a client's arbitrary header.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [v, t, p, f]
        if hex(v, 2) && *v != "ff" && hex(t, 32) && nonzero(t) && hex(p, 16) && nonzero(p) && hex(f, 2))
}

fn none() -> String {
    "none".to_owned()
}

/// Why an event was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("usage event is not valid JSON for this version: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "usage event version {found} is not supported (this build understands {EVENT_VERSION})"
    )]
    Version { found: u32 },
    #[error("usage event field {0} must not be empty")]
    Empty(&'static str),
    #[error("usage event field {0} is longer than {MAX_ID_LEN} bytes")]
    TooLong(&'static str),
    #[error("usage event field traceParent is not a W3C traceparent")]
    TraceParent,
    #[error("usage event ends before it starts (startedAtMs {start} > endedAtMs {end})")]
    Time { start: i64, end: i64 },
}

impl UsageEvent {
    /// Parses and checks an event as ingest and the worker receive it.
    pub fn parse(bytes: &[u8]) -> Result<Self, EventError> {
        let event: Self = serde_json::from_slice(bytes)?;
        event.validate()?;
        Ok(event)
    }

    /// The checks every stage applies.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.version != EVENT_VERSION {
            return Err(EventError::Version {
                found: self.version,
            });
        }
        for (name, value) in [
            ("eventId", &self.event_id),
            ("tenant", &self.tenant),
            ("token", &self.token),
            ("model", &self.model),
        ] {
            if value.is_empty() {
                return Err(EventError::Empty(name));
            }
        }
        for (name, value) in [
            ("eventId", &self.event_id),
            ("tenant", &self.tenant),
            ("user", &self.user),
            ("token", &self.token),
            ("channel", &self.channel),
            ("model", &self.model),
            ("reservation", &self.reservation),
        ] {
            if value.len() > MAX_ID_LEN {
                return Err(EventError::TooLong(name));
            }
        }
        if self
            .trace_parent
            .as_deref()
            .is_some_and(|t| !is_traceparent(t))
        {
            return Err(EventError::TraceParent);
        }
        if self.started_at_ms > self.ended_at_ms {
            return Err(EventError::Time {
                start: self.started_at_ms,
                end: self.ended_at_ms,
            });
        }
        Ok(())
    }

    /// The Kafka message key: tenant and event id. Equal keys land on one partition, so one
    /// worker sees every copy of an event.
    pub fn dedupe_key(&self) -> String {
        format!("{}/{}", self.tenant, self.event_id)
    }

    /// Latency of the request in milliseconds.
    pub fn latency_ms(&self) -> u64 {
        u64::try_from(self.ended_at_ms.saturating_sub(self.started_at_ms)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> UsageEvent {
        UsageEvent {
            version: EVENT_VERSION,
            event_id: "req-1".into(),
            tenant: "7".into(),
            user: "alice".into(),
            token: "42".into(),
            channel: "openai-main".into(),
            model: "gpt-4o".into(),
            response_model: Some("gpt-4o-2024-08-06".into()),
            reservation: "r1:4096".into(),
            usage: TokenUsage {
                prompt_tokens: Some(100),
                completion_tokens: Some(20),
                cached_input_tokens: Some(80),
                ..TokenUsage::default()
            },
            estimated: false,
            estimate: None,
            stream: true,
            status: 200,
            outcome: Outcome::Complete,
            error: None,
            started_at_ms: 1_000,
            ended_at_ms: 1_250,
            trace_parent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        }
    }

    #[test]
    fn only_a_well_formed_traceparent_is_accepted() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "junk",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
            let mut e = event();
            e.trace_parent = Some(bad.to_owned());
            assert!(
                matches!(e.validate(), Err(EventError::TraceParent)),
                "{bad}"
            );
        }
    }

    #[test]
    fn round_trips_and_keys_by_tenant_and_id() {
        let e = event();
        let bytes = serde_json::to_vec(&e).unwrap();
        assert_eq!(UsageEvent::parse(&bytes).unwrap(), e);
        assert_eq!(e.dedupe_key(), "7/req-1");
        assert_eq!(e.latency_ms(), 250);
        assert_eq!(e.usage.billable_tokens(), 120);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"cachedInputTokens\":80"), "{text}");
        assert!(
            !text.contains("reasoningTokens"),
            "absent stays absent: {text}"
        );
    }

    #[test]
    fn refuses_what_billing_cannot_trust() {
        let mut e = event();
        e.version = 2;
        assert!(matches!(
            e.validate(),
            Err(EventError::Version { found: 2 })
        ));
        let mut e = event();
        e.event_id.clear();
        assert!(matches!(e.validate(), Err(EventError::Empty("eventId"))));
        let mut e = event();
        e.model = "m".repeat(MAX_ID_LEN + 1);
        assert!(matches!(e.validate(), Err(EventError::TooLong("model"))));
        let mut e = event();
        e.ended_at_ms = 0;
        assert!(matches!(e.validate(), Err(EventError::Time { .. })));
        assert!(matches!(
            UsageEvent::parse(br#"{"version":1}"#),
            Err(EventError::Parse(_))
        ));
        let mut v = serde_json::to_value(event()).unwrap();
        v["surprise"] = 1.into();
        assert!(UsageEvent::parse(v.to_string().as_bytes()).is_err());
    }
}
