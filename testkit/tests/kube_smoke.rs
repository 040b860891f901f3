//! The test bed's kube-apiserver is real: namespaces, Higress CRDs validated by the server, watches.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use aigw_testkit::Testbed;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

async fn namespace(client: &kube::Client) -> String {
    aigw_testkit::scratch_namespace(client, "smoke")
        .await
        .unwrap()
}

#[tokio::test]
async fn server_reports_a_real_version() {
    let client = Testbed::load().unwrap().kube_client().await.unwrap();
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    assert!(v.git_version.starts_with("v1."), "{}", v.git_version);
}

#[tokio::test]
async fn higress_objects_are_accepted_and_invalid_ones_rejected() {
    let client = Testbed::load().unwrap().kube_client().await.unwrap();
    let ns = namespace(&client).await;

    let wasm_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("extensions.higress.io", "v1alpha1", "WasmPlugin"),
        "wasmplugins",
    );
    let plugins: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &wasm_ar);
    let good: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "extensions.higress.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "usage-reporter"},
        "spec": {
            "url": "oci://example.invalid/aigw-plugin:0.1.0",
            "phase": "STATS",
            "priority": 100,
            "failStrategy": "FAIL_OPEN",
            "defaultConfig": {"version": 1, "ingestCluster": "outbound|8090||ingest"}
        }
    }))
    .unwrap();
    let created = plugins.create(&PostParams::default(), &good).await.unwrap();
    assert_eq!(created.data["spec"]["priority"], 100);

    // `priority` is an integer and `failStrategy` an enum in the Higress CRD: the apiserver rejects both.
    let mut bad = good.clone();
    bad.metadata.name = Some("bad-plugin".into());
    bad.data["spec"]["priority"] = json!("high");
    bad.data["spec"]["failStrategy"] = json!("SOMETIMES");
    let err = plugins
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.priority"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("spec.failStrategy"),
        "{}",
        status.message
    );

    let bridge: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.higress.io/v1",
        "kind": "McpBridge",
        "metadata": {"name": "default"},
        "spec": {"registries": [{
            "name": "aigw-openai", "type": "dns", "domain": "api.openai.com", "port": 443, "protocol": "https"
        }]}
    }))
    .unwrap();
    let bridge_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.higress.io", "v1", "McpBridge"),
        "mcpbridges",
    );
    let bridges: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &bridge_ar);
    let created = bridges
        .create(&PostParams::default(), &bridge)
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["registries"][0]["port"], 443);
    let mut bad_bridge = bridge.clone();
    bad_bridge.metadata.name = Some("bad".into());
    bad_bridge.data["spec"]["registries"][0]["port"] = json!("https");
    let err = bridges
        .create(&PostParams::default(), &bad_bridge)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_watch_sees_a_change() {
    let client = Testbed::load().unwrap().kube_client().await.unwrap();
    let ns = namespace(&client).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let mut stream = watcher(cms.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let writer = {
        let cms = cms.clone();
        tokio::spawn(async move {
            // Give the watch a moment to be established; the watcher lists first anyway, so an
            // object created before the watch starts is still seen.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": "watched"}, "data": {"k": "v1"}
            }))
            .unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
        })
    };
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(cm) = stream.try_next().await.unwrap() {
            if cm.metadata.name.as_deref() == Some("watched") {
                return cm;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("the watch did not see the new ConfigMap within 30s");
    writer.await.unwrap();
    assert_eq!(seen.data.unwrap()["k"], "v1");
}
