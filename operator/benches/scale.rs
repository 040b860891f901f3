//! Scale benchmark of the operator against the test bed (`make bench`), run as a separate release
//! process so its memory is its own:
//!
//! 1. create N tenants, C channels (with Secrets) and T tokens (with `keyHash`, as the REST API
//!    creates them) while no operator runs;
//! 2. start `aigw-operator` and time until every Tenant, Channel and Token is Ready;
//! 3. change channel weights one at a time and time each change until the route Ingress shows it
//!    (p50/p99), counting the operator's writes per change;
//! 4. report the operator's peak RSS.
//!
//! Sizes come from `BENCH_TENANTS`, `BENCH_CHANNELS`, `BENCH_TOKENS` (defaults 1000 / 100 / 10000).
//! Everything the run creates carries a fresh instance label; `make bench` restarts the test bed
//! afterwards so later tests start from a clean cluster.

// A benchmark driver: failures abort with their message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aigw_crds::{Channel, Tenant, Token, labels};
use aigw_testkit::{Testbed, process::http_get, unique_name};
use futures::{StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Namespace, Secret},
    networking::v1::Ingress,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn apply_all(client: &Client, docs: Vec<(Option<String>, Value)>, kind: &str) {
    let started = Instant::now();
    let n = docs.len();
    stream::iter(docs)
        .for_each_concurrent(32, |(ns, doc)| {
            let client = client.clone();
            async move {
                let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                let pp = PatchParams::apply("aigw-bench").force();
                let r = match (doc["kind"].as_str().unwrap(), ns) {
                    ("Namespace", _) => Api::<Namespace>::all(client)
                        .patch(&name, &pp, &Patch::Apply(&doc))
                        .await
                        .map(|_| ()),
                    ("Secret", Some(ns)) => Api::<Secret>::namespaced(client, &ns)
                        .patch(&name, &pp, &Patch::Apply(&doc))
                        .await
                        .map(|_| ()),
                    ("Tenant", _) => Api::<Tenant>::all(client)
                        .patch(&name, &pp, &Patch::Apply(&doc))
                        .await
                        .map(|_| ()),
                    ("Channel", _) => Api::<Channel>::all(client)
                        .patch(&name, &pp, &Patch::Apply(&doc))
                        .await
                        .map(|_| ()),
                    ("Token", Some(ns)) => Api::<Token>::namespaced(client, &ns)
                        .patch(&name, &pp, &Patch::Apply(&doc))
                        .await
                        .map(|_| ()),
                    (k, _) => panic!("unexpected {k}"),
                };
                r.unwrap();
            }
        })
        .await;
    eprintln!(
        "created {n} {kind} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn ready(v: &Value) -> bool {
    v["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn count_ready<K>(api: &Api<K>, selector: &str) -> usize
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut n = 0;
    let mut lp = ListParams::default().labels(selector).limit(2000);
    loop {
        let page = api.list(&lp).await.unwrap();
        n += page
            .items
            .iter()
            .filter(|o| ready(&serde_json::to_value(o).unwrap()))
            .count();
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return n,
        }
    }
}

fn rss_kib(child: &Child) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn writes(metrics_addr: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(metrics_addr, "/metrics").unwrap();
    body.lines()
        .find(|l| l.starts_with("aigw_operator_writes_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[tokio::main]
async fn main() {
    let tenants_n = env_usize("BENCH_TENANTS", 1000);
    let channels_n = env_usize("BENCH_CHANNELS", 100);
    let tokens_n = env_usize("BENCH_TOKENS", 10_000);
    let changes_n = env_usize("BENCH_CHANGES", 50);

    let tb = Testbed::load().expect("test bed env file (scripts/testbed up)");
    let client = tb.kube_client().await.unwrap();
    aigw_crds::install(&client, "aigw-bench").await.unwrap();
    let (db_name, db) = tb.scratch_mysql("bench").await.unwrap();
    aigw_migrations::run_mysql(&db).await.unwrap();
    let sfx = unique_name("b").trim_start_matches("b-").to_owned();
    let instance = format!("bench-{sfx}");
    let selector = format!("{}={instance}", labels::INSTANCE);
    let hns = format!("hi-bench-{sfx}");
    let secrets_ns = format!("bench-secrets-{sfx}");
    let label = json!({labels::INSTANCE: instance});

    // 1. The world, before any operator runs.
    apply_all(
        &client,
        vec![
            (
                None,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": hns}}),
            ),
            (
                None,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": secrets_ns}}),
            ),
        ],
        "namespaces",
    )
    .await;
    let tenant_name = |i: usize| format!("t{i}-{sfx}");
    let mut docs = Vec::new();
    for i in 0..tenants_n {
        let kind = if i == 0 { "platform" } else { "reseller" };
        docs.push((None, json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": tenant_name(i), "labels": label},
            "spec": {"type": kind, "displayName": format!("Tenant {i}"), "domains": [format!("api.t{i}-{sfx}.example")]}})));
    }
    apply_all(&client, docs, "tenants").await;
    let ns_docs = (0..tenants_n)
        .map(|i| (None, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("aigw-{}", tenant_name(i))}})))
        .collect();
    apply_all(
        &client,
        ns_docs,
        "tenant namespaces (adopted by the operator)",
    )
    .await;
    let mut docs = Vec::new();
    for c in 0..channels_n {
        docs.push((Some(secrets_ns.clone()), json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("keys-{c}"), "namespace": secrets_ns}, "stringData": {"apiKeys": format!("sk-up-{c}")}})));
    }
    apply_all(&client, docs, "channel secrets").await;
    let mut docs = Vec::new();
    for c in 0..channels_n {
        // 10 channels share each group of models, so routes group models (the scale rule).
        let group = c % 10;
        docs.push((None, json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
            "metadata": {"name": format!("ch{c}-{sfx}"), "labels": label},
            "spec": {"provider": "openai", "baseUrl": format!("https://llm{c}.example/v1"),
                     "credentials": {"name": format!("keys-{c}"), "namespace": secrets_ns, "key": "apiKeys"},
                     "models": [format!("model-{group}-a"), format!("model-{group}-b")], "priority": 1, "weight": 10}})));
    }
    apply_all(&client, docs, "channels").await;
    let mut docs = Vec::new();
    for k in 0..tokens_n {
        let ns = format!("aigw-{}", tenant_name(k % tenants_n));
        let hash = aigw_operator::keys::hash_api_key(&format!("sk-bench-{sfx}-{k}"));
        docs.push((Some(ns.clone()), json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": format!("tok{k}"), "namespace": ns, "labels": label},
            "spec": {"owner": format!("user{k}"), "keyHash": hash, "keyPrefix": "sk-benc", "quota": -1}})));
    }
    apply_all(&client, docs, "tokens").await;

    // 2. Start the operator and wait for all Ready.
    let ops_addr = aigw_testkit::process::free_addr().unwrap();
    let base = tb
        .var("DATABASE_URL")
        .unwrap()
        .rsplit_once('/')
        .unwrap()
        .0
        .to_owned();
    let bin = format!(
        "{}/../target/release/aigw-operator",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = Command::new(&bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", tb.var("KUBECONFIG").unwrap())
        .env("DATABASE_URL", format!("{base}/{db_name}"))
        .env("AIGW_CHANNEL_KEY", "11".repeat(32))
        .env("AIGW_OPS_ADDR", ops_addr.to_string())
        .env("AIGW_INSTANCE", &instance)
        .env("AIGW_HIGRESS_NAMESPACE", &hns)
        .env("AIGW_LEADER_ELECTION", "false")
        .env("AIGW_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin} (cargo build --release -p aigw-operator): {e}"));
    let started = Instant::now();
    let tenants: Api<Tenant> = Api::all(client.clone());
    let channels: Api<Channel> = Api::all(client.clone());
    let tokens: Api<Token> = Api::all(client.clone());
    let total = tenants_n + channels_n + tokens_n;
    let mut peak_rss = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        peak_rss = peak_rss.max(rss_kib(&child));
        let n = count_ready(&tenants, &selector).await
            + count_ready(&channels, &selector).await
            + count_ready(&tokens, &selector).await;
        eprintln!(
            "  {:>5.1}s: {n}/{total} Ready",
            started.elapsed().as_secs_f64()
        );
        if n == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_mins(30),
            "not all Ready after 30 minutes"
        );
    }
    let all_ready = started.elapsed();
    // Let the Higress sync settle before measuring changes.
    let mut last = writes(ops_addr);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes(ops_addr);
        if now == last {
            break;
        }
        last = now;
    }
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &hns);
    let route_count = ingresses
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();

    // 3. Spec change → Higress object updated.
    let mut latencies = Vec::new();
    let before = writes(ops_addr);
    for i in 0..changes_n {
        let c = i % channels_n;
        let service = format!("aigw-ch{c}-{sfx}.dns:443");
        // The destination of the route serving this channel, before the change.
        let destination = || async {
            ingresses
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter_map(|ing| ing.annotations().get("higress.io/destination").cloned())
                .find(|d| d.lines().any(|l| l.ends_with(&service)))
                .unwrap_or_default()
        };
        let original = destination().await;
        let weight = 20 + (i % 70);
        let changed = Instant::now();
        channels
            .patch(
                &format!("ch{c}-{sfx}"),
                &PatchParams::apply("aigw-bench-change"),
                &Patch::Merge(json!({"spec": {"weight": weight}})),
            )
            .await
            .unwrap();
        while destination().await == original {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                changed.elapsed() < Duration::from_mins(1),
                "change {i} not seen in 60s"
            );
        }
        latencies.push(changed.elapsed().as_secs_f64() * 1000.0);
        // Put it back so the next change of this channel is a change again.
        channels
            .patch(
                &format!("ch{c}-{sfx}"),
                &PatchParams::apply("aigw-bench-change"),
                &Patch::Merge(json!({"spec": {"weight": 10}})),
            )
            .await
            .unwrap();
        while destination().await != original {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let change_writes = writes(ops_addr) - before;
    peak_rss = peak_rss.max(rss_kib(&child));
    latencies.sort_by(f64::total_cmp);
    let _ = child.kill();
    let _ = child.wait();

    println!("| measure | value |");
    println!("|---|---|");
    println!("| objects | {tenants_n} tenants, {channels_n} channels, {tokens_n} tokens |");
    println!(
        "| operator start → all Ready | {:.1} s |",
        all_ready.as_secs_f64()
    );
    println!(
        "| route Ingresses in Higress | {route_count} (api + model groups; independent of tenants) |"
    );
    println!(
        "| spec change → Ingress updated, p50 | {:.0} ms |",
        percentile(&latencies, 0.5)
    );
    println!(
        "| spec change → Ingress updated, p99 | {:.0} ms |",
        percentile(&latencies, 0.99)
    );
    println!(
        "| writes per channel change | {:.1} ({change_writes} writes for {} changes incl. revert) |",
        change_writes as f64 / (2 * changes_n) as f64,
        2 * changes_n
    );
    println!("| operator peak RSS (VmHWM) | {} MiB |", peak_rss / 1024);
}
