//! Every ai-proxy configuration the operator can write is accepted by Higress's real `ai-proxy`
//! build (`on_configure` true), delivered as Higress's controller delivers it. Runs in the
//! stand-in's proxy-wasm host (`aigw_standin`; Envoy cannot run here); no test bed needed.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

use aigw_crds::{Channel, Provider};
use aigw_operator::{
    context::Config,
    higress::{Routable, build, provider_problem},
};
use aigw_standin::{
    gateway::{Gateway, Request},
    higress::delivered_config,
    host::Host,
    plugins,
    provider::Provider as Upstream,
};
use kube::ResourceExt;
use serde_json::{Value, json};

/// Every provider, with the fields a platform admin gives it (a base URL where the provider has
/// no fixed public endpoint).
fn channels() -> Vec<Channel> {
    let all: Vec<Provider> = serde_json::from_value(crd_enum("provider")).expect("provider names");
    all.into_iter()
        .map(|p| {
            let name = p.as_str().to_owned();
            let mut spec = json!({"provider": name, "models": [format!("m-{name}")],
                "credentials": {"name": "s", "namespace": "aigw-system", "key": "k"}});
            spec["baseUrl"] = match p {
                Provider::Azure => json!("https://acme.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
                Provider::Ollama => json!("http://ollama.internal:11434"),
                Provider::Bedrock => json!("https://bedrock-runtime.us-east-1.amazonaws.com"),
                Provider::Vertex => json!("https://us-central1-aiplatform.googleapis.com"),
                Provider::Generic | Provider::Cloudflare
                | Provider::Baidu | Provider::Hunyuan | Provider::Spark | Provider::Ai360 => {
                    json!(format!("https://{name}.example.com/v1"))
                }
                _ => Value::Null,
            };
            serde_json::from_value(json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
                "metadata": {"name": format!("c-{name}")}, "spec": spec}))
            .unwrap()
        })
        .collect()
}

/// The values of the Channel CRD's enum field `field`, from the generated CRD YAML.
fn crd_enum(field: &str) -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/crds.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde_json::to_value(
            <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap(),
        )
        .unwrap();
        if v["spec"]["names"]["kind"] == "Channel" {
            return v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"][field]["enum"]
                .clone();
        }
    }
    panic!("no Channel CRD");
}

fn ai_proxy_config(channels: &[Channel]) -> Value {
    let routable: Vec<Routable<'_>> = channels
        .iter()
        .map(|c| Routable {
            channel: c,
            keys: vec![format!("key-{}", c.name_any())],
        })
        .collect();
    let desired = build(&routable, &Config::with_defaults("higress-system")).unwrap();
    let plugin = desired
        .plugins
        .iter()
        .find(|p| p.name_any() == "aigw-ai-proxy")
        .unwrap();
    delivered_config(&plugin.data["spec"]).unwrap().unwrap()
}

#[test]
fn every_provider_configuration_is_accepted_by_ai_proxy() {
    if !aigw_standin::plugins::reference_available(
        "every_provider_configuration_is_accepted_by_ai_proxy",
    )
    .unwrap()
    {
        return;
    }
    let wasm = plugins::higress("ai-proxy").unwrap();
    let mut refused = Vec::new();
    // Every provider the operator serves; Bedrock is not served (its usage is not metered yet).
    let (served, left_out): (Vec<Channel>, Vec<Channel>) = channels()
        .into_iter()
        .partition(|c| provider_problem(c).is_none());
    let left_out: Vec<String> = left_out.iter().map(ResourceExt::name_any).collect();
    assert_eq!(left_out, ["c-bedrock"]);
    for channel in served {
        let config = ai_proxy_config(std::slice::from_ref(&channel));
        let (mut host, ok) = Host::load(wasm, config.to_string().as_bytes()).unwrap();
        if !ok {
            let logs: Vec<String> = host.state().logs.iter().map(|l| l.1.clone()).collect();
            refused.push(format!("{}: {}", channel.name_any(), logs.join(" | ")));
        }
    }
    assert!(
        refused.is_empty(),
        "ai-proxy refused:\n{}",
        refused.join("\n")
    );
}

fn channel(name: &str, spec: Value) -> Channel {
    let mut spec = spec;
    spec["credentials"] = json!({"name": "s", "namespace": "aigw-system", "key": "k"});
    spec["models"] = json!([format!("m-{name}")]);
    serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
        "metadata": {"name": name}, "spec": spec}),
    )
    .unwrap()
}

#[test]
fn a_misconfigured_channel_is_named_and_left_out_and_the_others_serve() {
    if !aigw_standin::plugins::reference_available(
        "a_misconfigured_channel_is_named_and_left_out_and_the_others_serve",
    )
    .unwrap()
    {
        return;
    }
    let wasm = plugins::higress("ai-proxy").unwrap();
    let bad = [
        channel(
            "azure-no-version",
            json!({"provider": "azure", "baseUrl": "https://acme.openai.azure.com/openai/deployments/d/chat/completions"}),
        ),
        channel("ollama-no-url", json!({"provider": "ollama"})),
        channel(
            "bedrock-no-region",
            json!({"provider": "bedrock", "baseUrl": "https://bedrock.example.com"}),
        ),
        channel("generic-no-url", json!({"provider": "generic"})),
    ];
    // Each is refused by ai-proxy itself when written as is (what the operator used to do).
    for b in &bad {
        let problem = provider_problem(b);
        assert!(problem.is_some(), "{} has no problem named", b.name_any());
    }
    let mut all = channels();
    all.extend(bad.iter().cloned());
    let config = ai_proxy_config(&all);
    let text = config.to_string();
    for b in &bad {
        assert!(
            !text.contains(&format!("\"{}\"", b.name_any())),
            "{} written to ai-proxy",
            b.name_any()
        );
    }
    let (mut host, ok) = Host::load(wasm, text.as_bytes()).unwrap();
    assert!(ok, "ai-proxy refused: {:?}", host.state().logs);
    for c in channels() {
        let written = text.contains(&format!("\"{}\"", c.name_any()));
        if c.spec.provider == Provider::Bedrock {
            let problem = provider_problem(&c).unwrap_or_default();
            assert!(problem.contains("not served yet"), "{problem}");
            assert!(!written, "bedrock written to ai-proxy");
        } else {
            assert!(provider_problem(&c).is_none(), "{}", c.name_any());
            assert!(written, "{}", c.name_any());
        }
    }
}

/// What the operator used to write for a bad channel is refused by ai-proxy (the reason the
/// operator leaves it out): the test's premise, checked against the plugin.
#[test]
fn ai_proxy_refuses_what_the_operator_now_leaves_out() {
    if !aigw_standin::plugins::reference_available(
        "ai_proxy_refuses_what_the_operator_now_leaves_out",
    )
    .unwrap()
    {
        return;
    }
    let wasm = plugins::higress("ai-proxy").unwrap();
    for (name, provider) in [
        (
            "a",
            json!({"id": "a", "type": "azure", "apiTokens": ["k"],
            "azureServiceUrl": "https://acme.openai.azure.com/openai/deployments/d/chat/completions"}),
        ),
        (
            "o",
            json!({"id": "o", "type": "ollama", "apiTokens": ["k"]}),
        ),
        (
            "b",
            json!({"id": "b", "type": "bedrock", "apiTokens": ["k"]}),
        ),
    ] {
        let config = json!({"providers": [provider],
            "_rules_": [{"_match_service_": ["x.dns"], "activeProviderId": name}]});
        let (_, ok) = Host::load(wasm, config.to_string().as_bytes()).unwrap();
        assert!(!ok, "{name} accepted");
    }
}

/// A channel's `baseUrl` decides where its requests go — the registry Envoy connects to — and
/// ai-proxy must send them with that host too (else the upstream gets another host's name, and
/// TLS its SNI). Runs the operator's objects in the stand-in gateway with only Higress's
/// ai-proxy (the request carries the model header model-router would set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_is_honoured_for_every_provider() {
    if !aigw_standin::plugins::reference_available("a_base_url_is_honoured_for_every_provider")
        .unwrap()
    {
        return;
    }
    let providers = [
        "openai",
        "generic",
        "deepseek",
        "claude",
        "gemini",
        "qwen",
        "moonshot",
        "groq",
        "mistral",
        "openrouter",
        "zhipuai",
        "grok",
    ];
    // Gemini takes a host only (ai-proxy builds its paths); with a path it is refused.
    let base = |p: &str| {
        if p == "gemini" {
            format!("https://llm-{p}.proxy.example:8443")
        } else {
            format!("https://llm-{p}.proxy.example:8443/gw")
        }
    };
    let with_path = channel(
        "gem-path",
        json!({"provider": "gemini", "baseUrl": "https://g.example/v1beta"}),
    );
    assert!(provider_problem(&with_path).is_some());
    let channels: Vec<Channel> = providers
        .iter()
        .map(|p| {
            channel(
                &format!("b-{p}"),
                json!({"provider": p, "baseUrl": base(p)}),
            )
        })
        .collect();
    let routable: Vec<Routable<'_>> = channels
        .iter()
        .map(|c| Routable {
            channel: c,
            keys: vec![format!("key-{}", c.name_any())],
        })
        .collect();
    let desired = build(&routable, &Config::with_defaults("higress-system")).unwrap();
    let plugins: Vec<Value> = desired
        .plugins
        .iter()
        .filter(|p| p.name_any() == "aigw-ai-proxy")
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    let ingresses: Vec<Value> = desired
        .ingresses
        .iter()
        .map(|i| serde_json::to_value(i).unwrap())
        .collect();
    let bridge = json!({"spec": {"registries": desired.registries}});
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr;
    let results = tokio::task::spawn_blocking(move || {
        let mut gw =
            Gateway::new(&plugins, &ingresses, &bridge, &|n| plugins::higress(n), addr).unwrap();
        providers
            .iter()
            .map(|p| {
                let body = json!({"model": format!("m-b-{p}"), "messages": [{"role": "user", "content": "hi"}]});
                let r = gw
                    .handle(&Request {
                        method: "POST".into(),
                        authority: "api.t.example".into(),
                        path: "/v1/chat/completions".into(),
                        headers: vec![
                            ("content-type".into(), "application/json".into()),
                            ("x-higress-llm-model".into(), format!("m-b-{p}")),
                        ],
                        body: body.to_string().into_bytes(),
                    })
                    .unwrap();
                (p.to_owned(), r.status, r.details)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let seen = upstream.received();
    assert_eq!(seen.len(), providers.len(), "{results:?}");
    let mut wrong = Vec::new();
    for ((p, _, _), up) in results.iter().zip(&seen) {
        let want = format!("llm-{p}.proxy.example:8443");
        let host = up.header("host").unwrap_or_default();
        if host != want && host != format!("llm-{p}.proxy.example") {
            wrong.push(format!("{p}: host {host}, path {}", up.uri));
        } else if *p != "gemini" && !up.uri.starts_with("/gw/") {
            wrong.push(format!("{p}: path {} outside the base path", up.uri));
        }
    }
    assert!(wrong.is_empty(), "baseUrl ignored:\n{}", wrong.join("\n"));
}
