//! AIGateway's Kubernetes API: group [`GROUP`], version [`VERSION`].
//!
//! The Tenant, Channel, Token and Pricing types land here (see `docs/architecture.md` §3); this
//! module already holds the names every component shares so that none of them spells a label or a
//! field manager by hand.

/// API group of every AIGateway custom resource.
pub const GROUP: &str = "aigateway.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Namespace the Higress controller reads its `McpBridge` and `WasmPlugin`s from.
pub const HIGRESS_NAMESPACE: &str = "higress-system";
/// Prefix of the namespace the operator creates for each tenant: `aigw-<tenant>`.
pub const TENANT_NAMESPACE_PREFIX: &str = "aigw-";
/// `app.kubernetes.io/managed-by` value on every object AIGateway writes.
pub const MANAGED_BY: &str = "aigateway";

/// The namespace of a tenant's Tokens and Pricing.
pub fn tenant_namespace(tenant: &str) -> String {
    format!("{TENANT_NAMESPACE_PREFIX}{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_namespace_has_prefix() {
        assert_eq!(tenant_namespace("acme"), "aigw-acme");
    }
}
