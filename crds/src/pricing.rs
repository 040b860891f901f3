//! `Pricing`: a price list in a tenant's namespace.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, ModelPrice};

/// A price list: per-model prices per million tokens. The list in the platform tenant's namespace
/// is the platform default (what resellers pay); a reseller's list is what its customers pay.
///
/// `models` is a list-map keyed by `model`, so the REST API and a GitOps repository can each own
/// entries under server-side apply.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "aigateway.io",
    version = "v1alpha1",
    kind = "Pricing",
    namespaced,
    shortname = "pr",
    category = "aigateway",
    status = "PricingStatus",
    doc = "A per-model price list of a tenant.",
    printcolumn(name = "Currency", type_ = "string", json_path = ".spec.currency"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PricingSpec {
    /// ISO 4217 currency code of every price in the list.
    #[serde(default = "default_currency")]
    #[schemars(length(max = 3))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Z]{3}$')").message("currency must be an ISO 4217 code such as CNY or USD"))]
    pub currency: String,

    /// Prices per model.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]), length(max = 1024))]
    pub models: Vec<ModelPrice>,
}

fn default_currency() -> String {
    "CNY".to_owned()
}

/// Observed state of a Pricing list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PricingStatus {
    /// `observedGeneration` and `conditions`.
    #[serde(flatten)]
    pub common: CommonStatus,
}

/// The name of the Pricing in effect among `all` (one namespace's): the oldest, then by name — a
/// tenant has one price list. `deleting` says whether Pricings being deleted count. The one rule,
/// used by the operator's mirror and the REST API.
pub fn in_effect(all: &[Pricing], deleting: bool) -> Option<String> {
    all.iter()
        .filter(|p| deleting || p.metadata.deletion_timestamp.is_none())
        .min_by(|a, b| {
            (&a.metadata.creation_timestamp, a.metadata.name.as_ref())
                .cmp(&(&b.metadata.creation_timestamp, b.metadata.name.as_ref()))
        })
        .and_then(|p| p.metadata.name.clone())
}
