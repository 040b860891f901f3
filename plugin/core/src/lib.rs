//! The usage reporter's logic, free of proxy-wasm so it is testable on the host.
//!
//! This crate owns the plugin config contract: the operator serialises a [`PluginConfig`] into the
//! `WasmPlugin`, the plugin parses it here, and a config with a `version` it does not know is refused
//! rather than half-understood. Usage extraction from JSON and SSE responses lands here with the
//! plugin issue.

use serde::{Deserialize, Serialize};

pub mod event;
pub mod rules;
pub mod scan;
pub mod usage;
pub use event::{EVENT_VERSION, EventError, Outcome, TokenUsage, UsageEvent, is_traceparent};
pub use usage::{Extracted, Framing, UsageParser};

/// The config version this build understands.
pub const CONFIG_VERSION: u32 = 1;

/// What an instance of the plugin does. One module, two WasmPlugin instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Report usage to billing (runs after ext-auth, reads the `x-aigw-*` headers it set).
    #[default]
    Report,
    /// Remove client-sent gateway headers (runs before ext-auth, so only authz's copies reach the
    /// upstream side).
    Scrub,
    /// Remove the client's credentials ([`headers::CLIENT_CREDENTIALS`]) from an admitted request:
    /// runs after ext-auth (which sent them to authz) and before ai-proxy (which sets the
    /// provider's), so a tenant's key never reaches a provider whatever header ai-proxy uses.
    /// With an ingest cluster it also reports an admitted request that ends without reaching
    /// any upstream (a plugin after it, e.g. ai-proxy, answered itself): nothing was served, and
    /// the report instance, after those plugins, never saw it.
    Credentials,
}

/// Configuration of the usage-reporter plugin, as written by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    /// Contract version; must equal [`CONFIG_VERSION`].
    pub version: u32,
    /// What this instance does.
    #[serde(default)]
    pub mode: Mode,
    /// Envoy cluster name of the billing ingest service (report mode).
    #[serde(default)]
    pub ingest_cluster: String,
    /// Path on the ingest service that accepts usage events.
    #[serde(default = "default_ingest_path")]
    pub ingest_path: String,
    /// Timeout of the call to ingest, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Shared secret sent to ingest in [`INGEST_SECRET_HEADER`] (report mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ingest_secret: String,
}

impl PluginConfig {
    /// Whether this instance sends usage events: report mode, or credentials mode with an ingest
    /// cluster (for requests that never reach an upstream).
    pub fn reports(&self) -> bool {
        self.mode == Mode::Report
            || (self.mode == Mode::Credentials && !self.ingest_cluster.is_empty())
    }
}

/// The header that carries the shared secret on calls to ingest.
pub const INGEST_SECRET_HEADER: &str = "x-aigw-ingest-secret";

fn default_ingest_path() -> String {
    "/v1/usage".to_owned()
}

fn default_timeout_ms() -> u32 {
    2_000
}

/// Why a plugin config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("plugin config is not valid JSON for this version: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "plugin config version {found} is not supported (this build understands {CONFIG_VERSION})"
    )]
    Version { found: u32 },
    #[error("plugin config field {0} must not be empty")]
    Empty(&'static str),
}

impl PluginConfig {
    /// Parses the document Higress delivers to `on_configure` (a global config and/or `_rules_`,
    /// see [`rules`]), each configuration checked by [`PluginConfig::parse`].
    pub fn parse_delivered(
        bytes: &[u8],
    ) -> Result<rules::RuleSet<std::rc::Rc<Self>>, rules::RulesError<ConfigError>> {
        rules::RuleSet::parse(bytes, |b| Self::parse(b).map(std::rc::Rc::new))
    }

    /// Parses and checks one configuration.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes)?;
        if config.version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: config.version,
            });
        }
        if config.mode == Mode::Report && config.ingest_cluster.is_empty() {
            return Err(ConfigError::Empty("ingestCluster"));
        }
        // Envoy reads a zero timeout as none: a hung call would never come back to be retried.
        if config.reports() && config.timeout_ms == 0 {
            return Err(ConfigError::Empty("timeoutMs"));
        }
        Ok(config)
    }
}

/// The channel name in an Envoy cluster name of one of our McpBridge registries:
/// `outbound|443||aigw-openai-main.dns` → `openai-main`. Another cluster gives its service name
/// unchanged (billing then records the channel as unknown rather than guessing).
pub fn channel_from_cluster(cluster: &str) -> String {
    let service = cluster.rsplit_once("||").map_or(cluster, |(_, s)| s);
    let service = service
        .strip_suffix(".dns")
        .or_else(|| service.strip_suffix(".static"))
        .unwrap_or(service);
    service.strip_prefix("aigw-").unwrap_or(service).to_owned()
}

/// The request headers authz sets on an admitted request; ext-auth copies them onto the request
/// that goes on (`allowed_upstream_headers`), the usage reporter reads them, and the header-scrub
/// instance removes client-sent copies before ext-auth runs. One definition for both ends.
pub mod headers {
    /// MySQL id of the tenant.
    pub const TENANT: &str = "x-aigw-tenant";
    /// Owner of the token.
    pub const USER: &str = "x-aigw-user";
    /// MySQL id of the token.
    pub const TOKEN: &str = "x-aigw-token";
    /// The quota reservation taken for the request (`none`, or `<id>:<tokens>`).
    pub const RESERVATION: &str = "x-aigw-reservation";
    /// The id authz gives each admitted request: the usage event's id, so the dedupe key is one
    /// the client cannot choose or collide (unlike `x-request-id`, which a client may send).
    pub const EVENT_ID: &str = "x-aigw-event-id";
    /// The consumer name Higress's rate-limit and statistics plugins read (the token id).
    pub const CONSUMER: &str = "x-mse-consumer";
    /// authz's estimate of the request, `<prompt tokens>:<completion tokens>` ([`super::estimate`]).
    pub const ESTIMATE: &str = "x-aigw-estimate";
    /// The requested model. Higress's model-router sets it from the body; authz refuses a request
    /// whose header differs from its body, so a client cannot choose route or price by header.
    pub const MODEL: &str = "x-higress-llm-model";
    /// Where Higress's ai-proxy keeps the client's `Authorization` after putting the provider's
    /// key in its place: the tenant's own key.
    pub const ORIGINAL_AUTH: &str = "x-hi-original-auth";
    /// The W3C trace context. authz answers with its own span's (continuing the client's trace,
    /// or starting one); ext-auth copies it onto the request; the reporter puts it in the usage
    /// event, so ingest and the worker continue the same trace (`common/src/telemetry.rs`).
    pub const TRACEPARENT: &str = "traceparent";
    /// Where Envoy keeps the client's `:authority` when a plugin rewrites it (the tenant's domain).
    pub const ORIGINAL_HOST: &str = "x-envoy-original-host";
    /// The fallback grant authz issues with each admitted request: a random value, recorded with
    /// the pending event, that admits the request's second pass if Envoy redirects it to a
    /// fallback tier. The credentials instance moves it from the request into filter state
    /// ([`FALLBACK_STATE`]); it never reaches a provider, a client, an event or a row.
    pub const GRANT: &str = "x-aigw-grant";
    /// Set by Envoy's fallback redirect (the operator's `custom_response` policy) on the second
    /// pass: `<event id>.<grant>` of the first pass, from the stream's filter state
    /// ([`FALLBACK_STATE`]). authz admits the second pass on it — the client's key is gone by
    /// then (ai-proxy replaced `Authorization`) — and retires the first pass, so the request is
    /// billed once. Not scrubbed (the second pass runs the scrub instance again); a client-sent
    /// value matches no pending grant and is refused. Never sent upstream.
    pub const FALLBACK: &str = "x-aigw-fallback";
    /// The filter-state property (`wasm.<name>` in Envoy) where the credentials instance keeps
    /// `<event id>.<grant>` of the admitted request for the fallback redirect to read.
    pub const FALLBACK_STATE: &str = "aigw_fallback";
    /// The filter-state property the report instance sets when it takes a request on: the
    /// credentials instance then leaves the request's report to it.
    pub const REPORTING_STATE: &str = "aigw_reporting";

    /// The value of [`FALLBACK`] in the redirect policy: Envoy's formatter for the filter state
    /// the credentials instance set, evaluated on the first pass when it redirects.
    pub fn fallback_value() -> String {
        format!("%FILTER_STATE(wasm.{FALLBACK_STATE}:PLAIN)%")
    }

    /// Headers that carry a client's API key: authz reads the key from the first two (ext-auth
    /// forwards them), and none of them may reach a provider.
    pub const CLIENT_CREDENTIALS: &[&str] = &[AUTHORIZATION, API_KEY, "x-goog-api-key", "api-key"];
    /// `Authorization: Bearer <key>`, where authz reads a client's key first.
    pub const AUTHORIZATION: &str = "authorization";
    /// `x-api-key: <key>`, where authz reads a client's key otherwise.
    pub const API_KEY: &str = "x-api-key";

    /// Request headers that must never reach a provider: the gateway's own (authz's answers) and
    /// the tenant's key and domain. The operator has every LLM route remove them upstream
    /// (`higress.io/request-header-control-remove`, applied by Envoy's router after every plugin
    /// ran). Not the model header ([`MODEL`]): the router removes from the stream's own header
    /// map, and Envoy's fallback redirect routes on that map — without the model header no
    /// fallback route matches and Envoy does not redirect. It names the model the body names.
    pub const NOT_UPSTREAM: &[&str] = &[
        TENANT,
        USER,
        TOKEN,
        RESERVATION,
        EVENT_ID,
        CONSUMER,
        ESTIMATE,
        ORIGINAL_AUTH,
        ORIGINAL_HOST,
        GRANT,
        FALLBACK,
    ];
}

/// The largest request body ext-auth forwards to authz (`max_request_body_bytes` in the operator's
/// ext-auth config) and authz reads: 8 MiB. A larger request is refused by ext-auth with 413.
pub const AUTHZ_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The [`headers::ESTIMATE`] value: `<prompt>:<completion>`.
pub mod estimate {
    use crate::TokenUsage;

    pub fn format(prompt: u64, completion: u64) -> String {
        format!("{prompt}:{completion}")
    }

    /// The estimate as token counts; `None` when the value is malformed.
    pub fn parse(value: &str) -> Option<TokenUsage> {
        let (p, c) = value.split_once(':')?;
        Some(TokenUsage {
            prompt_tokens: Some(p.parse().ok()?),
            completion_tokens: Some(c.parse().ok()?),
            ..TokenUsage::default()
        })
    }
}

/// Whether a request header is one only the gateway may set: `x-aigw-*` (set by authz) and
/// `x-mse-consumer` (read by Higress rate-limit and statistics plugins). Case-insensitive.
/// [`headers::FALLBACK`] is the exception: Envoy sets it between the two passes of a fallback.
pub fn is_gateway_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.starts_with("x-aigw-") && lower != headers::FALLBACK) || lower == headers::CONSUMER
}

/// Whether a request header is one of Envoy's own (`x-envoy-*`), which a client must not send:
/// Envoy acts on some of them (retry policy, timeouts, the original path of a redirect).
pub fn is_envoy_header(name: &str) -> bool {
    name.len() > 8
        && name
            .get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("x-envoy-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_config_with_defaults() {
        let c = PluginConfig::parse(br#"{"version":1,"ingestCluster":"outbound|8090||ingest"}"#)
            .unwrap();
        assert_eq!(c.ingest_path, "/v1/usage");
        assert_eq!(c.timeout_ms, 2_000);
        let round = serde_json::to_vec(&c).unwrap();
        assert_eq!(PluginConfig::parse(&round).unwrap(), c);
    }

    #[test]
    fn scrub_mode_needs_no_ingest_and_knows_the_gateway_headers() {
        let c = PluginConfig::parse(br#"{"version":1,"mode":"scrub"}"#).unwrap();
        assert_eq!(c.mode, Mode::Scrub);
        assert!(
            PluginConfig::parse(br#"{"version":1,"mode":"report"}"#).is_err(),
            "report needs ingest"
        );
        assert!(PluginConfig::parse(br#"{"version":1,"mode":"other"}"#).is_err());
        for h in [
            "x-aigw-tenant",
            "X-AIGW-Token",
            "x-aigw-reservation",
            "x-mse-consumer",
            "X-Mse-Consumer",
        ] {
            assert!(is_gateway_header(h), "{h}");
        }
        for h in [
            "authorization",
            "x-aigwtenant",
            "x-higress-llm-model",
            "x-mse-consumers",
            "X-AIGW-Fallback",
        ] {
            assert!(!is_gateway_header(h), "{h}");
        }
        assert!(is_envoy_header("X-Envoy-Retry-On") && is_envoy_header("x-envoy-original-path"));
        assert!(!is_envoy_header("x-envoy") && !is_envoy_header("x-envoyz"));
    }

    #[test]
    fn channel_names_come_from_our_registry_clusters() {
        assert_eq!(
            channel_from_cluster("outbound|443||aigw-openai-main.dns"),
            "openai-main"
        );
        assert_eq!(
            channel_from_cluster("outbound|80||aigw-local.static"),
            "local"
        );
        assert_eq!(
            channel_from_cluster("outbound|8080||other.ns.svc.cluster.local"),
            "other.ns.svc.cluster.local"
        );
        assert_eq!(channel_from_cluster(""), "");
    }

    #[test]
    fn refuses_unknown_version_and_fields() {
        let err = PluginConfig::parse(br#"{"version":2,"ingestCluster":"x"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Version { found: 2 }), "{err}");
        let err =
            PluginConfig::parse(br#"{"version":1,"ingestCluster":"x","extra":1}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
        let err = PluginConfig::parse(br#"{"version":1,"ingestCluster":""}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Empty("ingestCluster")), "{err}");
    }
}
