//! `Tenant`: the platform itself or one reseller, with the domains it serves.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::CommonStatus;

/// What a tenant is. Immutable once created: a reseller never becomes the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TenantType {
    /// The platform operator's own tenant; its Pricing is the platform default price list.
    Platform,
    /// A reseller selling platform capacity under its own domain and prices.
    Reseller,
}

/// A tenant of AIGateway: the platform, or a reseller with its domains, branding and prices.
///
/// The operator creates the namespace `aigw-<name>` for the tenant's Tokens and Pricing, routes its
/// domains through Higress, and mirrors it into MySQL.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "aigateway.io",
    version = "v1alpha1",
    kind = "Tenant",
    shortname = "tn",
    category = "aigateway",
    status = "TenantStatus",
    doc = "A tenant of AIGateway: the platform, or a reseller with its domains, branding and prices.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Domains", type_ = "string", json_path = ".spec.domains"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".status.tenantId", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 57 && !(self.metadata.name in ['system'])").message("a tenant name has at most 57 characters (its namespace aigw-<name> must fit in 63) and is not a reserved name (system: aigw-system is the platform's)")
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// `platform` or `reseller`. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable: create a new Tenant instead"))]
    #[serde(rename = "type")]
    pub tenant_type: TenantType,

    /// Name shown in consoles and on the login page.
    #[schemars(length(min = 1, max = 128))]
    pub display_name: String,

    /// Host names this tenant serves, e.g. `api.reseller.example`. Lowercase DNS names; a leading
    /// `*.` wildcard is allowed (Higress matches `*.suffix`). Each domain belongs to one tenant: a
    /// domain another tenant already serves is reported as a `DomainConflict` condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 32), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(r"self.all(d, d.matches('^(\\*\\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$'))").message("each domain must be a lowercase DNS name with at least two labels, optionally starting with *. (e.g. api.reseller.example)"))]
    #[x_kube(validation = Rule::new(r"self.all(d, !d.matches('\\.[0-9]+$'))").message("an IP address is not a domain: the last label of a domain is not all digits"))]
    pub domains: Vec<String>,

    /// The reseller this tenant resells for (a reseller of a reseller); empty when the platform
    /// manages it directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 57))]
    pub parent: Option<String>,

    /// Login-page and console branding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branding: Option<Branding>,

    /// Feature flags and settings, as string key/value pairs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub config: BTreeMap<String, String>,

    /// A suspended tenant's tokens are refused at the gateway; nothing is deleted.
    #[serde(default)]
    pub suspended: bool,
}

/// Branding of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Branding {
    /// URL of the logo shown on the login page (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("logoUrl must be an http(s) URL"))]
    pub logo_url: Option<String>,
    /// Theme colour as `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 7))]
    #[x_kube(validation = Rule::new("self.matches('^#[0-9a-fA-F]{6}$')").message("themeColor must look like #6c8cff"))]
    pub theme_color: Option<String>,
}

/// Observed state of a Tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// `observedGeneration` and `conditions`.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Numeric id of the tenant (the MySQL `tenants.id`), used in usage records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<i64>,
    /// The namespace holding the tenant's Tokens and Pricing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The domains this tenant actually serves: `spec.domains` minus those another tenant claimed
    /// first. The authz gate reads this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}
