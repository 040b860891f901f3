//! One request through the gateway, as Higress would run it — test and dev tooling, never the
//! production data plane. Built only from the objects the operator wrote, read back from the
//! kube-apiserver by the caller (Ingresses, `WasmPlugin`s, the `McpBridge` registries):
//!
//! - **Plugins** run in Higress's order — phase `AUTHN`, `AUTHZ`, `STATS`, then
//!   `UNSPECIFIED_PHASE` (last before the router), higher `priority` first within a phase — each
//!   in its own VM on the [`crate::host`], configured with what Higress's controller delivers
//!   ([`crate::higress::delivered_config`]). A plugin whose `on_configure` fails answers 503 under
//!   `FAIL_CLOSE` and is skipped under `FAIL_OPEN`. Responses run through them in reverse order.
//! - **Routing** follows Higress's Ingress translation for what the operator uses: host, path
//!   (`Prefix`/`Exact`), `higress.io/exact-match-header-*` and `regex-match-header-*` (RE2 full
//!   match), `higress.io/destination` (one or weighted lines), and
//!   `higress.io/request-header-control-remove` (applied by the router, after every plugin). The
//!   route is computed when first needed and cached; a plugin that changes request headers
//!   clears the cache unless it set the `clear_route_cache` property to `off` (Higress's Envoy
//!   behaviour, which ext-auth and ai-proxy rely on). No route: 404 (`route_not_found`).
//! - **Clusters**: `outbound|<port>||<service>`. Registry services (`<name>.dns` / `.static`) go
//!   to the provider stand-in (the intended host, port and scheme are recorded); other services
//!   (the authz and ingest Kubernetes Services) go to the addresses the caller maps them to. With
//!   `only_push_route_clusters` (Higress's default `global.onlyPushRouteCluster: true`) a cluster
//!   no route names is unknown to Envoy, and `proxy_http_call` to it fails with `BadArgument`.
//!
//! Not reproduced: Envoy's retries and the `custom_response` internal redirect, TLS to upstreams
//! (the provider stand-in speaks plain HTTP), HTTP/2, trailers, flow control. Bodies arrive whole;
//! an upstream body is handed to the plugins in chunks of [`Gateway::chunk`] bytes, as a network
//! would split it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::higress::delivered_config;
use crate::{
    fallback::CustomResponses,
    host::{Error, Headers, Host, ROOT, Result, Shared, StreamState, header},
};

/// A plugin module by the name in its `WasmPlugin` URL (`oci://…/ai-proxy:1.0` → `ai-proxy`).
pub type Modules<'a> = &'a dyn Fn(&str) -> Result<&'static [u8]>;

/// One `WasmPlugin`, loaded.
pub struct Filter {
    pub name: String,
    pub phase: u8,
    pub priority: i64,
    pub fail_open: bool,
    pub host: Host,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("name", &self.name)
            .field("configured", &self.host.configured)
            .finish_non_exhaustive()
    }
}

fn phase_rank(phase: &str) -> u8 {
    match phase {
        "AUTHN" => 0,
        "AUTHZ" => 1,
        "STATS" => 2,
        _ => 3,
    }
}

/// A route from one Ingress path.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    hosts: Vec<String>,
    path: String,
    exact_path: bool,
    exact_headers: Vec<(String, String)>,
    regex_headers: Vec<(String, regex::Regex)>,
    /// (service, port, weight)
    pub destinations: Vec<(String, u16, u32)>,
    remove_headers: Vec<String>,
    /// Envoy's retries of the route, from Higress's `proxy-next-upstream*` annotations.
    pub retry: Retry,
}

/// A route's retry policy as Higress writes it for Istio (`annotations/retry.go`): `attempts`
/// retries after the first try, on any 5xx and connect failure when the conditions name
/// `error`, `timeout` or `invalid_header`, and on the listed `http_<code>`s. Envoy retries on the
/// cluster it picked for the route (weighted destinations are drawn once).
#[derive(Debug, Clone, Default)]
pub struct Retry {
    pub attempts: u32,
    pub any_5xx: bool,
    pub codes: Vec<u16>,
}

impl Retry {
    /// The policy of an Ingress's annotations; none without any retry annotation.
    fn from_annotations(ann: &Value) -> Result<Self> {
        let get = |k: &str| ann[format!("higress.io/{k}")].as_str();
        let (tries, timeout, on) = (
            get("proxy-next-upstream-tries"),
            get("proxy-next-upstream-timeout"),
            get("proxy-next-upstream"),
        );
        if tries.is_none() && timeout.is_none() && on.is_none() {
            return Ok(Self::default());
        }
        let mut retry = Self {
            attempts: match tries {
                Some(t) => t
                    .trim()
                    .parse()
                    .map_err(|e| Error(format!("proxy-next-upstream-tries {t:?}: {e}")))?,
                None => 3,
            },
            any_5xx: true,
            codes: Vec::new(),
        };
        if let Some(on) = on {
            let conditions: Vec<&str> = on
                .split([',', ' '])
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            if conditions.contains(&"off") {
                retry.attempts = 0;
            }
            retry.any_5xx = conditions
                .iter()
                .any(|c| matches!(*c, "error" | "timeout" | "invalid_header"));
            retry.codes = conditions
                .iter()
                .filter_map(|c| c.strip_prefix("http_")?.parse().ok())
                .collect();
        }
        Ok(retry)
    }

    /// Whether an answer (`None`: the connection failed) is retried.
    fn retries(&self, status: Option<u16>) -> bool {
        match status {
            None => self.any_5xx,
            Some(s) => (self.any_5xx && s >= 500) || self.codes.contains(&s),
        }
    }
}

impl Route {
    fn matches(&self, headers: &[(String, String)]) -> bool {
        let host = header(headers, ":authority").unwrap_or_default();
        let host = host.split(':').next().unwrap_or_default();
        let path = header(headers, ":path").unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        let host_ok = self.hosts.is_empty()
            || self.hosts.iter().any(|h| match h.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => h == host,
            });
        let path_ok = if self.exact_path {
            path == self.path
        } else {
            let p = self.path.trim_end_matches('/');
            path == p || path.starts_with(&format!("{p}/")) || p.is_empty()
        };
        host_ok
            && path_ok
            && self
                .exact_headers
                .iter()
                .all(|(k, v)| header(headers, k) == Some(v.as_str()))
            && self
                .regex_headers
                .iter()
                .all(|(k, r)| header(headers, k).is_some_and(|v| r.is_match(v)))
    }

    fn specificity(&self) -> (usize, usize, bool) {
        (
            self.exact_headers.len() + self.regex_headers.len(),
            self.path.len(),
            self.exact_path,
        )
    }

    /// The cluster of the first destination (weights are not drawn: tests pin one upstream).
    pub fn cluster(&self) -> Option<String> {
        self.destinations
            .iter()
            .find(|d| d.2 > 0)
            .map(|(s, p, _)| format!("outbound|{p}||{s}"))
    }
}

/// Parses `higress.io/destination`: `svc:port` or lines of `NN% svc:port`.
fn destinations(text: &str) -> Result<Vec<(String, u16, u32)>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (weight, target) = match line.split_once(' ') {
            Some((w, t)) if w.ends_with('%') => (
                w.trim_end_matches('%')
                    .parse::<u32>()
                    .map_err(|e| Error(format!("weight in {line:?}: {e}")))?,
                t.trim(),
            ),
            _ => (100, line),
        };
        let (svc, port) = target
            .rsplit_once(':')
            .ok_or_else(|| Error(format!("destination without port: {line:?}")))?;
        let port = port
            .parse()
            .map_err(|e| Error(format!("port in {line:?}: {e}")))?;
        out.push((svc.to_owned(), port, weight));
    }
    Ok(out)
}

/// The routes of an Ingress (`networking.k8s.io/v1`, as JSON).
pub fn ingress_routes(ingress: &Value) -> Result<Vec<Route>> {
    let name = ingress["metadata"]["name"].as_str().unwrap_or_default();
    let ann = &ingress["metadata"]["annotations"];
    let mut exact_headers = Vec::new();
    let mut regex_headers = Vec::new();
    let mut remove_headers = Vec::new();
    let mut dest = Vec::new();
    for (k, v) in ann.as_object().into_iter().flatten() {
        let v = v.as_str().unwrap_or_default();
        if let Some(h) = k.strip_prefix("higress.io/exact-match-header-") {
            exact_headers.push((h.to_ascii_lowercase(), v.to_owned()));
        } else if let Some(h) = k.strip_prefix("higress.io/regex-match-header-") {
            let re = regex::Regex::new(&format!("^(?:{v})$"))
                .map_err(|e| Error(format!("{name}: regex {v:?}: {e}")))?;
            regex_headers.push((h.to_ascii_lowercase(), re));
        } else if k == "higress.io/destination" {
            dest = destinations(v)?;
        } else if k == "higress.io/request-header-control-remove" {
            remove_headers.extend(
                v.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty()),
            );
        }
    }
    let retry = Retry::from_annotations(ann).map_err(|e| Error(format!("{name}: {}", e.0)))?;
    let mut routes = Vec::new();
    for rule in ingress["spec"]["rules"].as_array().into_iter().flatten() {
        let hosts: Vec<String> = rule["host"]
            .as_str()
            .map(|h| vec![h.to_owned()])
            .unwrap_or_default();
        for p in rule["http"]["paths"].as_array().into_iter().flatten() {
            routes.push(Route {
                name: name.to_owned(),
                hosts: hosts.clone(),
                path: p["path"].as_str().unwrap_or("/").to_owned(),
                exact_path: p["pathType"] == "Exact",
                exact_headers: exact_headers.clone(),
                regex_headers: regex_headers.clone(),
                destinations: dest.clone(),
                remove_headers: remove_headers.clone(),
                retry: retry.clone(),
            });
        }
    }
    Ok(routes)
}

/// A registry of the `McpBridge`: where `<name>.<type>` services resolve.
#[derive(Debug, Clone)]
pub struct Registry {
    pub service: String,
    pub domain: String,
    pub port: u16,
    pub protocol: String,
}

/// The registries of an `McpBridge` spec.
pub fn registries(mcp_bridge: &Value) -> Vec<Registry> {
    mcp_bridge["spec"]["registries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Registry {
            service: format!(
                "{}.{}",
                r["name"].as_str().unwrap_or_default(),
                r["type"].as_str().unwrap_or_default()
            ),
            domain: r["domain"].as_str().unwrap_or_default().to_owned(),
            port: r["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(80),
            protocol: r["protocol"].as_str().unwrap_or("http").to_owned(),
        })
        .collect()
}

/// A request as a client sends it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// What the gateway answered.
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// Envoy's `response.code_details`: `via_upstream`, or why the gateway answered itself.
    pub details: String,
    /// The route that served it, if any.
    pub route: Option<String>,
    /// The body chunks as the plugins passed them on.
    pub chunks: Vec<Vec<u8>>,
    /// How many times a fallback redirect sent the request through again.
    pub redirects: u32,
    /// The upstream connection ended before the body did: Envoy resets the downstream stream,
    /// and the plugins never see the body's end.
    pub reset: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A registry endpoint: domain, port, protocol.
pub type Intended = (String, u16, String);

/// The route cache of one stream.
#[derive(Debug, Clone)]
enum RouteCache {
    /// Not computed yet, or cleared by a plugin.
    Empty,
    /// Computed: the route, or none.
    Computed(Option<Box<Route>>),
}

impl RouteCache {
    fn get(&mut self, compute: impl FnOnce() -> Option<Route>) -> Option<Route> {
        if let Self::Empty = self {
            *self = Self::Computed(compute().map(Box::new));
        }
        match self {
            Self::Computed(r) => r.as_deref().cloned(),
            Self::Empty => None,
        }
    }
}

/// An upstream request the gateway sent (after every plugin and the route's header removal).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub cluster: String,
    /// The registry's domain, port and protocol the request was meant for.
    pub intended: Option<Intended>,
}

/// The gateway: loaded plugins, routes, clusters.
pub struct Gateway {
    pub filters: Vec<Filter>,
    pub routes: Vec<Route>,
    pub registries: Vec<Registry>,
    /// Kubernetes Service clusters (`outbound|port||fqdn`) → where they listen here.
    pub services: HashMap<String, SocketAddr>,
    /// Where every registry upstream is sent (the provider stand-in).
    pub provider: SocketAddr,
    /// Higress's `global.onlyPushRouteCluster` (default true).
    pub only_push_route_clusters: bool,
    /// Size of the chunks an upstream body is handed to the plugins in.
    pub chunk: usize,
    pub shared: Shared,
    /// Every upstream request sent, in order.
    pub upstreams: Vec<Upstream>,
    /// Envoy's `custom_response` per route, from the `EnvoyFilter`s ([`Gateway::with_envoy_filters`]).
    pub custom_responses: CustomResponses,
    /// The current stream's filter state, shared by every plugin VM.
    stream_state: StreamState,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("filters", &self.filters)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// The name of a plugin module from its `WasmPlugin` URL.
pub fn module_name(url: &str) -> String {
    let last = url.rsplit('/').next().unwrap_or(url);
    last.split([':', '@']).next().unwrap_or(last).to_owned()
}

impl Gateway {
    /// Builds the gateway from the objects read back: `WasmPlugin`s, Ingresses and the
    /// `McpBridge`, all as JSON.
    pub fn new(
        wasm_plugins: &[Value],
        ingresses: &[Value],
        mcp_bridge: &Value,
        modules: Modules<'_>,
        provider: SocketAddr,
    ) -> Result<Self> {
        Self::metered(
            wasm_plugins,
            ingresses,
            mcp_bridge,
            modules,
            provider,
            false,
        )
    }

    /// [`Gateway::new`]; with `fuel`, every wasm instruction a plugin executes is counted
    /// ([`Host::fuel_used`] of each filter's host) — for the data-plane cost benchmark.
    pub fn metered(
        wasm_plugins: &[Value],
        ingresses: &[Value],
        mcp_bridge: &Value,
        modules: Modules<'_>,
        provider: SocketAddr,
        fuel: bool,
    ) -> Result<Self> {
        let shared = Shared::default();
        let mut filters = Vec::new();
        for wp in wasm_plugins {
            let spec = &wp["spec"];
            let Some(config) = delivered_config(spec).map_err(Error)? else {
                continue;
            };
            let name = wp["metadata"]["name"].as_str().unwrap_or_default();
            let url = spec["url"].as_str().unwrap_or_default();
            let wasm = modules(&module_name(url))?;
            let (host, _) = Host::start(wasm, config.to_string().as_bytes(), fuel, shared.clone())?;
            filters.push(Filter {
                name: name.to_owned(),
                phase: phase_rank(spec["phase"].as_str().unwrap_or_default()),
                priority: spec["priority"].as_i64().unwrap_or_default(),
                fail_open: spec["failStrategy"] == "FAIL_OPEN",
                host,
            });
        }
        filters.sort_by_key(|f| (f.phase, std::cmp::Reverse(f.priority)));
        let stream_state = Arc::new(Mutex::new(HashMap::new()));
        for f in &mut filters {
            f.host.state().stream_state = Some(stream_state.clone());
        }
        let mut routes = Vec::new();
        for ing in ingresses {
            routes.extend(ingress_routes(ing)?);
        }
        Ok(Self {
            filters,
            routes,
            registries: registries(mcp_bridge),
            services: HashMap::new(),
            provider,
            only_push_route_clusters: true,
            chunk: 512,
            shared,
            upstreams: Vec::new(),
            custom_responses: CustomResponses::new(),
            stream_state,
        })
    }

    /// Adds the routes' custom responses (fallback redirects) the `EnvoyFilter`s configure.
    pub fn with_envoy_filters(mut self, envoy_filters: &[Value]) -> Result<Self> {
        self.custom_responses = crate::fallback::custom_responses(envoy_filters)?;
        Ok(self)
    }

    /// The filter state the stream's plugins set (`wasm.<name>`).
    fn filter_state(&self) -> HashMap<String, String> {
        self.stream_state
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("wasm.{k}"), String::from_utf8_lossy(v).into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets the previous stream's filter state (Envoy's lives as long as its stream).
    fn new_stream(&mut self) {
        for f in &mut self.filters {
            let state = f.host.state();
            let keys: Vec<String> = state.filter_state.drain().map(|(k, _)| k).collect();
            for k in keys {
                state.properties.remove(&k);
            }
        }
        if let Ok(mut m) = self.stream_state.lock() {
            m.clear();
        }
    }

    /// The filter named `name`.
    pub fn filter(&mut self, name: &str) -> Option<&mut Filter> {
        self.filters.iter_mut().find(|f| f.name == name)
    }

    /// The route for `headers`: the most specific match.
    pub fn route(&self, headers: &[(String, String)]) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.matches(headers))
            .max_by_key(|r| r.specificity())
    }

    fn known_clusters(&self) -> Option<Vec<String>> {
        self.only_push_route_clusters.then(|| {
            self.routes
                .iter()
                .flat_map(|r| r.destinations.iter())
                .map(|(s, p, _)| format!("outbound|{p}||{s}"))
                .collect()
        })
    }

    /// Sets the stream's properties in every VM.
    fn set_properties(&mut self, props: &[(&str, Option<String>)]) {
        let known = self.known_clusters();
        for f in &mut self.filters {
            let state = f.host.state();
            state.known_clusters.clone_from(&known);
            for (k, v) in props {
                match v {
                    Some(v) => {
                        state
                            .properties
                            .insert((*k).to_owned(), v.as_bytes().to_vec());
                    }
                    None => {
                        state.properties.remove(*k);
                    }
                }
            }
        }
    }

    /// The stream's route: cached as Envoy caches it, computed when first needed.
    fn route_properties(&mut self, headers: &[(String, String)], cached: &mut RouteCache) {
        let route = cached.get(|| self.route(headers).cloned());
        self.set_properties(&[
            ("route_name", route.as_ref().map(|r| r.name.clone())),
            ("cluster_name", route.as_ref().and_then(Route::cluster)),
        ]);
    }

    /// Envoy clears the route cache when a Wasm plugin changed the request headers, unless the
    /// plugin set the `clear_route_cache` property to `off` (Higress's ext-auth and ai-proxy do,
    /// so their header and path rewrites keep the route).
    fn after_callback(&mut self, i: usize, before: &[(String, String)], cached: &mut RouteCache) {
        let state = self.filters[i].host.state();
        let keep = state.properties.get("clear_route_cache").map(Vec::as_slice) == Some(b"off");
        if !keep && state.request_headers != before {
            *cached = RouteCache::Empty;
        }
    }

    /// Dispatches the http calls filter `i` made and delivers their answers, until none is left.
    fn pump(&mut self, i: usize) -> Result<()> {
        loop {
            let calls = std::mem::take(&mut self.filters[i].host.state().calls);
            if calls.is_empty() {
                return Ok(());
            }
            for call in calls {
                let (headers, body) = match self.resolve(&call.cluster) {
                    Some((addr, _)) => send(addr, &call.headers, &call.body, call.timeout_ms)
                        .unwrap_or_else(|_| (Vec::new(), Vec::new())),
                    // Envoy: the call fails (no headers) when the cluster has no endpoint.
                    None => (Vec::new(), Vec::new()),
                };
                // Envoy registers a call on the VM's root context and answers it there; the
                // SDK finds the stream context by the token.
                self.filters[i]
                    .host
                    .deliver(ROOT, call.token, headers, body)?;
            }
        }
    }

    /// Where a cluster's requests go, and the registry endpoint it stands for.
    fn resolve(&self, cluster: &str) -> Option<(SocketAddr, Option<Intended>)> {
        let parts: Vec<&str> = cluster.split('|').collect();
        let service = parts.get(3)?;
        if let Some(r) = self.registries.iter().find(|r| r.service == *service) {
            return Some((
                self.provider,
                Some((r.domain.clone(), r.port, r.protocol.clone())),
            ));
        }
        self.services.get(cluster).map(|a| (*a, None))
    }

    /// Runs every plugin's timer once and dispatches what they send (e.g. the reporter's
    /// outbox). Advances each VM's clock by `ms` first.
    pub fn tick(&mut self, ms: u64) -> Result<()> {
        for i in 0..self.filters.len() {
            let host = &mut self.filters[i].host;
            if host.state().tick_period_ms == 0 || !host.configured {
                continue;
            }
            host.advance_ms(ms);
            host.on_tick()?;
            self.pump(i)?;
        }
        Ok(())
    }

    fn local(&mut self, i: usize) -> Option<Response> {
        let lr = self.filters[i].host.state().local_responses.pop()?;
        self.filters[i].host.state().local_responses.clear();
        Some(Response {
            status: lr.status,
            headers: lr.headers,
            body: lr.body,
            details: if lr.details.is_empty() {
                format!("local_reply_by_{}", self.filters[i].name)
            } else {
                lr.details
            },
            route: None,
            chunks: Vec::new(),
            redirects: 0,
            reset: false,
        })
    }

    /// Sends `req` through the gateway; a route's fallback redirect (Envoy's `custom_response`,
    /// see [`crate::fallback`]) sends it through again as Higress's Envoy would.
    pub fn handle(&mut self, req: &Request) -> Result<Response> {
        let mut headers: Headers = vec![
            (":method".into(), req.method.clone()),
            (":authority".into(), req.authority.clone()),
            (":path".into(), req.path.clone()),
            (":scheme".into(), "https".into()),
        ];
        headers.extend(
            req.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        // An HTTP/1.1 client states the length of the body it sends.
        if !req.body.is_empty() && header(&headers, "content-length").is_none() {
            headers.push(("content-length".into(), req.body.len().to_string()));
        }
        let mut body = req.body.clone();
        let mut redirects = 0u32;
        let mut first_status = None;
        loop {
            let (mut response, final_headers) = self.pass(headers, body)?;
            let policy = response
                .route
                .as_ref()
                .and_then(|r| self.custom_responses.get(r))
                .and_then(|rules| {
                    crate::fallback::matching(rules, response.status, &response.details)
                })
                .filter(|p| redirects < p.max_internal_redirects)
                .cloned();
            let Some(policy) = policy else {
                if let Some(status) = first_status {
                    response.status = status;
                }
                response.redirects = redirects;
                return Ok(response);
            };
            redirects += 1;
            if policy.keep_original_response_code && first_status.is_none() {
                first_status = Some(response.status);
            }
            let state = self.filter_state();
            let next =
                crate::fallback::redirected(&policy, final_headers, &|k| state.get(k).cloned())?;
            // Envoy matches a route on the redirected headers before it recreates the stream,
            // and does not redirect when none matches ("no route").
            if self.route(&next).is_none() {
                if let Some(status) = first_status {
                    response.status = status;
                }
                response.redirects = redirects - 1;
                return Ok(response);
            }
            headers = next;
            body = if policy.use_original_request_body {
                req.body.clone()
            } else {
                Vec::new()
            };
        }
    }

    /// One pass of a request through the plugins, the router and back: the answer, and the
    /// request headers as the plugins and the router left them.
    fn pass(&mut self, mut headers: Headers, mut body: Vec<u8>) -> Result<(Response, Headers)> {
        self.new_stream();
        self.set_properties(&[("upstream.address", None)]);
        self.set_properties(&[("response.code_details", None)]);
        // (filter index, context) of every plugin the request reached.
        let mut contexts: Vec<(usize, i32)> = Vec::new();
        let mut answer = None;
        let mut cached = RouteCache::Empty;
        self.set_properties(&[("clear_route_cache", None)]);
        for i in 0..self.filters.len() {
            self.route_properties(&headers, &mut cached);
            if !self.filters[i].host.configured {
                if self.filters[i].fail_open {
                    continue;
                }
                answer = Some(Response {
                    status: 503,
                    details: format!("wasm_fail_close_{}", self.filters[i].name),
                    ..Response::default()
                });
                break;
            }
            let host = &mut self.filters[i].host;
            let ctx = host.create_http()?;
            contexts.push((i, ctx));
            host.state().request_headers.clone_from(&headers);
            host.state().request_body.clone_from(&body);
            host.state().continued.clear();
            host.on_request_headers(ctx, body.is_empty())?;
            self.pump(i)?;
            self.after_callback(i, &headers, &mut cached);
            if let Some(r) = self.local(i) {
                answer = Some(r);
                break;
            }
            if !body.is_empty() {
                // The plugin may have changed the headers; the route follows them.
                let seen = self.filters[i].host.state().request_headers.clone();
                self.route_properties(&seen, &mut cached);
                let host = &mut self.filters[i].host;
                host.on_request_body(ctx, true)?;
                self.pump(i)?;
                self.after_callback(i, &seen, &mut cached);
                if let Some(r) = self.local(i) {
                    answer = Some(r);
                    break;
                }
            }
            let host = &mut self.filters[i].host;
            headers.clone_from(&host.state().request_headers);
            body.clone_from(&host.state().request_body);
        }
        let mut response = if let Some(mut r) = answer {
            // A plugin's local reply still belongs to the stream's route (its per-route
            // configs, the custom response among them, apply).
            r.route = cached.get(|| self.route(&headers).cloned()).map(|r| r.name);
            r
        } else {
            let route = cached.get(|| self.route(&headers).cloned());
            self.forward(route, &mut headers, &body)
        };
        self.set_properties(&[("response.code_details", Some(response.details.clone()))]);
        if response.status != 0 {
            self.respond(&contexts, &mut response)?;
        }
        for (i, ctx) in contexts {
            self.filters[i].host.end_stream(ctx)?;
            self.pump(i)?;
        }
        Ok((response, headers))
    }

    /// The router: the route of the final headers, its header removal, the upstream call.
    fn forward(&mut self, route: Option<Route>, headers: &mut Headers, body: &[u8]) -> Response {
        let Some(route) = route else {
            return Response {
                status: 404,
                details: "route_not_found".into(),
                ..Response::default()
            };
        };
        headers.retain(|(k, _)| !route.remove_headers.contains(k));
        let Some(cluster) = route.cluster() else {
            return Response {
                status: 503,
                details: "no_healthy_upstream".into(),
                route: Some(route.name),
                ..Response::default()
            };
        };
        let Some((addr, intended)) = self.resolve(&cluster) else {
            return Response {
                status: 503,
                details: "cluster_not_found".into(),
                route: Some(route.name),
                ..Response::default()
            };
        };
        // Envoy's `upstream.address` attribute: set once the router picked an upstream host.
        self.set_properties(&[("upstream.address", Some(addr.to_string()))]);
        // The first try and the route's retries, on the same cluster; the plugins see only the
        // answer of the last one.
        let mut attempt = 0;
        let (mut rh, rb, complete) = loop {
            self.upstreams.push(Upstream {
                cluster: cluster.clone(),
                intended: intended.clone(),
            });
            let answer = send_full(addr, headers, body, 30_000).ok();
            let status = answer
                .as_ref()
                .and_then(|(h, _, _)| header(h, ":status")?.parse().ok());
            if attempt < route.retry.attempts && route.retry.retries(status) {
                attempt += 1;
                continue;
            }
            match answer {
                Some((h, b, complete)) => break (h, b, complete),
                None => {
                    return Response {
                        status: 503,
                        details: "upstream_reset_before_response_started{connection_failure}"
                            .into(),
                        route: Some(route.name),
                        ..Response::default()
                    };
                }
            }
        };
        let status = header(&rh, ":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(502);
        // Envoy drops hop-by-hop framing; the plugins see the body whole, in chunks.
        rh.retain(|(k, _)| k != "transfer-encoding" && k != "connection");
        Response {
            status,
            headers: rh,
            body: rb,
            details: "via_upstream".into(),
            route: Some(route.name),
            chunks: Vec::new(),
            redirects: 0,
            reset: !complete,
        }
    }

    /// The response through the plugins, in reverse order; body chunks buffered while a plugin
    /// asks for it (`StopIterationAndBuffer`), as Envoy does.
    fn respond(&mut self, contexts: &[(usize, i32)], response: &mut Response) -> Result<()> {
        let mut headers: Headers = vec![(":status".into(), response.status.to_string())];
        headers.append(&mut response.headers);
        let mut chunks: Vec<Vec<u8>> = if response.body.is_empty() {
            Vec::new()
        } else {
            response
                .body
                .chunks(self.chunk.max(1))
                .map(<[u8]>::to_vec)
                .collect()
        };
        for &(i, ctx) in contexts.iter().rev() {
            let host = &mut self.filters[i].host;
            host.state().response_headers.clone_from(&headers);
            host.on_response_headers(ctx, chunks.is_empty() && !response.reset)?;
            headers.clone_from(&host.state().response_headers);
            let n = chunks.len();
            let mut out = Vec::new();
            let mut buffered: Vec<u8> = Vec::new();
            for (k, chunk) in chunks.into_iter().enumerate() {
                let end = k + 1 == n && !response.reset;
                buffered.extend(chunk);
                let host = &mut self.filters[i].host;
                host.state().response_chunk = std::mem::take(&mut buffered);
                let action = host.on_response_body(ctx, end)?;
                let passed = std::mem::take(&mut host.state().response_chunk);
                // The plugin may change headers until it first lets data through.
                headers.clone_from(&host.state().response_headers);
                if action == 0 || end {
                    if !passed.is_empty() || end {
                        out.push(passed);
                    }
                } else {
                    buffered = passed;
                }
            }
            self.pump(i)?;
            if let Some(r) = self.local(i) {
                // A plugin replaced the answer (e.g. a provider error mapped by ai-proxy).
                headers = vec![(":status".into(), r.status.to_string())];
                headers.extend(r.headers);
                out = vec![r.body];
            }
            chunks = out;
        }
        response.status = header(&headers, ":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(response.status);
        headers.retain(|(k, _)| !k.starts_with(':'));
        response.headers = headers;
        response.body = chunks.concat();
        response.chunks = chunks;
        Ok(())
    }
}

/// One HTTP/1.1 exchange (`Connection: close`) with `addr`; returns the answer's headers (with
/// `:status`, names lower-case) and its body (de-chunked).
pub fn send(
    addr: SocketAddr,
    headers: &[(String, String)],
    body: &[u8],
    timeout_ms: u32,
) -> Result<(Headers, Vec<u8>)> {
    send_full(addr, headers, body, timeout_ms).map(|(h, b, _)| (h, b))
}

/// [`send`], and whether the answer's body arrived whole (false: the connection ended or was
/// reset before the body's end).
pub fn send_full(
    addr: SocketAddr,
    headers: &[(String, String)],
    body: &[u8],
    timeout_ms: u32,
) -> Result<(Headers, Vec<u8>, bool)> {
    let io = |e: std::io::Error| Error(format!("{addr}: {e}"));
    let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let method = header(headers, ":method").unwrap_or("GET");
    let path = header(headers, ":path").unwrap_or("/");
    let host = header(headers, ":authority").unwrap_or("localhost");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        if k.starts_with(':')
            || k == "host"
            || k == "connection"
            || k == "content-length"
            || k == "transfer-encoding"
        {
            continue;
        }
        let _ = write!(head, "{k}: {v}\r\n");
    }
    let _ = write!(head, "content-length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut raw = Vec::new();
    // A reset after part of the answer keeps the part (the body is then incomplete).
    if let Err(e) = stream.read_to_end(&mut raw)
        && raw.is_empty()
    {
        return Err(io(e));
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error(format!("{addr}: no response head")))?;
    let text = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .ok_or_else(|| Error(format!("{addr}: bad status line")))?;
    let mut out: Headers = vec![(":status".into(), status.to_owned())];
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut rest = raw[split + 4..].to_vec();
    let complete = if header(&out, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let (body, complete) = dechunk(&rest)?;
        rest = body;
        complete
    } else {
        header(&out, "content-length")
            .and_then(|l| l.parse::<usize>().ok())
            .is_none_or(|l| rest.len() >= l)
    };
    out.retain(|(k, _)| k != "content-length");
    Ok((out, rest, complete))
}

/// The body of a chunked answer, and whether its last (empty) chunk arrived.
fn dechunk(mut raw: &[u8]) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Ok((out, false));
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&raw[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .map_err(|e| Error(format!("chunk size: {e}")))?;
        if size == 0 {
            return Ok((out, true));
        }
        let start = eol + 2;
        let Some(chunk) = raw.get(start..start + size) else {
            // Cut inside a chunk: what arrived of it.
            out.extend_from_slice(raw.get(start..).unwrap_or_default());
            return Ok((out, false));
        };
        out.extend_from_slice(chunk);
        raw = raw.get(start + size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retries_follow_higress_annotation_mapping() {
        let ours = Retry::from_annotations(&json!({
            "higress.io/proxy-next-upstream-tries": "2",
            "higress.io/proxy-next-upstream": "error,timeout,http_502,http_503",
        }))
        .unwrap();
        assert_eq!(ours.attempts, 2);
        // error/timeout become Envoy's 5xx: any 5xx and connect failures.
        assert!(ours.retries(Some(500)) && ours.retries(Some(503)) && ours.retries(None));
        assert!(!ours.retries(Some(429)) && !ours.retries(Some(200)));
        let codes_only = Retry::from_annotations(&json!({
            "higress.io/proxy-next-upstream": "http_502",
        }))
        .unwrap();
        assert_eq!(codes_only.attempts, 3, "Higress's default count");
        assert!(codes_only.retries(Some(502)) && !codes_only.retries(Some(500)));
        assert!(!codes_only.retries(None));
        let off =
            Retry::from_annotations(&json!({"higress.io/proxy-next-upstream": "off"})).unwrap();
        assert_eq!(off.attempts, 0);
        assert_eq!(Retry::from_annotations(&json!({})).unwrap().attempts, 0);
        assert!(
            Retry::from_annotations(&json!({"higress.io/proxy-next-upstream-tries": "x"})).is_err()
        );
    }
}
