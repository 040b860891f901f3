//! Hostile tenants against the real test bed: a reseller's administrator acts with exactly the
//! Kubernetes rights the shipped `aigw-tenant-admin` role grants in its own namespace
//! (impersonated, as `kubectl --as`), and tries to reach another tenant's keys, domains, prices and
//! namespaces, or the platform's. After each attempt the victim's CRs, MySQL rows and the authz
//! index are compared with what they were before.
//!
//! Each test is isolated like the reconcile tests: its own operator instance label, Higress
//! namespace, MySQL database and name suffix.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    clippy::many_single_char_names
)]

mod common;

use std::time::Duration;

use aigw_crds::{Channel, Pricing, Tenant, Token, labels};
use aigw_testkit::Testbed;
use common::{Harness, eventually};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The condition `type_` of a CR's status, if any: (status, reason, message).
fn condition(obj: &impl serde::Serialize, type_: &str) -> Option<(String, String, String)> {
    let v = serde_json::to_value(obj).unwrap();
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

impl Harness {
    async fn tenant(&self, name: &str, domains: &[&str]) {
        let t: Tenant = serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.instance}},
            "spec": {"type": "reseller", "displayName": name, "domains": domains}}))
        .unwrap();
        Api::<Tenant>::all(self.client.clone())
            .create(&PostParams::default(), &t)
            .await
            .unwrap();
    }

    fn token_doc(&self, ns: &str, name: &str, spec: &Value) -> Token {
        serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": name, "namespace": ns, "labels": {labels::INSTANCE: self.instance}},
            "spec": spec}))
        .unwrap()
    }

    /// Waits for the object's condition `type_` to have `reason`; returns the object.
    async fn reason<K>(&self, api: &Api<K>, name: &str, type_: &str, reason: &str) -> K
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + serde::Serialize,
    {
        eventually(&format!("{name}: {type_} reason {reason}"), || async {
            let obj = api.get_opt(name).await.unwrap()?;
            let (_, r, _) = condition(&obj, type_)?;
            (r == reason).then_some(obj)
        })
        .await
    }

    /// Grants `user` the shipped tenant-admin role in namespace `ns`; returns a client acting as
    /// that user.
    async fn tenant_admin(&self, ns: &str, user: &str) -> Client {
        let tb = Testbed::load().unwrap();
        let path = format!(
            "{}/../charts/aigateway/files/tenant-admin.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let role: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(self.client.clone());
        roles
            .patch(
                "aigw-tenant-admin",
                &PatchParams::apply("aigw-test").force(),
                &Patch::Apply(&role),
            )
            .await
            .unwrap();
        let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "tenant-admin", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aigw-tenant-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}))
        .unwrap();
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(self.client.clone(), ns)
            .patch(
                "tenant-admin",
                &PatchParams::apply("aigw-test").force(),
                &Patch::Apply(&binding),
            )
            .await
            .unwrap();
        tb.kube_client_as(user).await.unwrap()
    }

    async fn delete_tenants(&self, names: &[&str]) {
        let api: Api<Tenant> = Api::all(self.client.clone());
        for n in names {
            let _ = api.delete(n, &DeleteParams::default()).await;
        }
        for n in names {
            eventually(&format!("tenant {n} gone"), || async {
                api.get_opt(n).await.unwrap().is_none().then_some(())
            })
            .await;
        }
    }
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The victim's token row, as billing and authz rely on it.
async fn token_row(
    db: &sqlx::MySqlPool,
    id: i64,
) -> (i64, String, String, i64, Option<String>, String) {
    sqlx::query_as(
        "SELECT tenant_id, namespace, cr_name, quota, CAST(models AS CHAR), key_hash FROM tokens WHERE id = ?",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_key_hash_never_takes_over_another_tenants_token() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let (a, b) = (format!("va-{}", h.sfx), format!("hb-{}", h.sfx));
    let (ns_a, ns_b) = (format!("aigw-{a}"), format!("aigw-{b}"));
    h.tenant(&a, &[&format!("api.{a}.example")]).await;
    h.tenant(&b, &[&format!("api.{b}.example")]).await;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let ta = h.ready(&tenants, &a).await;
    h.ready(&tenants, &b).await;
    let a_id = ta.status.unwrap().tenant_id.unwrap();

    // The victim's token, and the authz index and billing directory as they see it.
    let hash = sha(&format!("sk-victim-{}", h.sfx));
    let a_tokens: Api<Token> = Api::namespaced(h.client.clone(), &ns_a);
    a_tokens
        .create(
            &PostParams::default(),
            &h.token_doc(
                &ns_a,
                "alice",
                &json!({"owner": "alice", "keyHash": hash, "keyPrefix": "sk-vict", "quota": 1000, "models": ["gpt-4o"]}),
            ),
        )
        .await
        .unwrap();
    let alice = h.ready(&a_tokens, "alice").await;
    let alice_id = alice.status.as_ref().unwrap().token_id.unwrap();
    let before = token_row(&h.db, alice_id).await;
    assert_eq!(before.0, a_id);
    let index = aigw_apiserver::authz::index::Index::default();
    tokio::spawn(index.clone().run(
        h.client.clone(),
        Some(format!("{}={}", labels::INSTANCE, h.instance)),
    ));
    let owner_is_a = || {
        let r = index.token(&hash)?;
        (*r.tenant == *a && r.token_id == alice_id).then_some(())
    };
    eventually("authz indexes the victim's token", || async {
        owner_is_a()
    })
    .await;

    // B's administrator, with only the tenant-admin role in B's namespace.
    let mallory = h.tenant_admin(&ns_b, &format!("mallory-{}", h.sfx)).await;
    let as_b_in_a: Api<Token> = Api::namespaced(mallory.clone(), &ns_a);
    forbidden(as_b_in_a.get("alice").await, "read A's token");
    forbidden(
        as_b_in_a
            .create(
                &PostParams::default(),
                &h.token_doc(&ns_a, "mine", &json!({"owner": "m"})),
            )
            .await,
        "create a token in A's namespace",
    );
    forbidden(
        Api::<Secret>::namespaced(mallory.clone(), &ns_a)
            .list(&ListParams::default())
            .await,
        "list A's secrets",
    );
    forbidden(
        Api::<Channel>::all(mallory.clone())
            .list(&ListParams::default())
            .await,
        "list channels",
    );
    // The attack: a token in B's own namespace (allowed) claiming A's key hash.
    let as_b: Api<Token> = Api::namespaced(mallory.clone(), &ns_b);
    as_b.create(
        &PostParams::default(),
        &h.token_doc(
            &ns_b,
            "copy",
            &json!({"owner": "mallory", "keyHash": hash, "keyPrefix": "sk-vict", "quota": 5, "models": ["cheap"]}),
        ),
    )
    .await
    .unwrap();
    // B cannot hand itself the status the operator refuses it.
    forbidden(
        as_b.patch_status(
            "copy",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"keyHash": hash, "tokenId": alice_id}})),
        )
        .await,
        "write its own token status",
    );
    let b_tokens: Api<Token> = Api::namespaced(h.client.clone(), &ns_b);
    let copy = h.reason(&b_tokens, "copy", "Ready", "DuplicateKey").await;
    let st = copy.status.unwrap();
    assert_eq!(st.key_hash, None, "a refused claim gets no status.keyHash");
    assert_eq!(st.token_id, None);
    // Give the index and MySQL time to go wrong, then compare.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        token_row(&h.db, alice_id).await,
        before,
        "A's MySQL row untouched"
    );
    assert!(owner_is_a().is_some(), "authz still answers A's key as A's");
    let dir = aigw_billing::directory::Directory::load(&h.db)
        .await
        .unwrap();
    let row = dir.token(&alice_id.to_string()).unwrap();
    assert_eq!(
        (row.tenant_id, row.quota),
        (u64::try_from(a_id).unwrap(), 1000),
        "billing bills A's token to A"
    );

    // Deleting B's copy leaves A's token in place everywhere.
    as_b.delete("copy", &DeleteParams::default()).await.unwrap();
    eventually("B's copy gone", || async {
        b_tokens
            .get_opt("copy")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(token_row(&h.db, alice_id).await, before);
    assert!(owner_is_a().is_some(), "deleting the copy did not unlink A");
    let alice = a_tokens.get("alice").await.unwrap();
    assert_eq!(
        alice.status.unwrap().key_hash.as_deref(),
        Some(hash.as_str())
    );

    h.delete_tenants(&[&a, &b]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_adopt_platform_or_foreign_namespaces() {
    let h = Harness::new().await;
    let creds = format!("aigw-creds-{}", h.sfx);
    let ns_api: Api<Namespace> = Api::all(h.client.clone());
    // The platform's credentials namespace (as configured) and a namespace someone else made.
    let pre = format!("aigw-pre-{}", h.sfx);
    for ns in [&creds, &pre] {
        let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        ns_api.create(&PostParams::default(), &n).await.unwrap();
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "precious"}, "data": {"k": "v"}}))
                .unwrap();
        Api::<ConfigMap>::namespaced(h.client.clone(), ns)
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    let creds_ns = creds.clone();
    let (_ctx, shutdown, task) = h.start_configured(move |c| c.credentials_namespace = creds_ns);
    let reserved = creds.trim_start_matches("aigw-").to_owned();
    let foreign = pre.trim_start_matches("aigw-").to_owned();
    h.tenant(&reserved, &[]).await;
    h.tenant(&foreign, &[]).await;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let t = h.reason(&tenants, &reserved, "Ready", "ReservedName").await;
    assert!(condition(&t, "Ready").unwrap().2.contains(&creds));
    let t = h
        .reason(&tenants, &foreign, "Ready", "NamespaceConflict")
        .await;
    assert!(condition(&t, "Ready").unwrap().2.contains("never adopts"));
    assert_eq!(
        t.status.unwrap().tenant_id,
        None,
        "no MySQL row for a refused tenant"
    );
    for ns in [&creds, &pre] {
        let live = ns_api.get(ns).await.unwrap();
        assert!(
            live.metadata
                .owner_references
                .unwrap_or_default()
                .is_empty(),
            "{ns} was adopted"
        );
    }
    // Deleting the refused tenants deletes nothing of the namespaces.
    h.delete_tenants(&[&reserved, &foreign]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ns in [&creds, &pre] {
        let live = ns_api.get(ns).await.unwrap();
        assert!(
            live.metadata.deletion_timestamp.is_none(),
            "{ns} is being deleted"
        );
        assert!(
            Api::<ConfigMap>::namespaced(h.client.clone(), ns)
                .get_opt("precious")
                .await
                .unwrap()
                .is_some()
        );
    }
    // The apiserver refuses the name of the platform's own namespace outright.
    let system: Tenant = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "system"}, "spec": {"type": "reseller", "displayName": "x"}}))
    .unwrap();
    match tenants.create(&PostParams::default(), &system).await {
        Err(kube::Error::Api(e)) => assert!(e.message.contains("reserved name"), "{}", e.message),
        other => panic!("tenant `system` accepted: {other:?}"),
    }
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
    for ns in [&creds, &pre] {
        ns_api.delete(ns, &DeleteParams::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_read_credentials_only_from_the_credentials_namespace() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let a = format!("ca-{}", h.sfx);
    let ns_a = format!("aigw-{a}");
    h.tenant(&a, &[]).await;
    h.ready(&Api::<Tenant>::all(h.client.clone()), &a).await;
    // A secret of the tenant's (here: a generated API key) that a Channel must never read.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "victim-key", "namespace": ns_a},
        "stringData": {"apiKey": "sk-tenant-secret-value"}}))
    .unwrap();
    Api::<Secret>::namespaced(h.client.clone(), &ns_a)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let name = format!("leak-{}", h.sfx);
    let channel: Channel = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
        "metadata": {"name": name, "labels": {labels::INSTANCE: h.instance}},
        "spec": {"provider": "openai", "baseUrl": "https://collector.evil.example/v1",
                 "credentials": {"name": "victim-key", "namespace": ns_a, "key": "apiKey"},
                 "models": ["gpt-4o"]}}))
    .unwrap();
    let channels: Api<Channel> = Api::all(h.client.clone());
    channels
        .create(&PostParams::default(), &channel)
        .await
        .unwrap();
    let c = h
        .reason(&channels, &name, "Ready", "CredentialsNamespaceNotAllowed")
        .await;
    assert!(condition(&c, "Ready").unwrap().2.contains("aigw-system"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channels WHERE name = ?")
        .bind(&name)
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the key was sealed into MySQL");
    assert!(!h.registries().await.contains(&format!("aigw-{name}")));
    let plugins: Api<DynamicObject> = Api::namespaced_with(
        h.client.clone(),
        &h.hns,
        &aigw_operator::higress::wasm_plugin_resource(),
    );
    for p in plugins.list(&ListParams::default()).await.unwrap() {
        let text = serde_json::to_string(&p.data).unwrap();
        assert!(
            !text.contains("sk-tenant-secret-value"),
            "{} leaks the key",
            p.metadata.name.unwrap_or_default()
        );
    }
    channels
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    h.delete_tenants(&[&a]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_covering_another_tenant_or_a_public_suffix_are_refused() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let (a, b, c, d) = (
        format!("da-{}", h.sfx),
        format!("db-{}", h.sfx),
        format!("dc-{}", h.sfx),
        format!("dd-{}", h.sfx),
    );
    let a_host = format!("api.{a}.example");
    h.tenant(&a, &[&a_host]).await;
    let before = h.ready(&tenants, &a).await.status.unwrap();
    // B claims a wildcard over A's host, public suffixes, and one honest domain.
    let b_own = format!("api.{b}.example");
    let over = format!("*.{a}.example");
    h.tenant(&b, &[&over, "*.co.uk", "co.uk", "*.github.io", &b_own])
        .await;
    let tb = h.reason(&tenants, &b, "Ready", "DomainConflict").await;
    let msg = condition(&tb, "Ready").unwrap().2;
    assert!(
        msg.contains(&format!("{over} (overlaps {a_host} of tenant {a})")),
        "{msg}"
    );
    assert!(msg.contains("*.co.uk (a public suffix"), "{msg}");
    assert!(msg.contains("co.uk (a public suffix"), "{msg}");
    assert!(msg.contains("*.github.io (a public suffix"), "{msg}");
    assert_eq!(tb.status.unwrap().domains, vec![b_own.clone()]);
    let after = tenants.get(&a).await.unwrap().status.unwrap();
    assert_eq!(
        (after.domains, after.tenant_id),
        (before.domains, before.tenant_id)
    );
    assert!(
        condition(&tenants.get(&a).await.unwrap(), "Ready")
            .unwrap()
            .0
            == "True"
    );
    // The other order: a wildcard first, then an exact name below it.
    let wild = format!("*.{c}.example");
    h.tenant(&c, &[&wild]).await;
    h.ready(&tenants, &c).await;
    let under = format!("eu.{c}.example");
    h.tenant(&d, &[&under]).await;
    let td = h.reason(&tenants, &d, "Ready", "DomainConflict").await;
    assert!(
        condition(&td, "Ready")
            .unwrap()
            .2
            .contains(&format!("overlaps {wild} of tenant {c}")),
        "{td:?}"
    );
    assert!(td.status.unwrap().domains.is_empty());
    let claims: Vec<(String, i64)> =
        sqlx::query_as("SELECT domain, tenant_id FROM tenant_domains ORDER BY domain")
            .fetch_all(&h.db)
            .await
            .unwrap();
    let domains: Vec<&str> = claims.iter().map(|(d, _)| d.as_str()).collect();
    let mut want = vec![wild.as_str(), a_host.as_str(), b_own.as_str()];
    want.sort_unstable();
    assert_eq!(domains, want, "only first claims are held");
    // The apiserver refuses an IP literal outright.
    let ip: Tenant = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": format!("ip-{}", h.sfx)},
        "spec": {"type": "reseller", "displayName": "x", "domains": ["10.1.2.3"]}}))
    .unwrap();
    match tenants.create(&PostParams::default(), &ip).await {
        Err(kube::Error::Api(status)) => {
            assert!(status.message.contains("IP address"), "{}", status.message);
        }
        other => panic!("an IP domain was accepted: {other:?}"),
    }
    h.delete_tenants(&[&a, &b, &c, &d]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_price_list_neither_applies_nor_deletes_the_first() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let t = format!("pr-{}", h.sfx);
    let ns = format!("aigw-{t}");
    h.tenant(&t, &[]).await;
    let tenant_id = h
        .ready(&Api::<Tenant>::all(h.client.clone()), &t)
        .await
        .status
        .unwrap()
        .tenant_id
        .unwrap();
    let pricing = |name: &str, models: Value| -> Pricing {
        serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Pricing",
            "metadata": {"name": name, "namespace": ns, "labels": {labels::INSTANCE: h.instance}},
            "spec": {"currency": "USD", "models": models}}))
        .unwrap()
    };
    let api: Api<Pricing> = Api::namespaced(h.client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &pricing(
            "first",
            json!([{"model": "gpt-4o", "input": "1.00", "output": "2.00"}]),
        ),
    )
    .await
    .unwrap();
    h.ready(&api, "first").await;
    let rows = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT model, CAST(input_price AS CHAR) FROM pricing WHERE tenant_id = ? ORDER BY model",
        )
        .bind(tenant_id)
        .fetch_all(&h.db)
        .await
        .unwrap()
    };
    let first_rows = rows().await;
    assert_eq!(
        first_rows,
        vec![("gpt-4o".to_owned(), "1.000000".to_owned())]
    );
    api.create(
        &PostParams::default(),
        &pricing(
            "second",
            json!([{"model": "gpt-4o", "input": "9.00", "output": "9.00"},
                   {"model": "other", "input": "1.00", "output": "1.00"}]),
        ),
    )
    .await
    .unwrap();
    let second = h.reason(&api, "second", "Ready", "Conflict").await;
    assert!(condition(&second, "Ready").unwrap().2.contains("first"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rows().await, first_rows, "the second list changed prices");
    api.delete("second", &DeleteParams::default())
        .await
        .unwrap();
    eventually("second gone", || async {
        api.get_opt("second").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(
        rows().await,
        first_rows,
        "deleting the second list deleted prices"
    );
    // Deleting the list in effect while another exists: the other takes over (its rows, its
    // models only); the deletion never removes what the successor wrote.
    api.create(
        &PostParams::default(),
        &pricing(
            "second",
            json!([{"model": "gpt-4o", "input": "9.00", "output": "9.00"},
                   {"model": "other", "input": "1.00", "output": "1.00"}]),
        ),
    )
    .await
    .unwrap();
    h.reason(&api, "second", "Ready", "Conflict").await;
    api.delete("first", &DeleteParams::default()).await.unwrap();
    h.reason(&api, "second", "Ready", "Reconciled").await;
    let second_rows = vec![
        ("gpt-4o".to_owned(), "9.000000".to_owned()),
        ("other".to_owned(), "1.000000".to_owned()),
    ];
    eventually("the successor's prices", || async {
        (rows().await == second_rows).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rows().await,
        second_rows,
        "a cleanup removed the successor's rows"
    );
    api.delete("second", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the last list's rows gone with it", || async {
        rows().await.is_empty().then_some(())
    })
    .await;
    h.delete_tenants(&[&t]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_quota_has_one_writer_and_never_decreases() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let t = format!("uq-{}", h.sfx);
    let ns = format!("aigw-{t}");
    h.tenant(&t, &[]).await;
    h.ready(&Api::<Tenant>::all(h.client.clone()), &t).await;
    let tokens: Api<Token> = Api::namespaced(h.client.clone(), &ns);
    tokens
        .create(
            &PostParams::default(),
            &h.token_doc(
                &ns,
                "bob",
                &json!({"owner": "bob", "keyHash": sha("sk-bob"), "quota": 1000}),
            ),
        )
        .await
        .unwrap();
    let bob = h.ready(&tokens, "bob").await;
    let token_id = u64::try_from(bob.status.unwrap().token_id.unwrap()).unwrap();
    // Billing's status writer, as the worker runs it.
    let sink = aigw_billing::status::spawn(h.client.clone(), Duration::from_millis(100));
    let used = |n: i64| aigw_billing::status::Used {
        token_id,
        namespace: ns.clone(),
        name: "bob".into(),
        quota: 1000,
        used: n,
    };
    sink.send(used(1000)).await.unwrap();
    let state = || async {
        let s = tokens.get("bob").await.unwrap().status.unwrap();
        (s.used_quota, s.phase)
    };
    eventually("exhausted", || async {
        (state().await == (Some(1000), Some(aigw_crds::TokenPhase::Exhausted))).then_some(())
    })
    .await;
    // Redis lost its counters: billing now sees a lower total. The status must not go down.
    sink.send(used(400)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        state().await,
        (Some(1000), Some(aigw_crds::TokenPhase::Exhausted))
    );
    // An operator reconcile (a spec change) leaves billing's field alone.
    let reconciled = |display: &'static str| {
        let tokens = tokens.clone();
        async move {
            tokens
                .patch(
                    "bob",
                    &PatchParams::apply("aigw-test").force(),
                    &Patch::Apply(json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
                        "spec": {"owner": "bob", "keyHash": sha("sk-bob"), "quota": 1000, "displayName": display}})),
                )
                .await
                .unwrap();
            eventually("the operator saw the change", || async {
                let t = tokens.get("bob").await.unwrap();
                (t.status?.common.observed_generation == t.metadata.generation).then_some(())
            })
            .await;
        }
    };
    reconciled("Bob").await;
    assert_eq!(
        state().await,
        (Some(1000), Some(aigw_crds::TokenPhase::Exhausted))
    );
    let live = tokens.get("bob").await.unwrap();
    for mf in live.metadata.managed_fields.unwrap_or_default() {
        if mf.manager.as_deref() == Some("aigw-operator") {
            let fields = serde_json::to_string(&mf.fields_v1).unwrap();
            assert!(
                !fields.contains("usedQuota"),
                "the operator owns usedQuota: {fields}"
            );
        }
    }
    // And the operator counts billing's MySQL total even when the status is gone entirely.
    sqlx::query("UPDATE tokens SET used_quota = 1000 WHERE id = ?")
        .bind(i64::try_from(token_id).unwrap())
        .execute(&h.db)
        .await
        .unwrap();
    tokens
        .patch_status(
            "bob",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"usedQuota": null}})),
        )
        .await
        .unwrap();
    reconciled("Bob 2").await;
    assert_eq!(
        tokens.get("bob").await.unwrap().status.unwrap().phase,
        Some(aigw_crds::TokenPhase::Exhausted),
        "an exhausted token came back to life"
    );
    h.delete_tenants(&[&t]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_bounds_the_apiserver_accepts_are_stored() {
    // A value the CRD accepts but MySQL cannot hold used to fail the mirror on every retry,
    // forever. Every bound is applied here and must end Ready with its row written.
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let t = format!("bd-{}", h.sfx);
    let ns = format!("aigw-{t}");
    let long_domain = format!("{}.{t}.example", "d".repeat(63));
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": t, "labels": {labels::INSTANCE: h.instance}},
        "spec": {"type": "reseller", "displayName": "n".repeat(128), "domains": [long_domain],
                 "branding": {"logoUrl": format!("https://{}", "l".repeat(504)), "themeColor": "#FFFFFF"}}}))
    .unwrap();
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    tenants
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    let tenant_id = h
        .ready(&tenants, &t)
        .await
        .status
        .unwrap()
        .tenant_id
        .unwrap();
    let tokens: Api<Token> = Api::namespaced(h.client.clone(), &ns);
    let model = "m".repeat(128);
    for (name, spec) in [
        (
            "max",
            json!({"owner": "o".repeat(64), "displayName": "d".repeat(64), "keyHash": sha("sk-max"),
                        "keyPrefix": "p".repeat(12), "models": [model], "quota": i64::MAX,
                        "rateLimit": 1_000_000, "expiresAt": "2999-12-31T23:59:59Z"}),
        ),
        (
            "min",
            json!({"owner": "o", "keyHash": sha("sk-min"), "keyPrefix": "pppp", "quota": -1,
                        "rateLimit": 0, "expiresAt": "1970-01-01T00:00:00Z"}),
        ),
    ] {
        tokens
            .create(&PostParams::default(), &h.token_doc(&ns, name, &spec))
            .await
            .unwrap();
        h.ready(&tokens, name).await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE tenant_id = ?")
        .bind(tenant_id)
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    let pricing: Pricing = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Pricing",
        "metadata": {"name": "default", "namespace": ns, "labels": {labels::INSTANCE: h.instance}},
        "spec": {"currency": "USD", "models": [
            {"model": "m".repeat(128), "input": "9999.999999", "output": "0", "cachedInput": "0.000001"}]}}))
    .unwrap();
    let prices: Api<Pricing> = Api::namespaced(h.client.clone(), &ns);
    prices
        .create(&PostParams::default(), &pricing)
        .await
        .unwrap();
    h.ready(&prices, "default").await;
    let stored: String =
        sqlx::query_scalar("SELECT CAST(input_price AS CHAR) FROM pricing WHERE tenant_id = ?")
            .bind(tenant_id)
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(stored, "9999.999999");
    h.delete_tenants(&[&t]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_list_in_another_currency_than_the_platforms_is_refused() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let (platform, reseller) = (format!("plat-{}", h.sfx), format!("cur-{}", h.sfx));
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    for (name, kind) in [(&platform, "platform"), (&reseller, "reseller")] {
        let t: Tenant = serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "labels": {labels::INSTANCE: h.instance}},
            "spec": {"type": kind, "displayName": name}}))
        .unwrap();
        tenants.create(&PostParams::default(), &t).await.unwrap();
        h.ready(&tenants, name).await;
    }
    let list = |ns: String, currency: &str| -> Pricing {
        serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Pricing",
            "metadata": {"name": "default", "namespace": ns, "labels": {labels::INSTANCE: h.instance}},
            "spec": {"currency": currency, "models": [{"model": "gpt-4o", "input": "1", "output": "2"}]}}))
        .unwrap()
    };
    let platform_ns = format!("aigw-{platform}");
    let reseller_ns = format!("aigw-{reseller}");
    let p_api: Api<Pricing> = Api::namespaced(h.client.clone(), &platform_ns);
    p_api
        .create(&PostParams::default(), &list(platform_ns.clone(), "USD"))
        .await
        .unwrap();
    h.ready(&p_api, "default").await;
    let r_api: Api<Pricing> = Api::namespaced(h.client.clone(), &reseller_ns);
    r_api
        .create(&PostParams::default(), &list(reseller_ns.clone(), "CNY"))
        .await
        .unwrap();
    let refused = h
        .reason(&r_api, "default", "Ready", "CurrencyMismatch")
        .await;
    assert!(condition(&refused, "Ready").unwrap().2.contains("USD"));
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pricing WHERE tenant_id <> 0")
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing of the CNY list was applied");
    // In the platform's currency it applies.
    r_api
        .patch(
            "default",
            &PatchParams::apply("aigw-test").force(),
            &Patch::Apply(&list(reseller_ns.clone(), "USD")),
        )
        .await
        .unwrap();
    h.reason(&r_api, "default", "Ready", "Reconciled").await;
    h.delete_tenants(&[&platform, &reseller]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

/// A Token's `spec.owner` is a username of the token's own tenant: its MySQL row (which usage
/// rows take their `user_id` from) carries that user's id, never the id of a namesake in another
/// tenant; a token naming a user who does not exist yet carries 0 until that user accepts an
/// invitation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_owner_is_a_user_of_its_own_tenant() {
    let h = Harness::new().await;
    let (_ctx, shutdown, task) = h.start();
    let (a, b) = (format!("oa-{}", h.sfx), format!("ob-{}", h.sfx));
    h.tenant(&a, &[&format!("api.{a}.example")]).await;
    h.tenant(&b, &[&format!("api.{b}.example")]).await;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let a_id = h
        .ready(&tenants, &a)
        .await
        .status
        .unwrap()
        .tenant_id
        .unwrap();
    let b_id = h
        .ready(&tenants, &b)
        .await
        .status
        .unwrap()
        .tenant_id
        .unwrap();
    let nina_a: i64 = {
        let done = sqlx::query("INSERT INTO users (tenant_id, username) VALUES (?, 'nina')")
            .bind(a_id)
            .execute(&h.db)
            .await
            .unwrap();
        i64::try_from(done.last_insert_id()).unwrap()
    };
    let mut ids = Vec::new();
    for (tenant, key) in [(&a, "sk-owner-a"), (&b, "sk-owner-b")] {
        let ns = format!("aigw-{tenant}");
        let api: Api<Token> = Api::namespaced(h.client.clone(), &ns);
        api.create(
            &PostParams::default(),
            &h.token_doc(&ns, "ninas", &json!({"owner": "nina", "keyHash": sha(&format!("{key}-{}", h.sfx)), "keyPrefix": "sk-owne"})),
        )
        .await
        .unwrap();
        ids.push(
            h.ready(&api, "ninas")
                .await
                .status
                .unwrap()
                .token_id
                .unwrap(),
        );
    }
    let row = |id: i64| {
        let db = h.db.clone();
        async move {
            sqlx::query_as::<_, (i64, String)>("SELECT user_id, owner FROM tokens WHERE id = ?")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(row(ids[0]).await, (nina_a, "nina".to_owned()));
    assert_eq!(
        row(ids[1]).await,
        (0, "nina".to_owned()),
        "A's nina is not B's"
    );

    // B's nina accepts an invitation: B's token is hers from then on; A's is untouched.
    let invitation = aigw_apiserver::sso::store::Invitation {
        tenant_id: b_id,
        email: "nina@example.com".into(),
        username: "nina".into(),
        roles: vec![aigw_apiserver::sso::Role::User],
        sales_id: None,
    };
    let secret = aigw_apiserver::sso::store::create_invitation(&h.db, &invitation, None, 60)
        .await
        .unwrap();
    let (nina_b, _) =
        aigw_apiserver::sso::store::accept_invitation(&h.db, b_id, &secret, "$argon2id$unused")
            .await
            .unwrap();
    assert_ne!(nina_b, nina_a);
    assert_eq!(row(ids[1]).await.0, nina_b);
    assert_eq!(row(ids[0]).await.0, nina_a);

    h.delete_tenants(&[&a, &b]).await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}
