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
