//! Our plugin configured the way Higress configures it: the WasmPlugins the operator wrote are read
//! back from the kube-apiserver, turned into the document Higress's controller delivers to
//! `on_configure` (`aigw_standin::higress::delivered_config`: global part + `_rules_` with
//! `_match_route_`), and loaded into the real `.wasm` in the proxy-wasm test host (Envoy itself
//! cannot run here). The reporter used to refuse that document (it parsed only its own fields), so
//! under `FAIL_OPEN` every response would have gone unbilled.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../plugin/tests/host/mod.rs"]
mod host;

use aigw_operator::higress;
use aigw_standin::higress::delivered_config;
use common::{Harness, eventually};
use host::{Drive, Host, build_wasm, load};
use kube::{
    Api,
    api::{DynamicObject, ListParams},
};
use serde_json::Value;

/// An admitted request on route `route`, answered with a small JSON completion; returns how many
/// usage events the plugin sent.
fn report_on(host: &mut Host, route: &str) -> usize {
    host.state()
        .properties
        .insert("route_name".into(), route.as_bytes().to_vec());
    let before = host.state().calls.len();
    let id = host.new_http();
    host.request_headers(
        id,
        &[
            (":authority", "api.acme.example"),
            (":path", "/v1/chat/completions"),
            ("x-higress-llm-model", "gpt-4o"),
            ("x-aigw-tenant", "1"),
            ("x-aigw-user", "alice"),
            ("x-aigw-token", "11"),
            ("x-aigw-event-id", "ev-1"),
        ],
        true,
    );
    host.response_headers(
        id,
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    );
    let body = br#"{"id":"c","object":"chat.completion","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    host.response_body(id, body, true);
    host.finish(id);
    host.tick();
    host.state().calls.len() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_plugins_accept_the_configuration_higress_delivers() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    h.apply_docs(&h.example("channels.yaml")).await;
    let plugins: Api<DynamicObject> =
        Api::namespaced_with(h.client.clone(), &h.hns, &higress::wasm_plugin_resource());
    let spec_of = |name: &'static str| {
        let plugins = plugins.clone();
        async move {
            let p = plugins.get_opt(name).await.unwrap()?;
            let spec = p.data["spec"].clone();
            let routed = spec["matchRules"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|m| m["ingress"].as_array().is_some_and(|i| !i.is_empty()))
            });
            (routed || spec["matchRules"].is_null()).then_some(spec)
        }
    };
    let reporter: Value = eventually("the usage reporter with its routes", || {
        spec_of("aigw-usage-reporter")
    })
    .await;
    let scrub: Value = eventually("the header scrub", || spec_of("aigw-header-scrub")).await;
    let listed = plugins.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.len() >= 5, "{}", listed.items.len());

    // The reporter: rules only, one per set of model routes.
    let delivered = delivered_config(&reporter)
        .unwrap()
        .expect("applied somewhere");
    assert!(delivered.get("_rules_").is_some(), "{delivered}");
    let (mut host, ok) = load(build_wasm(), delivered.to_string().as_bytes());
    assert!(
        ok,
        "on_configure refused what Higress delivers: {:?}",
        host.state().logs
    );
    let route = reporter["matchRules"][0]["ingress"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        report_on(&mut host, &route),
        1,
        "a request on a model route is reported"
    );
    assert_eq!(
        report_on(&mut host, "aigw-api"),
        0,
        "the reporter is configured for the model routes only"
    );
    let event = aigw_plugin_core::UsageEvent::parse(&host.state().calls[0].body).unwrap();
    assert_eq!(
        (event.event_id.as_str(), event.usage.prompt_tokens),
        ("ev-1", Some(3))
    );

    // The scrub instance: a global configuration.
    let delivered = delivered_config(&scrub)
        .unwrap()
        .expect("applied everywhere");
    let (mut host, ok) = load(build_wasm(), delivered.to_string().as_bytes());
    assert!(ok, "{:?}", host.state().logs);
    let id = host.new_http();
    host.request_headers(
        id,
        &[
            (":authority", "api.acme.example"),
            ("x-aigw-tenant", "forged"),
        ],
        false,
    );
    assert!(
        host.state()
            .request_headers
            .iter()
            .all(|(k, _)| k != "x-aigw-tenant"),
        "client-sent gateway headers are dropped"
    );
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}
