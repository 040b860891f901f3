//! The Higress stand-in: test and dev tooling, never the production data plane.
//!
//! - [`host`]: a proxy-wasm host (wasmtime) that runs Higress's own Go plugins and our reporter.
//! - [`higress`]: what Higress's controller delivers to a plugin for a `WasmPlugin`.
//! - [`gateway`]: a request through the plugins, routed as Higress translates Ingresses.
//! - [`objects`]: the Higress objects, read back from the kube-apiserver.
//! - [`fallback`]: Envoy's `custom_response` redirect, emulated from the `EnvoyFilter`s.
//! - [`envoy_check`]: the Envoy configs in `EnvoyFilter`s, checked against Envoy's protos.
//! - [`provider`]: an upstream LLM provider answering with recorded bodies.
//! - [`tls`]: certificates by SNI from Higress's `higress-https` `ConfigMap`, as the gateway serves them.
//! - [`plugins`]: where Higress's plugin builds and our reporter's build are found.

pub mod envoy_check;
pub mod fallback;
pub mod gateway;
pub mod higress;
pub mod host;
pub mod objects;
pub mod plugins;
pub mod provider;
pub mod tls;
