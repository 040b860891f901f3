//! The Higress objects a gateway is built from — `WasmPlugin`s, Ingresses, the `default`
//! `McpBridge` and `EnvoyFilter`s — read back from the kube-apiserver as the operator wrote them,
//! never from the operator's Rust values. Used by `aigw-standin` and the data-plane tests.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use serde_json::Value;

/// The objects a gateway is built from, as JSON, and their resource versions (to see changes).
#[derive(Debug, Clone)]
pub struct Objects {
    pub plugins: Vec<Value>,
    pub ingresses: Vec<Value>,
    /// The `default` McpBridge, or null.
    pub bridge: Value,
    pub envoy_filters: Vec<Value>,
    /// `"name"@resourceVersion` of every object read.
    pub versions: Vec<String>,
}

async fn list(
    client: &Client,
    ns: &str,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Result<Vec<Value>, kube::Error> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect())
}

/// Reads the objects from `ns` of the kube-apiserver.
///
/// # Errors
/// A failed list call.
pub async fn read(client: &Client, ns: &str) -> Result<Objects, kube::Error> {
    let plugins = list(
        client,
        ns,
        "extensions.higress.io",
        "v1alpha1",
        "WasmPlugin",
        "wasmplugins",
    )
    .await?;
    let ingresses = list(
        client,
        ns,
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
    )
    .await?;
    let bridges = list(
        client,
        ns,
        "networking.higress.io",
        "v1",
        "McpBridge",
        "mcpbridges",
    )
    .await?;
    let bridge = bridges
        .into_iter()
        .find(|b| b["metadata"]["name"] == "default")
        .unwrap_or(Value::Null);
    let envoy_filters = list(
        client,
        ns,
        "networking.istio.io",
        "v1alpha3",
        "EnvoyFilter",
        "envoyfilters",
    )
    .await?;
    let versions = plugins
        .iter()
        .chain(&ingresses)
        .chain(&envoy_filters)
        .chain(std::iter::once(&bridge))
        .map(|o| {
            format!(
                "{}@{}",
                o["metadata"]["name"], o["metadata"]["resourceVersion"]
            )
        })
        .collect();
    Ok(Objects {
        plugins,
        ingresses,
        bridge,
        envoy_filters,
        versions,
    })
}
