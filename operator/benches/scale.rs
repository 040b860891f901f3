//! Scale benchmark of the operator against the test bed (`make bench`), run as a separate release
//! process so its memory is its own:
//!
//! 1. create N tenants (and their namespaces, owned by them as the operator creates them), C
//!    channels (with Secrets) and T tokens (with `keyHash`, as the REST API creates them) while no
//!    operator runs — the world a newly installed operator finds;
//! 2. start `aigw-operator` and time until every Tenant, Channel and Token is Ready;
//! 3. change channel weights one at a time and time each change until the route Ingress shows it
//!    in the kube-apiserver's watch cache (p50/p99), counting the operator's writes per change;
//! 4. report the operator's peak RSS;
//! 5. stop the operator and run the reference: a bare client that lists the same objects and does
//!    the writes the operator's start does — each object's finalizer and status, each tenant's
//!    namespace label, the channels' Secret reads, a copy of each route Ingress, and
//!    one MySQL row per tenant, domain, channel and token (into a fresh database) — 96 objects at
//!    once (the operator's three controllers run 32 reconciles each),
//!    with no watches, stores or checks. Operator start → all Ready is reported against it.
//!
//! Sizes come from `BENCH_TENANTS`, `BENCH_CHANNELS`, `BENCH_TOKENS` (defaults 1000 / 100 / 10000).
//! `BENCH_OPERATOR_LOG` sets the operator's log filter (default `warn`),
//! `BENCH_REFERENCE=0` skips the reference and `BENCH_OPERATOR_WRAP` runs the operator under a
//! profiler (e.g. `heaptrack -o FILE`), for runs that profile the operator.
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

/// Every object of a kind carrying the run's instance label, page by page.
async fn list_all<K>(api: &Api<K>, selector: &str) -> Vec<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut all = Vec::new();
    let mut lp = ListParams::default().labels(selector).limit(2000);
    loop {
        let page = api.list(&lp).await.unwrap();
        all.extend(page.items);
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return all,
        }
    }
}

/// The object's status with its Ready condition's message changed, so that applying it is a real
/// write of the same size as the operator's.
fn restated<K: serde::Serialize + kube::Resource<DynamicType = ()>>(obj: &K) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    let mut status = v["status"].take();
    if let Some(conds) = status["conditions"].as_array_mut() {
        for c in conds.iter_mut().filter(|c| c["type"] == "Ready") {
            c["message"] = json!("written by the bare reference client");
        }
    }
    json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status})
}

/// The write of the operator's finalizer, reversed: the operator adds it to every object it
/// mirrors (so that deleting the object deletes its MySQL row); the reference removes it, a write
/// of the same size that leaves the objects deletable with no operator running.
fn unfinalized() -> Patch<Value> {
    Patch::Merge(json!({"metadata": {"finalizers": null}}))
}

/// One object's share of the bare reference's work.
enum Bare {
    Tenant(Box<Tenant>),
    Channel(Box<Channel>),
    Token(Box<Token>),
}

/// The reference for "operator start → all Ready": the same apiserver writes and MySQL rows as the
/// operator's start, done by a bare client as fast as it can; the route copies go to `routes_ns`,
/// which it creates. Returns its wall time and writes.
async fn bare_reference(
    client: &Client,
    db: &sqlx::MySqlPool,
    selector: &str,
    routes: &[Ingress],
    routes_ns: &str,
) -> (Duration, u64) {
    let started = Instant::now();
    let tenants: Api<Tenant> = Api::all(client.clone());
    let channels: Api<Channel> = Api::all(client.clone());
    let tokens: Api<Token> = Api::all(client.clone());
    let mut work: Vec<Bare> = list_all(&tenants, selector)
        .await
        .into_iter()
        .map(|t| Bare::Tenant(Box::new(t)))
        .collect();
    work.extend(
        list_all(&channels, selector)
            .await
            .into_iter()
            .map(|c| Bare::Channel(Box::new(c))),
    );
    work.extend(
        list_all(&tokens, selector)
            .await
            .into_iter()
            .map(|t| Bare::Token(Box::new(t))),
    );
    let writes = std::sync::atomic::AtomicU64::new(0);
    let pp = PatchParams::apply("aigw-bench-bare").force();
    stream::iter(work)
        .for_each_concurrent(96, |item| {
            let (client, pp, writes) = (client.clone(), &pp, &writes);
            async move {
                match item {
                    Bare::Tenant(t) => {
                        let name = t.name_any();
                        let ns = format!("aigw-{name}");
                        Api::<Namespace>::all(client.clone())
                            .patch(&ns, pp, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": ns, "labels": {"aigateway.io/bare-reference": "true"}}})))
                            .await
                            .unwrap();
                        let id = sqlx::query("INSERT INTO tenants (slug, name, type, status) VALUES (?, ?, ?, 1)")
                            .bind(&name)
                            .bind(&t.spec.display_name)
                            .bind(if name.starts_with("t0-") { "platform" } else { "reseller" })
                            .execute(db)
                            .await
                            .unwrap()
                            .last_insert_id();
                        for d in &t.spec.domains {
                            sqlx::query("INSERT INTO tenant_domains (domain, tenant_id) VALUES (?, ?)")
                                .bind(d)
                                .bind(id)
                                .execute(db)
                                .await
                                .unwrap();
                        }
                        let api = Api::<Tenant>::all(client);
                        api.patch(&name, &PatchParams::default(), &unfinalized())
                            .await
                            .unwrap();
                        api.patch_status(&name, pp, &Patch::Apply(restated(&*t)))
                            .await
                            .unwrap();
                        writes.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
                    }
                    Bare::Channel(c) => {
                        let r = &c.spec.credentials;
                        let secret = Api::<Secret>::namespaced(client.clone(), &r.namespace)
                            .get(&r.name)
                            .await
                            .unwrap();
                        let key = secret.data.and_then(|d| d.get(&r.key).cloned()).unwrap();
                        sqlx::query("INSERT INTO channels (name, provider, api_key_enc, base_url, models) VALUES (?, ?, ?, ?, ?)")
                            .bind(c.name_any())
                            .bind("openai")
                            .bind(key.0)
                            .bind(&c.spec.base_url)
                            .bind(serde_json::to_string(&c.spec.models).unwrap())
                            .execute(db)
                            .await
                            .unwrap();
                        let api = Api::<Channel>::all(client);
                        api.patch(&c.name_any(), &PatchParams::default(), &unfinalized())
                            .await
                            .unwrap();
                        api.patch_status(&c.name_any(), pp, &Patch::Apply(restated(&*c)))
                            .await
                            .unwrap();
                        writes.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                    }
                    Bare::Token(t) => {
                        let ns = t.namespace().unwrap();
                        sqlx::query("INSERT INTO tokens (tenant_id, user_id, namespace, cr_name, key_hash, key_prefix, quota, owner) VALUES (1, 0, ?, ?, ?, ?, ?, ?)")
                            .bind(&ns)
                            .bind(t.name_any())
                            .bind(t.spec.key_hash.as_deref().unwrap())
                            .bind(t.spec.key_prefix.as_deref().unwrap())
                            .bind(t.spec.quota)
                            .bind(&t.spec.owner)
                            .execute(db)
                            .await
                            .unwrap();
                        let api = Api::<Token>::namespaced(client, &ns);
                        api.patch(&t.name_any(), &PatchParams::default(), &unfinalized())
                            .await
                            .unwrap();
                        api.patch_status(&t.name_any(), pp, &Patch::Apply(restated(&*t)))
                            .await
                            .unwrap();
                        writes.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    apply_all(
        client,
        vec![(
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": routes_ns}}),
        )],
        "namespaces",
    )
    .await;
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), routes_ns);
    for route in routes {
        let copy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": route.name_any(), "namespace": routes_ns, "annotations": route.annotations()},
            "spec": route.spec});
        ingresses
            .patch(&route.name_any(), &pp, &Patch::Apply(copy))
            .await
            .unwrap();
        writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    (started.elapsed(), writes.into_inner())
}

fn ready(v: &Value) -> bool {
    v["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Every object of kind `K` carrying the run's instance label, as a stream of (key, Ready) on
/// each change, from a watch.
fn readiness<K>(api: Api<K>, selector: &str) -> futures::stream::BoxStream<'static, (String, bool)>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + 'static,
{
    use kube::runtime::{WatchStreamExt, watcher};
    watcher(api, watcher::Config::default().labels(selector))
        .touched_objects()
        .map(|o| {
            let o = o.unwrap();
            let key = format!(
                "{}/{}/{}",
                K::kind(&()),
                o.namespace().unwrap_or_default(),
                o.name_any()
            );
            (key, ready(&serde_json::to_value(&o).unwrap()))
        })
        .boxed()
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

    // `BENCH_BARE_ONLY=<suffix>`: only the reference, on what an earlier run with that suffix left
    // (a 10× run's objects take minutes to create; the reference does not need them anew).
    if let Ok(earlier) = std::env::var("BENCH_BARE_ONLY") {
        let selector = format!("{}=bench-{earlier}", labels::INSTANCE);
        let routes = Api::<Ingress>::namespaced(client.clone(), &format!("hi-bench-{earlier}"))
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let bare_ns = format!("hi-bare-{sfx}");
        let (time, writes) = bare_reference(&client, &db, &selector, &routes, &bare_ns).await;
        println!(
            "| bare client on run {earlier}'s objects | {:.1} s ({writes} apiserver writes) |",
            time.as_secs_f64()
        );
        return;
    }

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
    // The tenant namespaces exist, owned by their Tenants, as an earlier operator left them (the
    // operator never adopts a namespace it did not create for the Tenant): tokens live in them.
    let ns_docs = list_all(&Api::<Tenant>::all(client.clone()), &selector)
        .await
        .into_iter()
        .map(|t| {
            let owner = json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
                "name": t.name_any(), "uid": t.uid().unwrap(), "controller": true});
            (None, json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("aigw-{}", t.name_any()), "ownerReferences": [owner]}}))
        })
        .collect();
    apply_all(
        &client,
        ns_docs,
        "tenant namespaces (owned by their Tenants)",
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
    // `BENCH_OPERATOR_WRAP=heaptrack` (or any command taking the program and its arguments) runs
    // the operator under it, to profile it where it is measured.
    let mut command = match std::env::var("BENCH_OPERATOR_WRAP") {
        Ok(wrap) if !wrap.is_empty() => {
            let mut words = wrap.split_whitespace();
            let mut c = Command::new(words.next().unwrap_or_default());
            c.args(words).arg(&bin);
            c
        }
        _ => Command::new(&bin),
    };
    let mut child = command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", tb.var("KUBECONFIG").unwrap())
        .env("DATABASE_URL", format!("{base}/{db_name}"))
        .env("AIGW_CHANNEL_KEY", "11".repeat(32))
        .env("AIGW_OPS_ADDR", ops_addr.to_string())
        .env("AIGW_INSTANCE", &instance)
        .env("AIGW_HIGRESS_NAMESPACE", &hns)
        .env("AIGW_LEADER_ELECTION", "false")
        .env("AIGW_CREDENTIALS_NAMESPACE", &secrets_ns)
        .env("AIGW_INGEST_SECRET", "bench-ingest-secret")
        .env(
            "AIGW_LOG",
            std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin} (cargo build --release -p aigw-operator): {e}"));
    let started = Instant::now();
    let tenants: Api<Tenant> = Api::all(client.clone());
    let channels: Api<Channel> = Api::all(client.clone());
    let tokens: Api<Token> = Api::all(client.clone());
    let total = tenants_n + channels_n + tokens_n;
    let mut peak_rss = 0;
    // Watched, not listed: the apiserver sends the events it sends the operator anyway (listing
    // 100,000 objects every few seconds competed with the operator for the apiserver).
    let mut events = stream::select_all([
        readiness(tenants.clone(), &selector),
        readiness(channels.clone(), &selector),
        readiness(tokens.clone(), &selector),
    ]);
    let mut is_ready = std::collections::HashSet::new();
    let mut report = tokio::time::interval(Duration::from_secs(5));
    while is_ready.len() < total {
        tokio::select! {
            Some((key, ok)) = events.next() => {
                if ok {
                    is_ready.insert(key);
                } else {
                    is_ready.remove(&key);
                }
            }
            _ = report.tick() => {
                peak_rss = peak_rss.max(rss_kib(&child));
                eprintln!(
                    "  {:>5.1}s: {}/{total} Ready",
                    started.elapsed().as_secs_f64(),
                    is_ready.len()
                );
                assert!(
                    started.elapsed() < Duration::from_hours(1),
                    "not all Ready after an hour"
                );
            }
        }
    }
    drop(events);
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
    let start_writes = last;
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &hns);
    let routes = ingresses.list(&ListParams::default()).await.unwrap().items;
    let route_count = routes.len();

    // 3. Spec change → Higress object updated.
    eprintln!("measuring {changes_n} spec changes");
    let mut latencies = Vec::new();
    let before = writes(ops_addr);
    for i in 0..changes_n {
        let c = i % channels_n;
        let service = format!("aigw-ch{c}-{sfx}.dns:443");
        // The destination of the route serving this channel, before the change. Read from the
        // kube-apiserver's watch cache, which is what feeds the informer Higress learns of its
        // Ingresses from: a consistent list waits for that cache to catch up with etcd (about
        // 90 ms here), which added up to twice that to every measured change.
        let destination = || async {
            ingresses
                .list(&ListParams::default().match_any())
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

    // 5. The reference, on the same objects with the operator stopped (`BENCH_REFERENCE=0` skips
    // it, for a run that profiles the operator only).
    let reference = if env_usize("BENCH_REFERENCE", 1) == 0 {
        None
    } else {
        let bare_ns = format!("hi-bare-{sfx}");
        let (_, bare_db) = tb.scratch_mysql("bare").await.unwrap();
        aigw_migrations::run_mysql(&bare_db).await.unwrap();
        Some(bare_reference(&client, &bare_db, &selector, &routes, &bare_ns).await)
    };

    println!("| measure | value |");
    println!("|---|---|");
    println!("| objects | {tenants_n} tenants, {channels_n} channels, {tokens_n} tokens |");
    println!(
        "| operator start → all Ready | {:.1} s |",
        all_ready.as_secs_f64()
    );
    if let Some((bare_time, bare_writes)) = reference {
        println!(
            "| bare client, the same writes (reference) | {:.1} s ({bare_writes} apiserver writes; the operator's start made {start_writes} counted, plus its finalizer on each of the {} objects) |",
            bare_time.as_secs_f64(),
            tenants_n + channels_n + tokens_n
        );
    }
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
    if let Some((bare_time, _)) = reference {
        println!(
            "ratio: | operator start → all Ready, {} objects | {:.1} s | bare client, same writes: {:.1} s | {:.2} | ≤ 2 |",
            tenants_n + channels_n + tokens_n,
            all_ready.as_secs_f64(),
            bare_time.as_secs_f64(),
            all_ready.as_secs_f64() / bare_time.as_secs_f64()
        );
    }
    println!(
        "ratio: | spec change → Higress Ingress, p99 | {:.0} ms | | | < 300 ms |",
        percentile(&latencies, 0.99)
    );
    println!(
        "ratio: | operator peak RSS | {} MiB | | | < 256 MiB |",
        peak_rss / 1024
    );
}
