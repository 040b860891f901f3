//! `build` for Higress: the complete Higress configuration as a pure function of the Channels,
//! their upstream keys and the operator config. No client here; `sync` applies the result.
//!
//! The scale rule: nothing here grows with tenants × models. Routes are host-independent (they
//! match any host; authz checks that the token's tenant owns the host), and models that share the
//! same channels, priorities and weights share one Ingress. Per channel there is one McpBridge
//! registry and one ai-proxy provider entry.
//!
//! Priority tiers and fallback: an Ingress routes a model group to the channels of its highest
//! priority tier, weighted (`higress.io/destination`), with Envoy's retries (`proxy-next-upstream`;
//! `proxy-next-upstream-tries` is the tier's largest `maxRetry`, since Higress turns it into
//! Istio's `retries.attempts`, a count of retries after the first try). Envoy draws the weighted
//! channel once per request, so its retries go to the same channel; another tier is reached only
//! by the fallback below. Retries are Envoy's alone: ai-proxy's own `retryOnFailure` is never enabled, because it
//! answers with a local reply after the plugins after it saw the failed answer (the reporter
//! would bill the failure and miss the retried success). When lower tiers
//! exist, a 5xx or 429 from the top tier is redirected internally (an `EnvoyFilter` with Envoy's
//! `custom_response` redirect policy) to a fallback Ingress serving the next tier. Tiers below the
//! next one are not used.

use std::collections::BTreeMap;

use aigw_crds::{Channel, MANAGED_BY, Provider, labels};
use aigw_plugin_core::{PluginConfig, headers};
use k8s_openapi::api::networking::v1::Ingress;
use kube::{
    ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{context::Config, error::Result};

/// Prefix of every McpBridge registry, Ingress and WasmPlugin the operator owns in Higress.
pub const PREFIX: &str = "aigw-";
/// `aigateway.io/component` of the objects written here.
pub const COMPONENT: &str = "higress-sync";
/// The header model-router fills from the body's `model`.
pub const MODEL_HEADER: &str = aigw_plugin_core::headers::MODEL;
use aigw_plugin_core::AUTHZ_MAX_BODY_BYTES;

/// The McpBridge API (Higress serves only `v1`).
pub fn mcp_bridge_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.higress.io", "v1", "McpBridge"),
        "mcpbridges",
    )
}

/// The WasmPlugin API.
pub fn wasm_plugin_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("extensions.higress.io", "v1alpha1", "WasmPlugin"),
        "wasmplugins",
    )
}

/// A channel ready to be routed: its spec and the upstream keys read from its Secret.
#[derive(Debug, Clone)]
pub struct Routable<'a> {
    pub channel: &'a Channel,
    pub keys: Vec<String>,
}

/// Everything the operator wants in Higress.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Our registries of McpBridge `default` (the others in it are left alone).
    pub registries: Vec<Value>,
    /// Route Ingresses in the Higress namespace.
    pub ingresses: Vec<Ingress>,
    /// WasmPlugins in the Higress namespace.
    pub plugins: Vec<DynamicObject>,
    /// `EnvoyFilter`s of routes with a fallback tier.
    pub envoy_filters: Vec<DynamicObject>,
}

/// An upstream endpoint parsed from a base URL or a provider default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
    https: bool,
    path: String,
}

impl Endpoint {
    fn parse(url: &str) -> Option<Self> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            (false, url.strip_prefix("http://")?)
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, if https { 443 } else { 80 }),
        };
        (!host.is_empty()).then(|| Self {
            host: host.to_owned(),
            port,
            https,
            path: format!("/{path}").trim_end_matches('/').to_owned(),
        })
    }

    fn is_ip(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }
}

/// The public endpoint of a provider, when it has one fixed host.
fn default_endpoint(provider: Provider) -> Option<&'static str> {
    Some(match provider {
        Provider::Openai => "https://api.openai.com/v1",
        Provider::Claude => "https://api.anthropic.com",
        Provider::Gemini => "https://generativelanguage.googleapis.com",
        Provider::Deepseek => "https://api.deepseek.com",
        Provider::Moonshot => "https://api.moonshot.cn",
        Provider::Qwen => "https://dashscope.aliyuncs.com",
        Provider::Zhipuai => "https://open.bigmodel.cn",
        Provider::Groq => "https://api.groq.com",
        Provider::Grok => "https://api.x.ai",
        Provider::Mistral => "https://api.mistral.ai",
        Provider::Openrouter => "https://openrouter.ai",
        Provider::Minimax => "https://api.minimax.chat",
        Provider::Baichuan => "https://api.baichuan-ai.com",
        Provider::Yi => "https://api.lingyiwanwu.com",
        Provider::Stepfun => "https://api.stepfun.com",
        Provider::Fireworks => "https://api.fireworks.ai",
        _ => return None,
    })
}

fn endpoint(channel: &Channel) -> Option<Endpoint> {
    channel
        .spec
        .base_url
        .as_deref()
        .or_else(|| default_endpoint(channel.spec.provider))
        .and_then(Endpoint::parse)
}

/// The Higress service name of a channel's registry, e.g. `aigw-openai-main.dns`.
fn service(channel: &Channel, ep: &Endpoint) -> String {
    let kind = if ep.is_ip() { "static" } else { "dns" };
    format!("{PREFIX}{}.{kind}", channel.name_any())
}

fn registry(channel: &Channel, ep: &Endpoint) -> Value {
    if ep.is_ip() {
        json!({"name": format!("{PREFIX}{}", channel.name_any()), "type": "static",
               "domain": format!("{}:{}", ep.host, ep.port), "port": 80,
               "protocol": if ep.https { "https" } else { "http" }})
    } else {
        json!({"name": format!("{PREFIX}{}", channel.name_any()), "type": "dns", "domain": ep.host,
               "port": ep.port, "protocol": if ep.https { "https" } else { "http" }})
    }
}

/// The AWS region of a Bedrock runtime endpoint (`bedrock-runtime.<region>.amazonaws.com`).
fn bedrock_region(ep: &Endpoint) -> Option<&str> {
    let region = ep
        .host
        .strip_prefix("bedrock-runtime.")?
        .strip_suffix(".amazonaws.com")?;
    (!region.is_empty() && !region.contains('.')).then_some(region)
}

/// Why Higress's ai-proxy would refuse this channel's provider entry — and with it, having no
/// rule isolation, its whole configuration and every route. A channel with a problem is left
/// out of the Higress configuration and its status names the problem. The rules are ai-proxy's
/// own `ValidateConfig` checks (`plugins/wasm-go/extensions/ai-proxy/provider/*.go`, read at
/// Higress commit `4e0d6914`) for the fields a Channel expresses.
pub fn provider_problem(channel: &Channel) -> Option<String> {
    let spec = &channel.spec;
    let Some(ep) = endpoint(channel) else {
        return Some(format!(
            "provider {} has no public endpoint: set spec.baseUrl",
            spec.provider.as_str()
        ));
    };
    match spec.provider {
        Provider::Azure if !spec.base_url.as_deref().is_some_and(|u| u.contains("api-version=")) => {
            Some(
                "an azure baseUrl must carry the api-version query parameter, e.g. \
                 https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT/chat/completions?api-version=2024-10-21"
                    .into(),
            )
        }
        // ai-proxy builds these providers' paths itself and applies no base path.
        Provider::Gemini | Provider::Vertex | Provider::Bedrock
            if spec.base_url.is_some() && !ep.path.is_empty() =>
        {
            Some(format!(
                "a {} baseUrl is scheme://host[:port] only (ai-proxy builds its paths and \
                 applies no base path), not {}",
                spec.provider.as_str(),
                spec.base_url.as_deref().unwrap_or_default()
            ))
        }
        Provider::Bedrock if bedrock_region(&ep).is_none() => Some(
            "a bedrock baseUrl must name the region: https://bedrock-runtime.REGION.amazonaws.com"
                .into(),
        ),
        // The usage reporter reads each provider's own usage; Bedrock's (Converse
        // `usage.inputTokens`, and streams in AWS's binary event-stream framing) it cannot read
        // yet, so every answer would be billed at authz's estimate. Not served until it is.
        Provider::Bedrock => Some(
            "bedrock is not served yet: the usage reporter cannot read Bedrock's usage (Converse \
             JSON, AWS event streams), so its answers could only be billed at estimates"
                .into(),
        ),
        _ => None,
    }
}

fn provider_entry(r: &Routable<'_>) -> Value {
    let spec = &r.channel.spec;
    let mut p = json!({"id": r.channel.name_any(), "type": spec.provider.as_str(), "protocol": "openai",
                       "apiTokens": r.keys});
    if !spec.model_mapping.is_empty() {
        p["modelMapping"] = json!(spec.model_mapping);
    }
    if let Some(url) = &spec.base_url {
        match spec.provider {
            Provider::Openai => p["openaiCustomUrl"] = json!(url),
            Provider::Azure => p["azureServiceUrl"] = json!(url),
            // Every other provider ignores `openaiCustomUrl`: ai-proxy's own `providerDomain`
            // (the upstream `:authority`) and `providerBasePath` (prefixed to the provider's
            // paths) point it at the base URL, where the registry sends it. `generic` only
            // rewrites the host, with `genericHost`.
            _ => {
                if let Some(ep) = Endpoint::parse(url) {
                    let default_port = if ep.https { 443 } else { 80 };
                    let authority = if ep.port == default_port {
                        ep.host.clone()
                    } else {
                        format!("{}:{}", ep.host, ep.port)
                    };
                    if spec.provider == Provider::Generic {
                        p["genericHost"] = json!(authority);
                    }
                    p["providerDomain"] = json!(authority);
                    if !ep.path.is_empty() {
                        p["providerBasePath"] = json!(ep.path);
                    }
                }
            }
        }
    }
    if spec.provider == Provider::Claude {
        p["claudeVersion"] = json!("2023-06-01");
    }
    if let Some(ep) = endpoint(r.channel) {
        match spec.provider {
            Provider::Ollama => {
                p["ollamaServerHost"] = json!(ep.host);
                p["ollamaServerPort"] = json!(ep.port);
            }
            Provider::Bedrock => {
                if let Some(region) = bedrock_region(&ep) {
                    p["awsRegion"] = json!(region);
                }
            }
            _ => {}
        }
    }
    p
}

/// Metadata of every object written here.
fn metadata(name: &str, namespace: &str) -> Value {
    json!({"name": name, "namespace": namespace,
           "labels": {labels::MANAGED_BY: MANAGED_BY, labels::COMPONENT: COMPONENT}})
}

/// Escapes a model name for Higress's regex header match.
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "[]{}()^$|*+?.\\".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// (service, port, weight) of one upstream of a route.
type Upstream = (String, u16, i32);
/// (priority, service, port, weight, `max_retry`) of one channel serving a model.
type Serving = (i32, String, u16, i32, i32);

/// One route: the models of a group, the weighted upstream services of its top priority tier,
/// and those of the next tier, which serve when the top tier answers 5xx or 429.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Route {
    upstreams: Vec<Upstream>,
    fallback: Vec<Upstream>,
    /// Retries after the first try (Higress's `proxy-next-upstream-tries` → Istio `attempts`).
    tries: i32,
    models: Vec<String>,
}

fn routes(channels: &[Routable<'_>]) -> Vec<Route> {
    // model → every enabled channel serving it.
    let mut by_model: BTreeMap<&str, Vec<Serving>> = BTreeMap::new();
    for r in channels {
        let Some(ep) = endpoint(r.channel) else {
            continue;
        };
        let spec = &r.channel.spec;
        for m in &spec.models {
            by_model.entry(m).or_default().push((
                spec.priority,
                service(r.channel, &ep),
                ep.port_for_service(),
                spec.weight,
                spec.max_retry,
            ));
        }
    }
    // group models by identical top and next tiers.
    let mut groups: BTreeMap<(Vec<Upstream>, Vec<Upstream>, i32), Vec<String>> = BTreeMap::new();
    for (model, mut serving) in by_model {
        serving.sort();
        let top = serving.iter().map(|s| s.0).max().unwrap_or_default();
        let next = serving.iter().map(|s| s.0).filter(|p| *p < top).max();
        let tier = |p: i32| -> Vec<Upstream> {
            normalise(
                serving
                    .iter()
                    .filter(|s| s.0 == p)
                    .map(|s| (s.1.clone(), s.2, s.3))
                    .collect(),
            )
        };
        let tries = serving
            .iter()
            .filter(|s| s.0 == top)
            .map(|s| s.4)
            .max()
            .unwrap_or_default();
        let fallback = next.map(tier).unwrap_or_default();
        groups
            .entry((tier(top), fallback, tries))
            .or_default()
            .push(model.to_owned());
    }
    groups
        .into_iter()
        .map(|((upstreams, fallback, tries), models)| Route {
            upstreams,
            fallback,
            tries,
            models,
        })
        .collect()
}

impl Endpoint {
    /// The port the Higress service of the registry listens on (static registries use 80).
    fn port_for_service(&self) -> u16 {
        if self.is_ip() { 80 } else { self.port }
    }
}

/// Scales weights to percentages summing to exactly 100 (Higress requires it); the remainder goes
/// to the first upstreams in order.
fn normalise(upstreams: Vec<(String, u16, i32)>) -> Vec<(String, u16, i32)> {
    let total: i32 = upstreams.iter().map(|u| u.2.max(1)).sum();
    if total == 0 {
        return upstreams;
    }
    let mut out: Vec<(String, u16, i32)> = upstreams
        .into_iter()
        .map(|(s, p, w)| (s, p, w.max(1) * 100 / total))
        .collect();
    let mut rest = 100 - out.iter().map(|u| u.2).sum::<i32>();
    for u in &mut out {
        if rest == 0 {
            break;
        }
        u.2 += 1;
        rest -= 1;
    }
    out
}

/// The Ingress name of a route (its fallback adds `-fallback`): stable for a set of models.
fn route_name(route: &Route) -> String {
    let mut hasher = Sha256::new();
    for m in &route.models {
        hasher.update(m.as_bytes());
        hasher.update([0]);
    }
    format!("{PREFIX}route-{}", &hex::encode(hasher.finalize())[..10])
}

/// `higress.io/destination`: one line per upstream, weighted when there are several.
fn destination(upstreams: &[Upstream]) -> String {
    if let [(s, p, _)] = upstreams {
        return format!("{s}:{p}");
    }
    upstreams
        .iter()
        .map(|(s, p, w)| format!("{w}% {s}:{p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The route Ingress, or with `fallback` its fallback twin: same models and path, only for
/// requests Envoy redirected internally from the primary route (`x-higress-fallback-from`).
fn route_ingress(route: &Route, config: &Config, fallback: bool) -> Result<Ingress> {
    let primary = route_name(route);
    let (name, upstreams) = if fallback {
        (format!("{primary}-fallback"), &route.fallback)
    } else {
        (primary.clone(), &route.upstreams)
    };
    let destination = destination(upstreams);
    let mut annotations = BTreeMap::from([
        ("higress.io/destination".to_owned(), destination),
        (
            "higress.io/enable-proxy-next-upstream".to_owned(),
            "true".to_owned(),
        ),
        (
            "higress.io/proxy-next-upstream-tries".to_owned(),
            route.tries.to_string(),
        ),
        (
            "higress.io/proxy-next-upstream".to_owned(),
            "error,timeout,http_502,http_503".to_owned(),
        ),
    ]);
    annotations.insert(
        "higress.io/request-header-control-remove".to_owned(),
        headers::NOT_UPSTREAM.join(","),
    );
    if let [model] = route.models.as_slice() {
        annotations.insert(
            format!("higress.io/exact-match-header-{MODEL_HEADER}"),
            model.clone(),
        );
    } else {
        let alternatives: Vec<String> = route.models.iter().map(|m| regex_escape(m)).collect();
        annotations.insert(
            format!("higress.io/regex-match-header-{MODEL_HEADER}"),
            format!("^({})$", alternatives.join("|")),
        );
    }
    if fallback {
        annotations.insert(
            format!("higress.io/exact-match-header-{FALLBACK_HEADER}"),
            primary,
        );
    }
    let mut meta = metadata(&name, &config.higress_namespace);
    meta["annotations"] = json!(annotations);
    Ok(serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta,
        "spec": {"ingressClassName": "higress", "rules": [{"http": {"paths": [{
            "path": "/v1", "pathType": "Prefix",
            "backend": {"resource": {"apiGroup": "networking.higress.io", "kind": "McpBridge", "name": "default"}}
        }]}}]}
    }))?)
}

/// The header Envoy adds when it redirects a request to the fallback route.
pub const FALLBACK_HEADER: &str = "x-higress-fallback-from";

/// The `EnvoyFilter` API (Istio, read by Higress).
pub fn envoy_filter_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1alpha3", "EnvoyFilter"),
        "envoyfilters",
    )
}

/// `udpa.type.v1.TypedStruct` around a typed config, as the Higress console writes the
/// `custom_response` configs: Istio passes a `TypedStruct` through to Envoy unparsed, where a
/// directly typed message with fields its own Envoy protos lack would be dropped or refused.
fn typed_struct(type_name: &str, value: &Value) -> Value {
    json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": format!("type.googleapis.com/{type_name}"),
        "value": value,
    })
}

/// Sends a 5xx or 429 answer **from the provider** of the primary route through Envoy's
/// `custom_response` filter as an internal redirect to a fallback Ingress serving the next tier —
/// the mechanism and the fields of the Higress console's AI-route fallback (its
/// `envoyfilter-route-fallback.yaml`), which Higress's Envoy build adds to `RedirectPolicy`:
/// - `use_original_request_uri`: the client's host and path (`x-envoy-original-host` / `-path`)
///   instead of what ai-proxy rewrote them to; `use_original_request_body`: the body the client
///   sent, not ai-proxy's rewrite; `max_internal_redirects` 1: one fallback tier;
/// - `only_redirect_upstream_code`: a refusal by the gateway itself (authz's 429 for quota, an
///   ai-proxy error) is answered as is, never retried on another tier;
/// - `keep_original_response_code` false: the client gets the fallback tier's status.
///
/// The redirect adds [`FALLBACK_HEADER`] (which only the fallback Ingress matches) and
/// [`headers::FALLBACK`]: the first pass's event id from filter state, on which authz admits the
/// second pass (the client's key is gone by then) and retires the first pass's reservation.
fn fallback_filter(route: &Route, config: &Config) -> Result<DynamicObject> {
    let primary = route_name(route);
    let overwrite = |key: &str, value: &str| json!({"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"});
    let redirect = json!({
        "name": "fallback",
        "typed_config": typed_struct(
            "envoy.extensions.http.custom_response.redirect_policy.v3.RedirectPolicy",
            &json!({
                "max_internal_redirects": 1,
                "use_original_request_uri": true,
                "use_original_request_body": true,
                "keep_original_response_code": false,
                "only_redirect_upstream_code": true,
                "request_headers_to_add": [
                    overwrite(FALLBACK_HEADER, &primary),
                    overwrite(headers::FALLBACK, &headers::fallback_value()),
                ],
                "response_headers_to_add": [overwrite(FALLBACK_HEADER, &primary)],
            }),
        ),
    });
    let input = |name: String, type_name: &str| json!({"name": name, "typed_config": {"@type": format!("type.googleapis.com/{type_name}")}});
    let class = |c: &str| {
        json!({"predicate": {"single_predicate": {
            "input": input(format!("{c}_class"), "envoy.type.matcher.v3.HttpResponseStatusCodeClassMatchInput"),
            "value_match": {"exact": c}}}, "on_match": {"action": redirect}})
    };
    let code = |c: &str| {
        json!({"predicate": {"single_predicate": {
            "input": input(format!("status_{c}"), "envoy.type.matcher.v3.HttpResponseStatusCodeMatchInput"),
            "value_match": {"exact": c}}}, "on_match": {"action": redirect}})
    };
    // `with_request_body` (Higress's build): the filter buffers the request body up to this
    // size, so the original body can be sent again; the bound authz reads.
    let custom_response = typed_struct(
        "envoy.extensions.filters.http.custom_response.v3.CustomResponse",
        &json!({
            "custom_response_matcher": {"matcher_list": {"matchers": [class("5xx"), code("429")]}},
            "with_request_body": {"max_request_bytes": AUTHZ_MAX_BODY_BYTES},
        }),
    );
    let ar = envoy_filter_resource();
    Ok(serde_json::from_value(json!({
        "apiVersion": ar.api_version, "kind": ar.kind,
        "metadata": metadata(&primary, &config.higress_namespace),
        "spec": {"configPatches": [{
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "GATEWAY", "routeConfiguration": {"vhost": {"route": {"name": primary}}}},
            "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {
                "envoy.filters.http.custom_response": custom_response
            }}}
        }]}
    }))?)
}

/// `GET /v1/models` on every domain, answered by authz from its index (it checks key and domain
/// as for a request). Exact path: authz's decision endpoint stays out of reach.
fn models_ingress(config: &Config) -> Result<Ingress> {
    let name = format!("{PREFIX}models");
    let mut meta = metadata(&name, &config.higress_namespace);
    meta["annotations"] = json!({
        "higress.io/destination": format!("{}:{}", config.authz_service, config.authz_port),
    });
    Ok(serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta,
        "spec": {"ingressClassName": "higress", "rules": [{"http": {"paths": [{
            "path": "/v1/models", "pathType": "Exact",
            "backend": {"resource": {"apiGroup": "networking.higress.io", "kind": "McpBridge", "name": "default"}}
        }]}}]}
    }))?)
}

fn api_ingress(config: &Config) -> Result<Ingress> {
    let name = format!("{PREFIX}api");
    let mut meta = metadata(&name, &config.higress_namespace);
    meta["annotations"] = json!({"higress.io/destination": config.apiserver_destination});
    let path = |p: &str| {
        json!({"path": p, "pathType": "Prefix",
        "backend": {"resource": {"apiGroup": "networking.higress.io", "kind": "McpBridge", "name": "default"}}})
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta,
        "spec": {"ingressClassName": "higress", "rules": [{"http": {"paths": [path("/api"), path("/oauth")]}}]}
    }))?)
}

/// The header an internal-cluster route requires: a value no client knows.
pub const INTERNAL_HEADER: &str = "x-aigw-internal-route";

/// The value of [`INTERNAL_HEADER`] an internal-cluster route requires: derived from the ingest
/// secret, so no client can know it (and the header scrub removes any `x-aigw-*` a client sends).
pub fn internal_route_value(ingest_secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"aigw-internal-route\0");
    hasher.update(ingest_secret.as_bytes());
    hex::encode(hasher.finalize())
}

/// `service:port` of a cluster named `outbound|<port>||<service>`.
/// `service:port` of an Envoy cluster name `outbound|<port>||<service>` (the `--ingest-cluster`
/// the reporter calls); an error for anything else, which the operator refuses at start.
pub fn cluster_destination(cluster: &str) -> Result<String> {
    let parts: Vec<&str> = cluster.split('|').collect();
    match parts.as_slice() {
        ["outbound", port, _, service] if !service.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(format!("{service}:{port}"))
        }
        _ => Err(crate::error::Error::Invalid {
            field: "ingestCluster",
            reason: format!("{cluster:?} is not an Envoy cluster name outbound|<port>||<service>"),
        }),
    }
}

/// Routes that exist only so Envoy knows the authz and ingest clusters. Higress pushes to the
/// gateway only clusters some route names when `global.onlyPushRouteCluster` is true (its
/// default), and the plugins' `proxy_http_call` to any other cluster fails. No client can use
/// them: they match one exact path and a header whose value is derived from the ingest secret.
fn internal_ingresses(config: &Config) -> Result<Vec<Ingress>> {
    let value = internal_route_value(&config.ingest_secret);
    let targets = [
        (
            "authz",
            format!("{}:{}", config.authz_service, config.authz_port),
        ),
        ("ingest", cluster_destination(&config.ingest_cluster)?),
    ];
    let mut out = Vec::new();
    for (what, destination) in targets {
        let name = format!("{PREFIX}internal-{what}");
        let mut meta = metadata(&name, &config.higress_namespace);
        meta["annotations"] = json!({
            "higress.io/destination": destination,
            format!("higress.io/exact-match-header-{INTERNAL_HEADER}"): value,
        });
        out.push(serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta,
            "spec": {"ingressClassName": "higress", "rules": [{"http": {"paths": [{
                "path": format!("/.aigw-internal/{what}"), "pathType": "Exact",
                "backend": {"resource": {"apiGroup": "networking.higress.io", "kind": "McpBridge", "name": "default"}}
            }]}}]}
        }))?);
    }
    Ok(out)
}

fn plugin(name: &str, config: &Config, spec: Value) -> Result<DynamicObject> {
    // Built in place, `spec` moved in: ai-proxy's holds every channel's provider, and going
    // through `serde_json::from_value` copied it twice (a pass at 1,000 channels spent a fifth of
    // its CPU there).
    let mut plugin = DynamicObject::new(name, &wasm_plugin_resource())
        .within(&config.higress_namespace)
        .data(json!({}));
    plugin.metadata = serde_json::from_value(metadata(name, &config.higress_namespace))?;
    plugin.data["spec"] = spec;
    Ok(plugin)
}

/// The WasmPlugins: header scrub, model router, ai-proxy (one provider per channel), ext-auth and
/// the usage reporter on the route Ingresses.
fn plugins(
    config: &Config,
    with_endpoint: &[(&Routable<'_>, Endpoint)],
    route_names: &[String],
) -> Result<Vec<DynamicObject>> {
    let providers: Vec<Value> = with_endpoint
        .iter()
        .map(|(r, _)| provider_entry(r))
        .collect();
    let provider_rules: Vec<Value> = with_endpoint
        .iter()
        .map(|(r, ep)| {
            json!({"service": [service(r.channel, ep)], "configDisable": false,
                              "config": {"activeProviderId": r.channel.name_any()}})
        })
        .collect();
    let route_rule =
        |config: Value| json!([{"ingress": route_names, "configDisable": false, "config": config}]);
    let usage = PluginConfig {
        version: aigw_plugin_core::CONFIG_VERSION,
        mode: aigw_plugin_core::Mode::Report,
        ingest_cluster: config.ingest_cluster.clone(),
        ingest_path: "/v1/usage".to_owned(),
        timeout_ms: 2_000,
        ingest_secret: config.ingest_secret.clone(),
    };
    // The same ingest settings: it reports admitted requests that never reach an upstream.
    let credentials = PluginConfig {
        mode: aigw_plugin_core::Mode::Credentials,
        ..usage.clone()
    };
    let ext_auth = json!({
        "http_service": {
            "endpoint_mode": "forward_auth",
            "endpoint": {"service_name": config.authz_service, "service_port": config.authz_port,
                         "path": config.authz_path, "request_method": "POST"},
            "timeout": 1000,
            // The body too (authz sizes the reservation from it and reads the model there), up to
            // the bound authz itself reads.
            "authorization_request": {"allowed_headers": [{"exact": headers::AUTHORIZATION}, {"exact": headers::API_KEY}, {"exact": MODEL_HEADER}, {"exact": headers::FALLBACK}, {"exact": headers::TRACEPARENT}],
                                      "with_request_body": true, "max_request_body_bytes": AUTHZ_MAX_BODY_BYTES},
            "authorization_response": {"allowed_upstream_headers": [{"prefix": "x-aigw-"}, {"exact": "x-mse-consumer"}, {"exact": headers::TRACEPARENT}]}
        },
        "failure_mode_allow": false,
        "status_on_error": 503
    });
    // The providers and rules moved in (`json!` would copy them).
    let mut ai_proxy = json!({
        "url": config.ai_proxy_image, "phase": "UNSPECIFIED_PHASE", "priority": 100,
        "failStrategy": "FAIL_CLOSE", "defaultConfigDisable": false,
    });
    ai_proxy["defaultConfig"] = json!({});
    ai_proxy["defaultConfig"]["providers"] = Value::Array(providers);
    ai_proxy["matchRules"] = Value::Array(provider_rules);
    let has_routes = !route_names.is_empty();
    Ok(vec![
        // Our plugin in scrub mode, before ext-auth (AUTHN 360): client-sent x-aigw-* and
        // x-mse-consumer never reach the upstream side; only authz's answers do.
        plugin(
            &format!("{PREFIX}header-scrub"),
            config,
            json!({
                "url": config.usage_reporter_image, "phase": "AUTHN", "priority": 1000, "failStrategy": "FAIL_CLOSE",
                "defaultConfigDisable": false,
                "defaultConfig": {"version": aigw_plugin_core::CONFIG_VERSION, "mode": "scrub"},
            }),
        )?,
        // Copies the body's `model` into the header the route Ingresses match on. Global: it only
        // acts on LLM API paths (its `enableOnPathSuffix` default).
        plugin(
            &format!("{PREFIX}model-router"),
            config,
            json!({
                "url": config.model_router_image, "phase": "AUTHN", "priority": 900, "failStrategy": "FAIL_CLOSE",
                "defaultConfigDisable": false, "defaultConfig": {"modelToHeader": MODEL_HEADER},
            }),
        )?,
        plugin(&format!("{PREFIX}ai-proxy"), config, ai_proxy)?,
        plugin(
            &format!("{PREFIX}ext-auth"),
            config,
            json!({
                "url": config.ext_auth_image, "phase": "AUTHN", "priority": 360, "failStrategy": "FAIL_CLOSE",
                "defaultConfigDisable": true,
                "matchRules": if has_routes { route_rule(ext_auth) } else { json!([]) },
            }),
        )?,
        // Our plugin removing the client's credentials once ext-auth has sent them to authz
        // (AUTHZ runs after AUTHN, and both before ai-proxy's UNSPECIFIED_PHASE): ai-proxy sets
        // the provider's key but leaves other credential headers (e.g. `Authorization` next to
        // Claude's `x-api-key`, or a client's `x-api-key` next to OpenAI's `Authorization`).
        // Only on LLM routes: the REST API behind `aigw-api` needs its `Authorization`. It also
        // keeps the fallback grant in filter state, and reports an admitted request ai-proxy
        // answered itself (the reporter, after ai-proxy, never sees it): billed at nothing.
        plugin(
            &format!("{PREFIX}credential-strip"),
            config,
            json!({
                "url": config.usage_reporter_image, "phase": "AUTHZ", "priority": 1000, "failStrategy": "FAIL_CLOSE",
                "defaultConfigDisable": true,
                "matchRules": if has_routes { route_rule(serde_json::to_value(&credentials)?) } else { json!([]) },
            }),
        )?,
        plugin(
            &format!("{PREFIX}usage-reporter"),
            config,
            json!({
                "url": config.usage_reporter_image, "phase": "UNSPECIFIED_PHASE", "priority": 10, "failStrategy": "FAIL_OPEN",
                "defaultConfigDisable": true,
                "matchRules": if has_routes { route_rule(serde_json::to_value(&usage)?) } else { json!([]) },
            }),
        )?,
    ])
}

/// The whole desired Higress configuration. `channels` must be the enabled channels whose keys
/// could be read, in any order.
pub fn build(channels: &[Routable<'_>], config: &Config) -> Result<Desired> {
    build_naming(channels, config, &[])
}

/// [`build`], with the Ingress-scoped plugin rules (ext-auth, credential-strip, the usage
/// reporter) also naming the route Ingresses among `leaving`: what the sync writes before it
/// deletes those routes, so no route is ever live without ext-auth.
pub fn build_naming(
    channels: &[Routable<'_>],
    config: &Config,
    leaving: &[String],
) -> Result<Desired> {
    let mut channels: Vec<&Routable<'_>> = channels.iter().collect();
    // By name, compared in place (`name_any` would allocate twice per comparison).
    channels.sort_by(|a, b| a.channel.metadata.name.cmp(&b.channel.metadata.name));
    let with_endpoint: Vec<(&Routable<'_>, Endpoint)> = channels
        .iter()
        .filter(|r| provider_problem(r.channel).is_none())
        .filter_map(|r| endpoint(r.channel).map(|ep| (*r, ep)))
        .collect();

    let registries = with_endpoint
        .iter()
        .map(|(r, ep)| registry(r.channel, ep))
        .collect();

    let routable: Vec<Routable<'_>> = with_endpoint.iter().map(|(r, _)| (*r).clone()).collect();
    let mut ingresses = vec![api_ingress(config)?];
    let mut envoy_filters = Vec::new();
    for route in routes(&routable) {
        ingresses.push(route_ingress(&route, config, false)?);
        if !route.fallback.is_empty() {
            ingresses.push(route_ingress(&route, config, true)?);
            envoy_filters.push(fallback_filter(&route, config)?);
        }
    }
    let mut route_names: Vec<String> = ingresses[1..].iter().map(ResourceExt::name_any).collect();
    let route_prefix = format!("{PREFIX}route-");
    for name in leaving {
        if name.starts_with(&route_prefix) && !route_names.contains(name) {
            route_names.push(name.clone());
        }
    }
    ingresses.push(models_ingress(config)?);
    ingresses.extend(internal_ingresses(config)?);

    let plugins = plugins(config, &with_endpoint, &route_names)?;
    Ok(Desired {
        registries,
        ingresses,
        plugins,
        envoy_filters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config() -> Config {
        Config::with_defaults("higress-system")
    }

    fn channel(name: &str, spec: Value) -> Channel {
        serde_json::from_value(
            json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("https://llm.acme.example/v1").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.https, e.path.as_str()),
            ("llm.acme.example", 443, true, "/v1")
        );
        let e = Endpoint::parse("http://10.0.0.5:8000").unwrap();
        assert!(e.is_ip() && e.port == 8000 && !e.https);
        assert!(Endpoint::parse("ftp://x").is_none());
    }

    #[test]
    fn weights_sum_to_100() {
        let n = normalise(vec![
            ("a".into(), 443, 1),
            ("b".into(), 443, 1),
            ("c".into(), 443, 1),
        ]);
        assert_eq!(n.iter().map(|u| u.2).collect::<Vec<_>>(), vec![34, 33, 33]);
        let n = normalise(vec![("a".into(), 443, 70), ("b".into(), 443, 30)]);
        assert_eq!(n.iter().map(|u| u.2).collect::<Vec<_>>(), vec![70, 30]);
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one scenario, asserted field by field
    fn models_sharing_channels_share_one_route_and_tiers_pick_the_top() {
        let creds = json!({"name": "s", "namespace": "aigw-system", "key": "k"});
        let a = channel(
            "openai-main",
            json!({"provider": "openai", "credentials": creds,
            "models": ["gpt-4o", "gpt-4o-mini"], "priority": 10, "weight": 70, "maxRetry": 1}),
        );
        let b = channel(
            "openai-backup",
            json!({"provider": "openai", "baseUrl": "https://proxy.example/v1",
            "credentials": creds, "models": ["gpt-4o", "gpt-4o-mini"], "priority": 10, "weight": 30}),
        );
        let c = channel(
            "claude",
            json!({"provider": "claude", "credentials": creds,
            "models": ["claude-sonnet-4"], "priority": 0, "weight": 100}),
        );
        let low = channel(
            "openai-cheap",
            json!({"provider": "openai", "credentials": creds,
            "models": ["gpt-4o", "gpt-4o-mini"], "priority": 1}),
        );
        let routable: Vec<Routable<'_>> = [&a, &b, &c, &low]
            .into_iter()
            .map(|channel| Routable {
                channel,
                keys: vec!["sk-1".into()],
            })
            .collect();
        let d = build(&routable, &config()).unwrap();

        assert_eq!(d.registries.len(), 4);
        assert_eq!(
            d.registries[1],
            json!({"name": "aigw-openai-backup", "type": "dns",
            "domain": "proxy.example", "port": 443, "protocol": "https"})
        );
        // api + {gpt-4o, gpt-4o-mini} (top tier 10, fallback tier 1) + its fallback +
        // {claude-sonnet-4} + /v1/models + the two internal-cluster routes.
        assert_eq!(d.ingresses.len(), 7);
        let fallback = d
            .ingresses
            .iter()
            .find(|i| i.name_any().ends_with("-fallback"))
            .unwrap();
        let fa = fallback.annotations();
        assert_eq!(fa["higress.io/destination"], "aigw-openai-cheap.dns:443");
        assert_eq!(
            fa["higress.io/regex-match-header-x-higress-llm-model"],
            "^(gpt-4o|gpt-4o-mini)$"
        );
        let primary = fallback.name_any().trim_end_matches("-fallback").to_owned();
        assert_eq!(
            fa["higress.io/exact-match-header-x-higress-fallback-from"],
            primary
        );
        assert_eq!(
            d.envoy_filters.len(),
            1,
            "only the group with a lower tier falls back"
        );
        let filter = serde_json::to_value(&d.envoy_filters[0]).unwrap();
        assert_eq!(filter["metadata"]["name"], primary);
        assert_eq!(
            filter["spec"]["configPatches"][0]["match"]["routeConfiguration"]["vhost"]["route"]["name"],
            primary
        );
        let gpt = d
            .ingresses
            .iter()
            .find(|i| {
                i.annotations()
                    .contains_key("higress.io/regex-match-header-x-higress-llm-model")
                    && !i.name_any().ends_with("-fallback")
            })
            .unwrap();
        let ann = gpt.annotations();
        assert_eq!(
            ann["higress.io/regex-match-header-x-higress-llm-model"],
            "^(gpt-4o|gpt-4o-mini)$"
        );
        assert_eq!(
            ann["higress.io/destination"],
            "30% aigw-openai-backup.dns:443\n70% aigw-openai-main.dns:443"
        );
        assert_eq!(
            ann["higress.io/proxy-next-upstream-tries"], "2",
            "largest maxRetry of the tier (default 2): Istio counts retries, not tries"
        );
        let claude = d
            .ingresses
            .iter()
            .find(|i| {
                i.annotations()
                    .get("higress.io/exact-match-header-x-higress-llm-model")
                    .map(String::as_str)
                    == Some("claude-sonnet-4")
            })
            .unwrap();
        assert_eq!(
            claude.annotations()["higress.io/destination"],
            "aigw-claude.dns:443"
        );

        let ai_proxy = serde_json::to_value(&d.plugins[2]).unwrap();
        assert_eq!(
            ai_proxy["spec"]["defaultConfig"]["providers"][1]["openaiCustomUrl"],
            "https://proxy.example/v1"
        );
        assert_eq!(
            ai_proxy["spec"]["matchRules"][0],
            json!({"service": ["aigw-claude.dns"],
            "configDisable": false, "config": {"activeProviderId": "claude"}})
        );
        let usage = serde_json::to_value(&d.plugins[4]).unwrap();
        let rule = &usage["spec"]["matchRules"][0];
        assert_eq!(
            rule["ingress"].as_array().unwrap().len(),
            3,
            "fallback routes are authorised too"
        );
        // The operator writes exactly what the plugin accepts: one contract, two ends.
        PluginConfig::parse(&serde_json::to_vec(&rule["config"]).unwrap()).unwrap();
    }

    /// The complete Higress output for the channels in `examples/channels.yaml`, reviewed by eye
    /// and pinned: any change to what we write shows up in review as a snapshot diff.
    #[test]
    fn snapshot_of_the_example_channels() {
        let creds = json!({"name": "openai-keys", "namespace": "aigw-system", "key": "apiKeys"});
        let openai = channel(
            "openai-main",
            json!({"provider": "openai", "credentials": creds,
            "models": ["gpt-4o", "gpt-4o-mini"], "priority": 10, "weight": 100}),
        );
        let claude = channel(
            "claude-main",
            json!({"provider": "claude",
            "credentials": {"name": "claude-keys", "namespace": "aigw-system", "key": "apiKeys"},
            "models": ["claude-sonnet-4"], "modelMapping": {"claude-sonnet-4": "claude-sonnet-4-20250514"}}),
        );
        let r = [
            Routable {
                channel: &openai,
                keys: vec!["sk-upstream-openai-1".into(), "sk-upstream-openai-2".into()],
            },
            Routable {
                channel: &claude,
                keys: vec!["sk-ant-upstream-1".into()],
            },
        ];
        let d = build(&r, &config()).unwrap();
        insta::assert_yaml_snapshot!("registries", d.registries);
        insta::assert_yaml_snapshot!("ingresses", d.ingresses);
        insta::assert_yaml_snapshot!("plugins", d.plugins);
    }

    #[test]
    fn route_names_are_stable_and_do_not_grow_with_tenants() {
        let creds = json!({"name": "s", "namespace": "aigw-system", "key": "k"});
        let a = channel(
            "a",
            json!({"provider": "openai", "credentials": creds, "models": ["m1", "m2"]}),
        );
        let r = [Routable {
            channel: &a,
            keys: vec![],
        }];
        let one = build(&r, &config()).unwrap();
        let two = build(&r, &config()).unwrap();
        assert_eq!(one, two);
        assert_eq!(
            one.ingresses.len(),
            5,
            "api + one route + models + authz and ingest, whatever the number of tenants"
        );
    }
}
