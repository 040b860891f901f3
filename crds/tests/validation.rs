//! The apiserver enforces the CRDs' validation: valid objects are accepted, and every invalid one is
//! rejected with a message a person understands. Runs against the test bed's real kube-apiserver.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_crds::{Channel, Pricing, Tenant, Token};
use aigw_testkit::{Testbed, scratch_namespace, unique_name};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

async fn setup() -> (Client, String) {
    let client = Testbed::load().unwrap().kube_client().await.unwrap();
    aigw_crds::install(&client, "aigw-crd-test").await.unwrap();
    let ns = scratch_namespace(&client, "crd-test").await.unwrap();
    (client, ns)
}

fn api<K: Resource<DynamicType = ()>>(client: &Client, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<K>(&());
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// An object of these tests: labelled with an instance of its own, so no operator acts on it (an
/// operator without `--instance` skips labelled objects), and deleted by the test that made it.
fn object<K: Resource<DynamicType = ()>>(name: &str, spec: &Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "labels": {aigw_crds::labels::INSTANCE: "crd-validation"}},
        "spec": spec,
    }))
    .unwrap()
}

/// Deletes what a test created: cluster-scoped objects by name, and its scratch namespace.
async fn cleanup(client: &Client, ns: &str, tenants: &[&str], channels: &[&str]) {
    use kube::api::DeleteParams;
    for t in tenants {
        api::<Tenant>(client, None)
            .delete(t, &DeleteParams::default())
            .await
            .unwrap();
    }
    for c in channels {
        api::<Channel>(client, None)
            .delete(c, &DeleteParams::default())
            .await
            .unwrap();
    }
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await
        .unwrap();
}

fn tenant_spec() -> Value {
    json!({"type": "reseller", "displayName": "Acme", "domains": ["api.validation.example", "*.validation.example"],
           "branding": {"logoUrl": "https://acme.example/logo.png", "themeColor": "#112233"}})
}

fn channel_spec() -> Value {
    json!({"provider": "openai", "baseUrl": "https://api.openai.com/v1",
           "credentials": {"name": "openai-keys", "namespace": "aigw-system", "key": "apiKeys"},
           "models": ["gpt-4o", "gpt-4o-mini"], "priority": 10, "weight": 50,
           "upstreamCost": [{"model": "gpt-4o", "input": "2.5", "output": "10"}]})
}

fn pricing_spec() -> Value {
    json!({"currency": "USD", "models": [
        {"model": "gpt-4o", "input": "2.50", "output": "10.000001", "cachedInput": "1.25"}]})
}

fn token_spec() -> Value {
    json!({"owner": "alice", "models": ["gpt-4o"], "quota": 1_000_000, "rateLimit": 60,
           "expiresAt": "2027-01-01T00:00:00Z"})
}

/// Merges `patch` into `base` (objects recursively; anything else replaces).
fn merged(mut base: Value, patch: &Value) -> Value {
    if let (Some(b), Some(p)) = (base.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            let slot = b.entry(k.clone()).or_insert(Value::Null);
            *slot = merged(slot.take(), v);
        }
        base
    } else {
        patch.clone()
    }
}

async fn rejected(api: &Api<DynamicObject>, obj: &DynamicObject) -> String {
    match api.create(&PostParams::default(), obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Ok(_) => panic!(
            "accepted an invalid object: {}",
            serde_json::to_string(obj).unwrap()
        ),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn valid_examples_are_accepted_with_defaults() {
    let (client, ns) = setup().await;
    let (tenant, channel) = (unique_name("ok"), unique_name("ok"));
    let t = api::<Tenant>(&client, None)
        .create(
            &PostParams::default(),
            &object::<Tenant>(&tenant, &tenant_spec()),
        )
        .await
        .unwrap();
    assert_eq!(
        t.data["spec"]["suspended"], false,
        "default applied by the apiserver"
    );
    let c = api::<Channel>(&client, None)
        .create(
            &PostParams::default(),
            &object::<Channel>(&channel, &channel_spec()),
        )
        .await
        .unwrap();
    assert_eq!(c.data["spec"]["maxRetry"], 2);
    api::<Pricing>(&client, Some(&ns))
        .create(
            &PostParams::default(),
            &object::<Pricing>("default", &pricing_spec()),
        )
        .await
        .unwrap();
    let tk = api::<Token>(&client, Some(&ns))
        .create(
            &PostParams::default(),
            &object::<Token>("alice-1", &token_spec()),
        )
        .await
        .unwrap();
    assert_eq!(tk.data["spec"]["disabled"], false);
    // The typed structs read back what the apiserver stored.
    let typed: Api<Token> = Api::namespaced(client.clone(), &ns);
    let token = typed.get("alice-1").await.unwrap();
    assert_eq!(token.spec.quota, 1_000_000);
    assert_eq!(token.spec.rate_limit, 60);
    cleanup(&client, &ns, &[&tenant], &[&channel]).await;
}

/// (kind, name, spec patch over a valid spec, expected part of the apiserver's message)
#[rustfmt::skip]
fn invalid_cases() -> Vec<(&'static str, String, Value, &'static str)> {
    vec![
        ("Tenant", unique_name("t"), json!({"domains": ["API.Acme.example"]}), "each domain must be a lowercase DNS name"),
        ("Tenant", unique_name("t"), json!({"domains": ["localhost"]}), "each domain must be a lowercase DNS name"),
        ("Tenant", unique_name("t"), json!({"domains": ["a.example", "a.example"]}), "Duplicate value: \"a.example\""),
        ("Tenant", unique_name("t"), json!({"type": "partner"}), "Unsupported value: \"partner\""),
        ("Tenant", "a".repeat(58), json!({}), "a tenant name has at most 57 characters"),
        ("Tenant", unique_name("t"), json!({"branding": {"themeColor": "blue"}}), "themeColor must look like #6c8cff"),
        ("Tenant", unique_name("t"), json!({"displayName": ""}), "spec.displayName"),
        ("Channel", unique_name("c"), json!({"provider": "skynet"}), "Unsupported value: \"skynet\""),
        ("Channel", unique_name("c"), json!({"weight": 0}), "spec.weight in body should be greater than or equal to 1"),
        ("Channel", unique_name("c"), json!({"weight": 101}), "spec.weight in body should be less than or equal to 100"),
        ("Channel", unique_name("c"), json!({"priority": -1}), "spec.priority in body should be greater than or equal to 0"),
        ("Channel", unique_name("c"), json!({"models": []}), "spec.models in body should have at least 1 items"),
        ("Channel", unique_name("c"), json!({"baseUrl": "ftp://files.example"}), "baseUrl must be an http(s) URL"),
        ("Channel", unique_name("c"), json!({"upstreamCost": [{"model": "gpt-4o", "input": "-0.5", "output": "1"}]}), "must be a non-negative decimal string"),
        ("Channel", "Bad_Name".into(), json!({}), "metadata.name"),
        ("Pricing", unique_name("p"), json!({"models": [{"model": "gpt-4o", "input": "-1", "output": "1"}]}), "must be a non-negative decimal string"),
        ("Pricing", unique_name("p"), json!({"models": [{"model": "gpt-4o", "input": "1.1234567", "output": "1"}]}), "must be a non-negative decimal string"),
        ("Pricing", unique_name("p"), json!({"models": [{"model": "m", "input": "1", "output": "1"}, {"model": "m", "input": "2", "output": "2"}]}), "spec.models[1]: Duplicate value: {\"model\":\"m\"}"),
        ("Pricing", unique_name("p"), json!({"currency": "usd"}), "currency must be an ISO 4217 code"),
        ("Token", unique_name("k"), json!({"quota": -2}), "spec.quota in body should be greater than or equal to -1"),
        ("Token", unique_name("k"), json!({"rateLimit": -1}), "spec.rateLimit in body should be greater than or equal to 0"),
        ("Token", unique_name("k"), json!({"expiresAt": "next tuesday"}), "spec.expiresAt in body must be of type date-time"),
        ("Token", unique_name("k"), json!({"keyHash": "abc"}), "keyHash must be the SHA-256 of the key"),
        ("Token", unique_name("k"), json!({"owner": ""}), "spec.owner"),
        // Isolation: names and domains that would reach the platform or another tenant.
        ("Tenant", "system".into(), json!({}), "not a reserved name"),
        ("Tenant", unique_name("t"), json!({"domains": ["10.1.2.3"]}), "an IP address is not a domain"),
        ("Tenant", unique_name("t"), json!({"domains": ["*.192.168.0.1"]}), "an IP address is not a domain"),
        ("Tenant", unique_name("t"), json!({"domains": ["*.*.acme.example"]}), "each domain must be a lowercase DNS name"),
        ("Tenant", unique_name("t"), json!({"domains": (0..33).map(|i| format!("d{i}.example")).collect::<Vec<_>>()}), "must have at most 32 items"),
        ("Tenant", unique_name("t"), json!({"branding": {"logoUrl": "javascript:alert(1)"}}), "logoUrl must be an http(s) URL"),
        ("Channel", unique_name("c"), json!({"baseUrl": "https://user@internal.example/"}), "baseUrl must be an http(s) URL"),
        ("Channel", unique_name("c"), json!({"credentials": {"namespace": ""}}), "spec.credentials.namespace"),
        ("Channel", unique_name("c"), json!({"maxRetry": 11}), "spec.maxRetry in body should be less than or equal to 10"),
        // Storable bounds: every accepted price fits MySQL's DECIMAL(12,6).
        ("Pricing", unique_name("p"), json!({"models": [{"model": "gpt-4o", "input": "1234567", "output": "1"}]}), "at most 4 integer digits"),
        ("Pricing", unique_name("p"), json!({"models": [{"model": "gpt-4o", "input": "1", "output": "9999999.5"}]}), "at most 4 integer digits"),
        ("Pricing", unique_name("p"), json!({"currency": "US"}), "currency must be an ISO 4217 code"),
        ("Pricing", unique_name("p"), json!({"models": [{"model": "gpt-4o", "input": "12345", "output": "1"}]}), "at most 4 integer digits"),
        ("Channel", unique_name("c"), json!({"upstreamCost": [{"model": "gpt-4o", "input": "1", "output": "1", "cachedInput": "1000000"}]}), "at most 4 integer digits"),
        ("Token", unique_name("k"), json!({"keyHash": "A".repeat(64)}), "keyHash must be the SHA-256 of the key"),
        ("Token", unique_name("k"), json!({"keyPrefix": "sk-"}), "spec.keyPrefix"),
        ("Token", unique_name("k"), json!({"rateLimit": 1_000_001}), "spec.rateLimit in body should be less than or equal to 1000000"),
        ("Token", unique_name("k"), json!({"models": ["gpt-4o", "gpt-4o"]}), "Duplicate value: \"gpt-4o\""),
        ("Token", unique_name("k"), json!({"owner": "o".repeat(65)}), "spec.owner"),
        ("Token", unique_name("k"), json!({"expiresAt": "9999-12-31T23:59:59Z"}), "expiresAt must be a time in the years 1970 to 2999"),
        ("Token", unique_name("k"), json!({"expiresAt": "0001-01-01T00:00:00Z"}), "expiresAt must be a time in the years 1970 to 2999"),
    ]
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_readable_messages() {
    let (client, ns) = setup().await;
    let cases = invalid_cases();
    let mut failures = Vec::new();
    for (kind, name, patch, want) in &cases {
        let (api, base) = match *kind {
            "Tenant" => (
                api::<Tenant>(&client, None),
                object::<Tenant>(name, &tenant_spec()),
            ),
            "Channel" => (
                api::<Channel>(&client, None),
                object::<Channel>(name, &channel_spec()),
            ),
            "Pricing" => (
                api::<Pricing>(&client, Some(&ns)),
                object::<Pricing>(name, &pricing_spec()),
            ),
            _ => (
                api::<Token>(&client, Some(&ns)),
                object::<Token>(name, &token_spec()),
            ),
        };
        let mut obj = base;
        obj.data["spec"] = merged(obj.data["spec"].take(), patch);
        let message = rejected(&api, &obj).await;
        if !message.contains(want) {
            failures.push(format!("{kind} {patch}: wanted {want:?} in {message:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cleanup(&client, &ns, &[], &[]).await;
}

#[tokio::test]
async fn immutable_fields_cannot_change() {
    let (client, ns) = setup().await;
    let tenants = api::<Tenant>(&client, None);
    let name = unique_name("imm");
    tenants
        .create(
            &PostParams::default(),
            &object::<Tenant>(&name, &tenant_spec()),
        )
        .await
        .unwrap();
    let err = tenants
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "platform"}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("type is immutable"), "{err}");
    // Other fields still change.
    tenants
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "Acme Ltd"}})),
        )
        .await
        .unwrap();

    let tokens = api::<Token>(&client, Some(&ns));
    let hash = "a".repeat(64);
    let spec = merged(
        token_spec(),
        &json!({"keyHash": hash, "keyPrefix": "sk-aaaa"}),
    );
    tokens
        .create(&PostParams::default(), &object::<Token>("fixed", &spec))
        .await
        .unwrap();
    let err = tokens
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"keyHash": "b".repeat(64)}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("keyHash is immutable"), "{err}");
    let err = tokens
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"keyHash": null}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("keyHash is immutable"), "{err}");
    cleanup(&client, &ns, &[&name], &[]).await;
}
