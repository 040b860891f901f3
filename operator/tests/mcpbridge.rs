//! The shared McpBridge `default`: a concurrent writer (the Higress console) and the operator both
//! keep all of their registries — conflicts cause retries, never lost updates.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use aigw_operator::{
    context::{Config, Ctx, Metrics},
    higress,
    keys::Sealer,
    sync::sync_registries,
};
use aigw_testkit::{Testbed, scratch_namespace};
use kube::{
    Api,
    api::{DynamicObject, PostParams},
};
use serde_json::{Value, json};

fn registry(name: &str) -> Value {
    json!({"name": name, "type": "dns", "domain": format!("{name}.example"), "port": 443, "protocol": "https"})
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

    let config = Config::with_defaults(&ns);
    let db = sqlx::mysql::MySqlPoolOptions::new()
        .connect_lazy(tb.var("DATABASE_URL").unwrap())
        .unwrap();
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        db,
        config,
        metrics,
        Sealer::from_hex(&"00".repeat(32)).unwrap(),
        None,
    ));

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
        sync_registries(&ctx, &ours).await.unwrap();
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
