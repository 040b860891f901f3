//! The operator against the real test bed: apply `examples/`, and check the Higress objects (accepted
//! by the Higress CRDs), namespaces, status and MySQL rows; then steady state, restarts, manual
//! edits, foreign registries, domain conflicts and deletion.
//!
//! Each run is isolated: its own instance label (the operator reconciles only CRs carrying it), its
//! own Higress namespace, its own MySQL database, and a name suffix on every example object.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

use std::time::Duration;

use aigw_crds::{Channel, Pricing, Tenant, Token, labels};
use aigw_operator::{
    higress,
    keys::{Sealer, hash_api_key},
};
use aigw_testkit::{Testbed, unique_name};
use k8s_openapi::api::{
    core::v1::{Namespace, Secret},
    networking::v1::Ingress,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::FutureProducer,
};
use serde_json::{Value, json};

mod common;
use common::{Harness, TIMEOUT, eventually, settled};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_lifecycle_is_published_to_tenant_events() {
    let h = Harness::new().await;
    let brokers = Testbed::load().unwrap().kafka_brokers().unwrap().to_owned();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    // Start reading every partition at its current end, so only this test's events follow.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique_name("events"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topic = aigw_operator::tenant::TENANT_EVENTS;
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();

    let (ctx, shutdown, task) = h.start_with(Some(producer));
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let name = h.rename("evt");
    let t: Tenant = serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name, "labels": {labels::INSTANCE: h.instance}},
        "spec": {"type": "reseller", "displayName": "Events Inc"}}),
    )
    .unwrap();
    tenants.create(&PostParams::default(), &t).await.unwrap();
    h.ready(&tenants, &name).await;
    tenants
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "Events Ltd"}})),
        )
        .await
        .unwrap();
    eventually("generation 2 observed", || async {
        let t = tenants.get(&name).await.unwrap();
        (t.status?.common.observed_generation == Some(2)).then_some(())
    })
    .await;
    tenants
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually("tenant gone", || async {
        tenants
            .get_opt(&name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    let mut seen: Vec<(String, Option<i64>)> = Vec::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        let Some(msg) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)))
        else {
            continue;
        };
        let msg = msg.unwrap();
        if msg.key() != Some(name.as_bytes()) {
            continue;
        }
        let v: Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        seen.push((
            v["event"].as_str().unwrap().to_owned(),
            v["generation"].as_i64(),
        ));
    }
    let kafka_errors = ctx
        .metrics
        .errors
        .get_or_create(&aigw_operator::context::ErrorLabels {
            controller: "tenant",
            category: "kafka",
        })
        .get();
    assert_eq!(kafka_errors, 0, "publishing failed");
    assert_eq!(
        seen,
        vec![
            ("upserted".to_owned(), Some(1)),
            ("upserted".to_owned(), Some(2)),
            ("deleted".to_owned(), Some(3)) /* deletion bumps the generation */
        ],
        "tenant.events keyed by {name}"
    );
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_reconcile_into_higress_namespaces_status_and_mysql() {
    let h = Harness::new().await;
    let (ctx, shutdown, task) = h.start();

    // Channels and their Secrets, then the tenants, then what lives in tenant namespaces.
    h.apply_docs(&h.example("channels.yaml")).await;
    h.apply_docs(&h.example("platform-tenant.yaml")).await;
    h.apply_docs(&h.example("reseller-tenant.yaml")).await;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let acme = h.ready(&tenants, &h.rename("acme")).await;
    let platform = h.ready(&tenants, &h.rename("platform")).await;
    let acme_ns = h.rename("aigw-acme");
    assert_eq!(
        acme.status.as_ref().unwrap().namespace.as_deref(),
        Some(acme_ns.as_str())
    );
    let ns = Api::<Namespace>::all(h.client.clone())
        .get(&acme_ns)
        .await
        .unwrap();
    assert_eq!(ns.labels()[labels::TENANT], h.rename("acme"));
    assert_eq!(ns.owner_references()[0].uid, acme.uid().unwrap());

    h.apply_docs(&h.example("pricing.yaml")).await;
    h.apply_docs(&h.example("token.yaml")).await;
    let channels: Api<Channel> = Api::all(h.client.clone());
    let openai = h.ready(&channels, &h.rename("openai-main")).await;
    assert_eq!(openai.status.as_ref().unwrap().key_count, Some(2));
    h.ready(&channels, &h.rename("claude-main")).await;
    let pricings: Api<Pricing> = Api::namespaced(h.client.clone(), &acme_ns);
    h.ready(&pricings, &h.rename("default")).await;
    h.ready(
        &Api::<Pricing>::namespaced(h.client.clone(), &h.rename("aigw-platform")),
        &h.rename("default"),
    )
    .await;
    let tokens: Api<Token> = Api::namespaced(h.client.clone(), &acme_ns);
    let token_name = h.rename("alice-laptop");
    let token = h.ready(&tokens, &token_name).await;

    // The generated key is in an owned Secret; only its hash is in the status and MySQL.
    let ts = token.status.clone().unwrap();
    let secret = Api::<Secret>::namespaced(h.client.clone(), &acme_ns)
        .get(&format!("{token_name}-key"))
        .await
        .unwrap();
    let key = String::from_utf8(secret.data.unwrap()["apiKey"].0.clone()).unwrap();
    assert!(key.starts_with("sk-") && key.len() == 51, "{key}");
    assert_eq!(ts.key_hash.as_deref(), Some(hash_api_key(&key).as_str()));
    assert_eq!(ts.key_prefix.as_deref(), Some(&key[..7]));
    assert_eq!(ts.phase, Some(aigw_crds::TokenPhase::Active));
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].uid,
        token.uid().unwrap()
    );

    // Higress: our registries, the ai-proxy providers with the Secret's keys, host-independent routes.
    let regs = eventually("registries", || async {
        let r = h.registries().await;
        (r.len() == 2).then_some(r)
    })
    .await;
    assert_eq!(
        regs,
        vec![
            format!("aigw-{}", h.rename("claude-main")),
            format!("aigw-{}", h.rename("openai-main"))
        ]
    );
    let plugins: Api<DynamicObject> =
        Api::namespaced_with(h.client.clone(), &h.hns, &higress::wasm_plugin_resource());
    let ai_proxy = plugins.get("aigw-ai-proxy").await.unwrap();
    let providers = ai_proxy.data["spec"]["defaultConfig"]["providers"]
        .as_array()
        .unwrap();
    let op = providers
        .iter()
        .find(|p| p["id"] == h.rename("openai-main"))
        .unwrap();
    assert_eq!(
        op["apiTokens"],
        json!(["sk-upstream-openai-1", "sk-upstream-openai-2"])
    );
    let ingresses: Api<Ingress> = Api::namespaced(h.client.clone(), &h.hns);
    let names: Vec<String> = ingresses
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(
        names.len(),
        6,
        "api + models + internal authz and ingest + {{gpt-4o, gpt-4o-mini}} + {{claude-sonnet-4}}: {names:?}"
    );
    for ing in ingresses.list(&ListParams::default()).await.unwrap() {
        assert!(
            ing.spec
                .unwrap()
                .rules
                .unwrap()
                .iter()
                .all(|r| r.host.is_none()),
            "routes are host-independent"
        );
    }
    let usage = plugins.get("aigw-usage-reporter").await.unwrap();
    let rule = &usage.data["spec"]["matchRules"][0];
    assert_eq!(rule["ingress"].as_array().unwrap().len(), 2);
    aigw_plugin_core::PluginConfig::parse(&serde_json::to_vec(&rule["config"]).unwrap()).unwrap();
    // No token, hash or key prefix anywhere in Higress config.
    for p in plugins.list(&ListParams::default()).await.unwrap() {
        let text = serde_json::to_string(&p).unwrap();
        assert!(!text.contains(&key) && !text.contains(ts.key_hash.as_deref().unwrap()));
    }

    // MySQL mirror.
    let acme_id = acme.status.as_ref().unwrap().tenant_id.unwrap();
    let (slug, kind): (String, String) =
        sqlx::query_as("SELECT slug, type FROM tenants WHERE id = ?")
            .bind(acme_id)
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(
        (slug.as_str(), kind.as_str()),
        (h.rename("acme").as_str(), "reseller")
    );
    let domain_owner: i64 = sqlx::query_scalar(
        "SELECT tenant_id FROM tenant_domains WHERE domain = 'api.acme.example'",
    )
    .fetch_one(&h.db)
    .await
    .unwrap();
    assert_eq!(domain_owner, acme_id);
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT api_key_enc FROM channels WHERE name = ?")
        .bind(h.rename("openai-main"))
        .fetch_one(&h.db)
        .await
        .unwrap();
    let opened = Sealer::from_hex(&h.key_hex)
        .unwrap()
        .open(&sealed, h.rename("openai-main").as_bytes())
        .unwrap();
    assert_eq!(opened, b"sk-upstream-openai-1\nsk-upstream-openai-2");
    let price: (rust_decimal::Decimal, String) =
        sqlx::query_as("SELECT output_price, currency FROM pricing WHERE tenant_id = 0 AND model = 'claude-sonnet-4'")
            .fetch_one(&h.db).await.unwrap();
    assert_eq!(price.0.to_string(), "17.500000");
    assert_eq!(price.1, "USD");
    let acme_prices: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pricing WHERE tenant_id = ?")
        .bind(acme_id)
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(acme_prices, 2);
    let token_hash: String =
        sqlx::query_scalar("SELECT key_hash FROM tokens WHERE namespace = ? AND cr_name = ?")
            .bind(&acme_ns)
            .bind(&token_name)
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(token_hash, hash_api_key(&key));
    assert!(platform.status.unwrap().tenant_id.is_some());

    // Steady state: nothing more to write.
    let before = settled(&ctx, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ctx.writes(),
        before,
        "an unchanged world must cause no writes"
    );

    // A restarted operator finds everything in place and writes nothing.
    shutdown.trigger();
    task.await.unwrap();
    let (ctx, shutdown, task) = h.start();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        ctx.writes(),
        0,
        "restart of an unchanged world must write nothing"
    );

    // A manual edit of one of our objects is reverted; a foreign registry survives our writes.
    let route = names
        .iter()
        .find(|n| n.starts_with("aigw-route-"))
        .unwrap()
        .clone();
    ingresses
        .patch(&route, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"higress.io/destination": "evil.example:443"}}})))
        .await
        .unwrap();
    eventually("manual edit reverted", || async {
        let ing = ingresses.get(&route).await.unwrap();
        (ing.annotations()["higress.io/destination"] != "evil.example:443").then_some(())
    })
    .await;
    // A lower-priority channel for the gpt models: a fallback Ingress and an EnvoyFilter appear
    // (accepted by the Istio/Higress CRDs), and go again with the channel.
    let cheap: Channel = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
        "metadata": {"name": h.rename("cheap"), "labels": {labels::INSTANCE: h.instance}},
        "spec": {"provider": "openai", "baseUrl": "https://cheap.example/v1", "priority": 0,
                 "credentials": {"name": h.rename("openai-keys"), "namespace": "aigw-system", "key": "apiKeys"},
                 "models": ["gpt-4o", "gpt-4o-mini"]}
    }))
    .unwrap();
    channels
        .create(&PostParams::default(), &cheap)
        .await
        .unwrap();
    let filters: Api<DynamicObject> =
        Api::namespaced_with(h.client.clone(), &h.hns, &higress::envoy_filter_resource());
    let fallback = eventually("fallback Ingress and EnvoyFilter", || async {
        let fb = ingresses
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|i| i.name_any().ends_with("-fallback"))?;
        let primary = fb.name_any().trim_end_matches("-fallback").to_owned();
        filters.get_opt(&primary).await.unwrap()?;
        Some(fb)
    })
    .await;
    let expected = format!("aigw-{}.dns:443", h.rename("cheap"));
    assert_eq!(fallback.annotations()["higress.io/destination"], expected);
    // The new route was authenticated from its first moment: ext-auth named it before it was
    // created. The test bed's apiserver has one etcd, whose revision (`resourceVersion`) orders
    // every write; nothing changes ext-auth after this route is added.
    let ext_auth = plugins.get("aigw-ext-auth").await.unwrap();
    let covered = ext_auth.data["spec"]["matchRules"][0]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str() == Some(fallback.name_any().as_str()));
    assert!(covered, "ext-auth covers the new route");
    let revision = |rv: Option<String>| rv.unwrap().parse::<u64>().unwrap();
    assert!(
        revision(ext_auth.metadata.resource_version.clone())
            < revision(fallback.metadata.resource_version.clone()),
        "ext-auth named the route before it existed"
    );
    channels
        .delete(&h.rename("cheap"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("fallback gone with the channel", || async {
        let left = filters
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty();
        let fb = ingresses
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|i| i.name_any().ends_with("-fallback"));
        (left && !fb).then_some(())
    })
    .await;

    // A regrouping renames routes: a channel serving only gpt-4o splits the {gpt-4o,
    // gpt-4o-mini} route in two. The new routes exist before the old one goes, so those models
    // always have a route; and when the channel goes, the merged route is back before the split
    // ones go.
    let route_names = |list: &[Ingress]| -> std::collections::BTreeSet<String> {
        list.iter()
            .map(ResourceExt::name_any)
            .filter(|n| n.starts_with("aigw-route-") && !n.ends_with("-fallback"))
            .collect()
    };
    let listed = ingresses.list(&ListParams::default()).await.unwrap();
    let before = route_names(&listed.items);
    let events = ingresses
        .watch(
            &kube::api::WatchParams::default(),
            listed.metadata.resource_version.as_deref().unwrap(),
        )
        .await
        .unwrap();
    let solo: Channel = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
        "metadata": {"name": h.rename("solo"), "labels": {labels::INSTANCE: h.instance}},
        "spec": {"provider": "openai", "baseUrl": "https://solo.example/v1",
                 "credentials": {"name": h.rename("openai-keys"), "namespace": "aigw-system", "key": "apiKeys"},
                 "models": ["gpt-4o"]}
    }))
    .unwrap();
    channels
        .create(&PostParams::default(), &solo)
        .await
        .unwrap();
    let split = eventually("the split routes", || async {
        let now = route_names(&ingresses.list(&ListParams::default()).await.unwrap().items);
        (now.len() == before.len() + 1 && before.difference(&now).count() == 1).then_some(now)
    })
    .await;
    channels
        .delete(&h.rename("solo"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("the merged route back", || async {
        let now = route_names(&ingresses.list(&ListParams::default()).await.unwrap().items);
        (now == before).then_some(())
    })
    .await;
    // Every route event, in etcd order: a name is never missing between its group's routes.
    let mut order = Vec::new();
    let mut events = std::pin::pin!(events);
    while let Ok(Some(event)) = tokio::time::timeout(
        Duration::from_secs(2),
        futures::StreamExt::next(&mut events),
    )
    .await
    {
        match event.unwrap() {
            kube::api::WatchEvent::Added(i) => order.push(("added", i.name_any())),
            kube::api::WatchEvent::Deleted(i) => order.push(("deleted", i.name_any())),
            _ => {}
        }
    }
    let at = |kind: &str, name: &String| {
        order
            .iter()
            .position(|(k, n)| *k == kind && n == name)
            .unwrap_or_else(|| panic!("no {kind} event for {name}: {order:?}"))
    };
    let merged: Vec<&String> = before.difference(&split).collect();
    let parts: Vec<&String> = split.difference(&before).collect();
    assert_eq!(
        (merged.len(), parts.len()),
        (1, 2),
        "{before:?} → {split:?}"
    );
    for part in &parts {
        assert!(
            at("added", part) < at("deleted", merged[0]),
            "split: {part} before {} goes: {order:?}",
            merged[0]
        );
    }
    let back = order
        .iter()
        .rposition(|(k, n)| *k == "added" && n == merged[0])
        .unwrap();
    for part in &parts {
        assert!(
            back < at("deleted", part),
            "merge: {} back before {part} goes: {order:?}",
            merged[0]
        );
    }

    let mut bridge = h.bridge_api().get("default").await.unwrap();
    bridge.data["spec"]["registries"].as_array_mut().unwrap().push(json!({"name": "console-local", "type": "dns", "domain": "llm.internal.example", "port": 443, "protocol": "https"}));
    h.bridge_api()
        .replace("default", &PostParams::default(), &bridge)
        .await
        .unwrap();
    // Disable a channel: our registry goes, the console's stays.
    channels
        .patch(
            &h.rename("claude-main"),
            &PatchParams::apply("aigw-test"),
            &Patch::Merge(json!({"spec": {"disabled": true}})),
        )
        .await
        .unwrap();
    eventually(
        "registry of the disabled channel removed, foreign kept",
        || async {
            let r = h.registries().await;
            (r == vec![
                format!("aigw-{}", h.rename("openai-main")),
                "console-local".to_owned(),
            ] || r
                == vec![
                    "console-local".to_owned(),
                    format!("aigw-{}", h.rename("openai-main")),
                ])
            .then_some(())
        },
    )
    .await;

    // A second tenant claiming acme's domain gets a DomainConflict; acme keeps the domain.
    let globex: Tenant = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": h.rename("globex"), "labels": {labels::INSTANCE: h.instance}},
        "spec": {"type": "reseller", "displayName": "Globex", "domains": ["api.acme.example", "api.globex.example"]}
    }))
    .unwrap();
    tenants
        .create(&PostParams::default(), &globex)
        .await
        .unwrap();
    let conflict = eventually("DomainConflict", || async {
        let t = tenants.get(&h.rename("globex")).await.unwrap();
        let conds = t.status?.common.conditions;
        conds
            .into_iter()
            .find(|c| c.type_ == "DomainConflict" && c.status == "True")
    })
    .await;
    assert!(
        conflict.message.contains("api.acme.example")
            && conflict.message.contains(&h.rename("acme")),
        "{}",
        conflict.message
    );
    let owner: i64 = sqlx::query_scalar(
        "SELECT tenant_id FROM tenant_domains WHERE domain = 'api.acme.example'",
    )
    .fetch_one(&h.db)
    .await
    .unwrap();
    assert_eq!(owner, acme_id, "the earlier tenant keeps its domain");
    let acme_after = tenants
        .get(&h.rename("acme"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(acme_after.tenant_id, Some(acme_id));
    assert_eq!(acme_after.domains, vec!["api.acme.example".to_owned()]);
    assert!(
        acme_after
            .common
            .conditions
            .iter()
            .all(|c| c.type_ != "DomainConflict")
    );
    assert!(
        acme_after
            .common
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );

    // A token that expires soon is Active until then and Expired just after, with no change to it
    // in between: its reconcile schedules the expiry (tokens expiring later than two hours wait
    // for their hourly resync instead, see `paced`).
    let soon = h.rename("soon");
    let expires = (k8s_openapi::jiff::Timestamp::now() + Duration::from_secs(10))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let expiring: Token = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
        "metadata": {"name": soon, "namespace": acme_ns, "labels": {labels::INSTANCE: h.instance}},
        "spec": {"owner": "alice", "expiresAt": expires}
    }))
    .unwrap();
    tokens
        .create(&PostParams::default(), &expiring)
        .await
        .unwrap();
    let before = h.ready(&tokens, &soon).await;
    assert_eq!(
        before.status.unwrap().phase,
        Some(aigw_crds::TokenPhase::Active)
    );
    eventually("the token Expired after its expiresAt", || async {
        let t = tokens.get(&soon).await.unwrap();
        (t.status?.phase == Some(aigw_crds::TokenPhase::Expired)).then_some(())
    })
    .await;
    tokens
        .delete(&soon, &DeleteParams::default())
        .await
        .unwrap();

    // Deletion: token → row and Secret gone; channel → registry and row gone; tenant → rows gone.
    tokens
        .delete(&token_name, &DeleteParams::default())
        .await
        .unwrap();
    eventually("token row deleted", || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&h.db)
            .await
            .unwrap();
        (n == 0 && tokens.get_opt(&token_name).await.unwrap().is_none()).then_some(())
    })
    .await;
    eventually("key Secret garbage-collected", || async {
        Api::<Secret>::namespaced(h.client.clone(), &acme_ns)
            .get_opt(&format!("{token_name}-key"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    channels
        .delete(&h.rename("openai-main"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("channel gone from Higress and MySQL", || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channels WHERE name = ?")
            .bind(h.rename("openai-main"))
            .fetch_one(&h.db)
            .await
            .unwrap();
        (n == 0 && h.registries().await == vec!["console-local".to_owned()]).then_some(())
    })
    .await;
    tenants
        .delete(&h.rename("acme"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("tenant rows deleted and the domain released to globex", || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants WHERE id = ?").bind(acme_id).fetch_one(&h.db).await.unwrap();
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT t.slug FROM tenant_domains d JOIN tenants t ON t.id = d.tenant_id WHERE d.domain = 'api.acme.example'",
        )
        .fetch_optional(&h.db).await.unwrap();
        (n == 0 && owner.as_deref() == Some(h.rename("globex").as_str())).then_some(())
    })
    .await;

    // Clean up what this run created cluster-wide.
    for name in [h.rename("platform"), h.rename("globex")] {
        tenants.delete(&name, &DeleteParams::default()).await.ok();
    }
    channels
        .delete(&h.rename("claude-main"), &DeleteParams::default())
        .await
        .ok();
    eventually("finalizers released", || async {
        let left = tenants
            .list(&ListParams::default().labels(&format!("{}={}", labels::INSTANCE, h.instance)))
            .await
            .unwrap();
        left.items.is_empty().then_some(())
    })
    .await;
    h.finish().await;
    shutdown.trigger();
    task.await.unwrap();
}
