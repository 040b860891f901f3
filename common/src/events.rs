//! `tenant.events`: the one shape of every record on the topic. The operator publishes tenant
//! lifecycle changes (`upserted`, `deleted`), the REST API every management write (`key.created`,
//! `pricing.replaced`, …, with the actor and the object). Keyed by the tenant name, so one
//! tenant's records keep their order.

use serde::{Deserialize, Serialize};

/// The topic.
pub const TENANT_EVENTS: &str = "tenant.events";

/// One record of [`TENANT_EVENTS`], serialised as camelCase JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantEvent {
    /// What happened: `upserted`, `deleted` (the operator) or `<object>.<verb>` (the REST API).
    pub event: String,
    /// Tenant CR name (also the record key).
    pub tenant: String,
    /// MySQL id of the tenant.
    pub tenant_id: i64,
    /// The Tenant's `metadata.generation` the operator acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The user id of who made a REST change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<i64>,
    /// What a REST change touched (e.g. `token/key-ab12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

impl TenantEvent {
    /// The record's payload.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The topic of [`AlertEvent`]s: what resellers and the platform are notified of.
pub const ALERT_EVENTS: &str = "alert.events";

/// What an [`AlertEvent`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AlertKind {
    /// A token's quota fell to 10 % or less remaining.
    QuotaLow,
    /// A token's quota is used up (authz now refuses it).
    QuotaExhausted,
    /// A channel answered fewer than 95 % of the requests of the last minutes successfully.
    ChannelDegraded,
    /// A degraded channel is back at 95 % or more.
    ChannelRecovered,
}

impl AlertKind {
    /// The name used in record ids and metric labels (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QuotaLow => "quotaLow",
            Self::QuotaExhausted => "quotaExhausted",
            Self::ChannelDegraded => "channelDegraded",
            Self::ChannelRecovered => "channelRecovered",
        }
    }
}

/// A Token named by its CR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRef {
    pub namespace: String,
    pub name: String,
}

/// One record of [`ALERT_EVENTS`], serialised as camelCase JSON. Quota alerts are keyed by the
/// tenant name (a reseller's consumer reads its own), channel alerts by the channel name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertEvent {
    /// The same crossing always has the same id (delivery is at least once: dedupe on it).
    pub id: String,
    pub kind: AlertKind,
    /// The tenant whose token it is (quota alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The token (quota alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenRef>,
    /// Quota used and the quota, in the token's quota unit (quota alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<i64>,
    /// The channel (channel alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Requests and failed requests in the window the channel was judged on (channel alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u64>,
    /// When: the ending time of the request that crossed the line (ms since the epoch).
    pub at_ms: i64,
}

impl AlertEvent {
    /// The record's key: the tenant for quota alerts, the channel for channel alerts.
    pub fn key(&self) -> &str {
        self.tenant
            .as_deref()
            .or(self.channel.as_deref())
            .unwrap_or_default()
    }

    /// The record's payload.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
