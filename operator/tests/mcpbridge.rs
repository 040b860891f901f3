//! The Higress objects shared with the Higress console: McpBridge `default`, where a concurrent
//! writer and the operator both keep all of their registries (conflicts cause retries, never lost
//! updates), and the `higress-https` `ConfigMap`, which the operator fills up to the kube-apiserver's
//! size limit and no further.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use aigw_operator::{
    context::{Config, Ctx, Metrics},
    higress,
    keys::Sealer,
    sync::{sync_registries, write_tls},
    tls,
};
use aigw_testkit::{Testbed, scratch_namespace};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, PostParams},
};
use serde_json::{Value, json};

fn registry(name: &str) -> Value {
    json!({"name": name, "type": "dns", "domain": format!("{name}.example"), "port": 443, "protocol": "https"})
}

/// An operator context whose Higress namespace is `ns` (no controllers run).
fn ctx_in(tb: &Testbed, client: &kube::Client, ns: &str) -> Arc<Ctx> {
    let config = Config::with_defaults(ns);
    let db = sqlx::mysql::MySqlPoolOptions::new()
        .connect_lazy(tb.var("DATABASE_URL").unwrap())
        .unwrap();
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    Arc::new(Ctx::new(
        client.clone(),
        db,
        config,
        metrics,
        Sealer::from_hex(&"00".repeat(32)).unwrap(),
        None,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_nothing() {
    let tb = Testbed::load().unwrap();
    let client = tb.kube_client().await.unwrap();
    let ns = scratch_namespace(&client, "bridge").await.unwrap();
    let ar = higress::mcp_bridge_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let bridge: DynamicObject =
        serde_json::from_value(json!({"apiVersion": ar.api_version, "kind": ar.kind,
        "metadata": {"name": "default"}, "spec": {"registries": [registry("console-0")]}}))
        .unwrap();
    api.create(&PostParams::default(), &bridge).await.unwrap();

    let ctx = ctx_in(&tb, &client, &ns);

    // The "console": read-modify-replace with resourceVersion, retrying on conflict, 15 times.
    let console = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut conflicts = 0;
            for i in 1..=15 {
                loop {
                    let mut b = api.get("default").await.unwrap();
                    b.data["spec"]["registries"]
                        .as_array_mut()
                        .unwrap()
                        .push(registry(&format!("console-{i}")));
                    match api.replace("default", &PostParams::default(), &b).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(e)) if e.code == 409 => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        })
    };
    // The operator: 15 changes of its own set at the same time.
    let mut ours = Vec::new();
    for i in 0..15 {
        ours = (0..=i % 4)
            .map(|j| registry(&format!("aigw-ch{j}-{i}")))
            .collect();
        sync_registries(&ctx, &ours, false).await.unwrap();
    }
    let console_conflicts = console.await.unwrap();

    let names: Vec<String> = api.get("default").await.unwrap().data["spec"]["registries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    for i in 0..=15 {
        assert!(
            names.contains(&format!("console-{i}")),
            "console-{i} lost: {names:?}"
        );
    }
    let mine: Vec<&String> = names.iter().filter(|n| n.starts_with("aigw-")).collect();
    let want: Vec<String> = ours
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(mine.len(), want.len(), "{names:?}");
    assert!(want.iter().all(|w| mine.contains(&w)), "{names:?}");
    println!("console retried {console_conflicts} time(s) on conflict");
}

/// More served domains than the `higress-https` `ConfigMap` can hold (about 105 bytes an entry
/// against the kube-apiserver's 1 MiB for all keys and values): the operator writes the oldest
/// tenants' entries up to the limit, keeps the console's entry and the `ConfigMap`'s other keys, and
/// reports the newest as left out. The kube-apiserver is the judge of the limit: the same
/// document with one more entry is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tls_configmap_keeps_the_oldest_tenants_up_to_the_apiservers_limit() {
    const TENANTS: usize = 12_000;
    let tb = Testbed::load().unwrap();
    let client = tb.kube_client().await.unwrap();
    let ns = scratch_namespace(&client, "tls-full").await.unwrap();
    let ctx = ctx_in(&tb, &client, &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let console = "credentialConfig:\n- domains: [console.example]\n  tlsSecret: higress-system/console-cert\n";
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": tls::CONFIGMAP},
        "data": {tls::KEY: console, "console-notes": "n".repeat(100_000)},
    }))
    .unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();

    let served: Vec<(String, Vec<String>)> = (0..TENANTS)
        .map(|i| {
            (
                format!("aigw-t{i:05}"),
                vec![format!("api.t{i:05}.example")],
            )
        })
        .collect();
    let left_out = write_tls(&ctx, &served).await.unwrap();
    let kept = TENANTS - left_out.len();
    assert!(kept > 8_000 && kept < TENANTS, "kept {kept} of {TENANTS}");
    let newest: Vec<String> = (kept..TENANTS)
        .map(|i| format!("api.t{i:05}.example"))
        .collect();
    assert_eq!(left_out, newest, "the newest tenants are the ones left out");

    let stored = maps.get(tls::CONFIGMAP).await.unwrap();
    let data = stored.data.clone().unwrap();
    assert_eq!(data["console-notes"].len(), 100_000, "other keys stay");
    let doc: Value = serde_yaml::from_str(&data[tls::KEY]).unwrap();
    let domains: Vec<&str> = doc["credentialConfig"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["domains"][0].as_str().unwrap())
        .collect();
    assert_eq!(domains.len(), kept + 1);
    assert!(domains.contains(&"console.example"));
    assert!(domains.contains(&"api.t00000.example"));
    assert!(domains.contains(&format!("api.t{:05}.example", kept - 1).as_str()));
    assert!(!domains.contains(&newest[0].as_str()));

    // A second pass with the same tenants writes nothing and leaves out the same.
    let writes = ctx.writes();
    assert_eq!(write_tls(&ctx, &served).await.unwrap(), newest);
    assert_eq!(ctx.writes(), writes);
    // The console rewrites the document without our entries: the next step puts them back (the
    // operator's memory of its last write never hides a change made by someone else).
    let mut edited = maps.get(tls::CONFIGMAP).await.unwrap();
    edited
        .data
        .as_mut()
        .unwrap()
        .insert(tls::KEY.to_owned(), console.to_owned());
    maps.replace(tls::CONFIGMAP, &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_eq!(write_tls(&ctx, &served).await.unwrap(), newest);
    assert_eq!(ctx.writes(), writes + 1);
    let stored = maps.get(tls::CONFIGMAP).await.unwrap();
    assert_eq!(stored.data.as_ref().unwrap()[tls::KEY], data[tls::KEY]);

    // One entry more than the operator wrote is more than the kube-apiserver takes.
    let ours = tls::entries(&served[..=kept], &ctx.config.tls, &ns);
    let one_more = tls::merge(Some(console), ours, &ctx.config.tls, usize::MAX).unwrap();
    let mut over = stored;
    over.data
        .as_mut()
        .unwrap()
        .insert(tls::KEY.to_owned(), one_more.text);
    let refused = maps
        .replace(tls::CONFIGMAP, &PostParams::default(), &over)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(e) if e.code == 422 && e.message.contains("1048576")),
        "{refused}"
    );

    // The console shrinks its other key: the room it frees is used at the next step, though the
    // tenants and the document are as the last step left them.
    let mut smaller = maps.get(tls::CONFIGMAP).await.unwrap();
    smaller
        .data
        .as_mut()
        .unwrap()
        .insert("console-notes".to_owned(), "n".repeat(10_000));
    maps.replace(tls::CONFIGMAP, &PostParams::default(), &smaller)
        .await
        .unwrap();
    let fewer = write_tls(&ctx, &served).await.unwrap();
    assert!(
        fewer.len() + 500 < newest.len(),
        "90 KB freed, yet {} of {} still left out",
        fewer.len(),
        newest.len()
    );

    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
