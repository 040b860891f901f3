//! Applies [`higress::build`](crate::higress::build) to the cluster: one loop for the whole Higress
//! configuration, woken by any change of Channels, Secrets or our Higress objects (so a manual edit
//! is reverted), debounced, and idempotent (an unchanged world writes nothing).
//!
//! McpBridge `default` is shared with the Higress console: it is read, only registries named
//! `aigw-*` are changed, and it is replaced with its `resourceVersion`; a conflict re-reads and
//! retries, so a concurrent writer's change is never lost.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use aigw_crds::{Channel, MANAGED_BY, Tenant, labels};
use futures::{StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Secret},
    networking::v1::Ingress,
};
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, ListParams, PartialObjectMeta, PostParams},
    runtime::{WatchStreamExt, reflector::Store, watcher},
};
use serde_json::{Value, json};

use crate::{
    apply::{self, apply_set},
    context::Ctx,
    error::{Error, Result},
    higress::{self, COMPONENT, PREFIX, Routable},
};

/// Reads a channel's upstream keys from its Secret: the value split on commas and newlines.
/// `Ok(None)` when the Secret or key does not exist (a condition, not an error).
pub async fn read_keys(ctx: &Ctx, channel: &Channel) -> Result<Option<Vec<String>>> {
    let r = &channel.spec.credentials;
    if r.namespace != ctx.config.credentials_namespace {
        // Never read: a Channel must not turn the operator into a reader of arbitrary Secrets.
        return Ok(None);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
    Ok(keys_in(api.get_opt(&r.name).await?.as_ref(), &r.key))
}

/// The keys under `key` in `secret`: its value split on commas and newlines, `None` when there
/// are none.
fn keys_in(secret: Option<&Secret>, key: &str) -> Option<Vec<String>> {
    let bytes = secret?.data.as_ref()?.get(key)?;
    let text = String::from_utf8_lossy(&bytes.0);
    let keys: Vec<String> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// One pass: build everything from the channels in `store` and apply the difference. A pass costs
/// a fixed number of round trips whatever the number of channels and tenants: one list of the
/// credentials namespace's Secrets, one list per kind of Higress object, one read of McpBridge
/// `default`, and the writes of what changed (the TLS `ConfigMap` is [`sync_tls`], after it).
pub async fn sync_once(ctx: &Ctx, store: &Store<Channel>) -> Result<()> {
    // Where a pass's time goes, logged at debug (`AIGW_LOG=info,aigw_operator::sync=debug`).
    let mut clock = Stopwatch::start();
    let channels: Vec<Arc<Channel>> = store
        .state()
        .into_iter()
        .filter(|c| !c.spec.disabled && c.metadata.deletion_timestamp.is_none())
        .collect();
    let credentials = ctx.config.credentials_namespace.as_str();
    let secrets: BTreeMap<String, Secret> =
        Api::<Secret>::namespaced(ctx.client.clone(), credentials)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
    let mut routable = Vec::new();
    for c in &channels {
        let r = &c.spec.credentials;
        // Only the credentials namespace is ever read (see `read_keys`).
        if r.namespace != credentials {
            continue;
        }
        if let Some(keys) = keys_in(secrets.get(&r.name), &r.key) {
            routable.push(Routable { channel: c, keys });
        }
    }
    drop(secrets);
    let read_secrets = clock.lap();
    let desired = higress::build(&routable, &ctx.config)?;
    let build = clock.lap();
    let ns = ctx.config.higress_namespace.as_str();
    let selector = format!(
        "{}={MANAGED_BY},{}={COMPONENT}",
        labels::MANAGED_BY,
        labels::COMPONENT
    );

    // The order keeps every route authenticated and routable. ext-auth, credential-strip and the
    // usage reporter cover route Ingresses by name (`matchRules`); routes name registries; a
    // fallback EnvoyFilter redirects to its route's fallback Ingress. So: first the plugins naming
    // the routes that stay, come or go, and the new registries (none removed yet); then the
    // routes, with the filters written after the Ingresses they redirect to and removed before
    // them; last, what only the routes that went needed. A new route never exists before ext-auth
    // names it, and a renamed route's models always have a route.
    let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), ns);
    let plugins: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &higress::wasm_plugin_resource());
    let filters: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &higress::envoy_filter_resource());
    let (live, live_filters) = futures::try_join!(
        apply::list(&ingresses, &selector),
        apply::list(&filters, &selector)
    )?;
    let list = clock.lap();
    let leaving: Vec<String> = live
        .iter()
        .map(ResourceExt::name_any)
        .filter(|n| !desired.ingresses.iter().any(|d| &d.name_any() == n))
        .collect();
    let plugins_first = if leaving.is_empty() {
        desired.plugins.clone()
    } else {
        higress::build_naming(&routable, &ctx.config, &leaving)?.plugins
    };
    let (_, registries_leaving) = futures::try_join!(
        apply_set(ctx, &plugins, &selector, &plugins_first, false),
        sync_registries(ctx, &desired.registries, true),
    )?;
    let plugins_and_registries = clock.lap();

    apply::apply_listed(ctx, &ingresses, &live, &desired.ingresses).await?;
    apply::apply_listed(ctx, &filters, &live_filters, &desired.envoy_filters).await?;
    apply::prune_listed(ctx, &filters, &live_filters, &desired.envoy_filters).await?;
    apply::prune_listed(ctx, &ingresses, &live, &desired.ingresses).await?;
    let routes = clock.lap();

    if !leaving.is_empty() {
        apply_set(ctx, &plugins, &selector, &desired.plugins, false).await?;
    }
    if registries_leaving {
        sync_registries(ctx, &desired.registries, false).await?;
    }
    tracing::debug!(
        channels = channels.len(),
        read_secrets,
        build,
        list,
        plugins_and_registries,
        routes,
        rest = clock.lap(),
        total = clock.total(),
        "higress sync pass (µs per step)"
    );
    Ok(())
}

/// Microseconds per step of a pass, for the debug log that says where a pass's time goes.
struct Stopwatch {
    start: std::time::Instant,
    last: std::time::Instant,
}

impl Stopwatch {
    fn start() -> Self {
        let now = std::time::Instant::now();
        Self {
            start: now,
            last: now,
        }
    }

    /// Microseconds since the last lap (or the start).
    fn lap(&mut self) -> u64 {
        let now = std::time::Instant::now();
        let us = now.duration_since(self.last).as_micros();
        self.last = now;
        u64::try_from(us).unwrap_or(u64::MAX)
    }

    /// Microseconds since the start.
    fn total(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Writes our entries of the `higress-https` `ConfigMap` (`crate::tls`): one per domain a tenant of
/// this instance serves, by the priority of `tls::entries` when not all fit (see [`write_tls`]).
/// Run after the routes, on its own backoff: a failure here never delays a route change.
pub async fn sync_tls(ctx: &Ctx) -> Result<()> {
    let mut clock = Stopwatch::start();
    // The Tenant controller's store when it runs (no list of every tenant per pass), else a list.
    let tenants: Vec<Arc<Tenant>> = match ctx.tenant_store() {
        Some(store) => store.state(),
        None => Api::<Tenant>::all(ctx.client.clone())
            .list(&ListParams::default().labels(&ctx.config.selector()))
            .await?
            .items
            .into_iter()
            .map(Arc::new)
            .collect(),
    };
    let mut tenants: Vec<&Arc<Tenant>> = tenants
        .iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .collect();
    // Oldest first: part of who keeps a certificate when not all fit (`tls::entries`).
    tenants.sort_by(|a, b| {
        let age = |t: &Tenant| t.metadata.creation_timestamp.as_ref().map(|c| c.0);
        age(a)
            .cmp(&age(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let served: Vec<(String, Vec<String>)> = tenants
        .iter()
        .filter_map(|t| {
            let st = t.status.as_ref()?;
            Some((st.namespace.clone()?, st.domains.clone()))
        })
        .collect();
    let tenants = clock.lap();
    let left_out = write_tls(ctx, &served).await?;
    tracing::debug!(
        tenants,
        write = clock.lap(),
        "higress TLS step (µs per step)"
    );
    let count = i64::try_from(left_out.len()).unwrap_or(i64::MAX);
    // Warned when the ConfigMap becomes full (not at every pass while it stays full: the gauge
    // holds the number), and told when everything fits again.
    let before = ctx.metrics.tls_left_out.set(count);
    if before == 0 && count > 0 {
        tracing::warn!(
            left_out = count,
            last = %left_out.iter().rev().take(5).cloned().collect::<Vec<_>>().join(","),
            "the {} ConfigMap is full ({} bytes): the domains last in priority (later domains \
             of a tenant, newer tenants) get no certificate entry; see docs/architecture.md (TLS)",
            crate::tls::CONFIGMAP,
            crate::tls::CONFIGMAP_LIMIT,
        );
    } else if before > 0 && count == 0 {
        tracing::info!(
            "every served domain fits in the {} ConfigMap again",
            crate::tls::CONFIGMAP
        );
    }
    Ok(())
}

/// Writes `served` (each tenant's namespace and domains, oldest tenant first) as our entries of the
/// `higress-https` `ConfigMap`, within the kube-apiserver's size limit less what its other keys
/// take, and returns the domains that did not fit. Replaced with its `resourceVersion`; a conflict
/// fails, and the next pass retries.
pub async fn write_tls(ctx: &Ctx, served: &[(String, Vec<String>)]) -> Result<Vec<String>> {
    let mut clock = Stopwatch::start();
    let ns = ctx.config.higress_namespace.as_str();
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let current = maps.get_opt(crate::tls::CONFIGMAP).await?;
    let read = clock.lap();
    let existing = current
        .as_ref()
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(crate::tls::KEY))
        .map(String::as_str);
    // The kube-apiserver counts every value of `data` and `binaryData`; the keys are counted
    // too, a few bytes to spare.
    let others: usize = current.as_ref().map_or(0, |c| {
        let data = c.data.iter().flatten();
        let binary = c.binary_data.iter().flatten();
        data.filter(|(k, _)| k.as_str() != crate::tls::KEY)
            .map(|(k, v)| k.len() + v.len())
            .chain(binary.map(|(k, v)| k.len() + v.0.len()))
            .sum()
    });
    let budget = crate::tls::CONFIGMAP_LIMIT
        .saturating_sub(others)
        .saturating_sub(crate::tls::KEY.len());
    // The same tenants, budget and document as the last step left: nothing to build (a channel
    // change would otherwise rebuild a 1 MiB document, several times over when it is full).
    let budget_text = budget.to_string();
    let served_hash = digest(
        std::iter::once(budget_text.as_str()).chain(served.iter().flat_map(|(ns, domains)| {
            std::iter::once(ns.as_str()).chain(domains.iter().map(String::as_str))
        })),
    );
    let text_hash = digest(existing);
    let last = ctx.tls_last.lock().ok().and_then(|l| l.clone());
    let served_changed = last.as_ref().is_none_or(|l| l.served != served_hash);
    let text_changed = last.as_ref().is_none_or(|l| l.text != text_hash);
    if let Some(last) = last
        && !served_changed
        && !text_changed
    {
        tracing::debug!(
            read,
            compare = clock.lap(),
            "higress TLS ConfigMap unchanged (µs per step)"
        );
        return Ok(last.left_out);
    }
    let ours = crate::tls::entries(served, &ctx.config.tls, ns);
    if current.is_none() && ours.is_empty() {
        return Ok(Vec::new());
    }
    let merged = crate::tls::merge(existing, ours, &ctx.config.tls, budget)?;
    // Remembered before the write: if it fails, the ConfigMap's text differs from this one, so
    // the next step rebuilds.
    if let Ok(mut last) = ctx.tls_last.lock() {
        *last = Some(crate::context::TlsLast {
            served: served_hash,
            text: digest(Some(merged.text.as_str())),
            left_out: merged.left_out.clone(),
        });
    }
    let build = clock.lap();
    let same = existing == Some(merged.text.as_str());
    tracing::debug!(
        read,
        build,
        served_changed,
        text_changed,
        write = !same,
        bytes = merged.text.len(),
        left_out = merged.left_out.len(),
        "higress TLS ConfigMap rebuilt (µs per step)"
    );
    if same {
        return Ok(merged.left_out);
    }
    let mut cm: ConfigMap = current.unwrap_or_else(|| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(crate::tls::CONFIGMAP.to_owned()),
            namespace: Some(ns.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    });
    cm.data
        .get_or_insert_with(Default::default)
        .insert(crate::tls::KEY.to_owned(), merged.text);
    if cm.metadata.resource_version.is_some() {
        maps.replace(
            crate::tls::CONFIGMAP,
            &kube::api::PostParams::default(),
            &cm,
        )
        .await?;
    } else {
        maps.create(&kube::api::PostParams::default(), &cm).await?;
    }
    ctx.count_write();
    Ok(merged.left_out)
}

/// SHA-256 of a sequence of strings, each with its length, for [`write_tls`]'s "unchanged since
/// the last step" check (a tenant cannot make a different list of domains look unchanged).
fn digest<'a>(parts: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// A McpBridge registry's name.
fn registry_name(registry: &Value) -> Option<&str> {
    registry["name"].as_str()
}

/// Puts our registries into McpBridge `default`, leaving every other registry as it is. With
/// `keep_leaving`, ours that are no longer wanted stay too (routes may still name them), and the
/// result says whether there were any; without it they go.
pub async fn sync_registries(ctx: &Ctx, ours: &[Value], keep_leaving: bool) -> Result<bool> {
    const ATTEMPTS: u32 = 8;
    let ns = ctx.config.higress_namespace.as_str();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &higress::mcp_bridge_resource());
    for attempt in 0..ATTEMPTS {
        let Some(mut bridge) = api.get_opt("default").await? else {
            if ours.is_empty() {
                return Ok(false);
            }
            let ar = higress::mcp_bridge_resource();
            let new: DynamicObject = serde_json::from_value(json!({
                "apiVersion": ar.api_version, "kind": ar.kind,
                "metadata": {"name": "default", "namespace": ns},
                "spec": {"registries": ours},
            }))?;
            match api.create(&PostParams::default(), &new).await {
                Ok(_) => {
                    ctx.count_write();
                    return Ok(false);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let none = Vec::new();
        let current = bridge.data["spec"]["registries"]
            .as_array()
            .unwrap_or(&none);
        let is_ours = |r: &Value| registry_name(r).is_some_and(|n| n.starts_with(PREFIX));
        // Everything below is by name, in time linear in the registries (a pass at 1,000
        // channels compared every pair, and that was a quarter of the operator's CPU).
        let wanted_names: HashSet<&str> = ours.iter().filter_map(registry_name).collect();
        // Ours that are no longer wanted: kept for now with `keep_leaving`.
        let leaving: Vec<&Value> = current
            .iter()
            .filter(|r| is_ours(r) && !registry_name(r).is_some_and(|n| wanted_names.contains(n)))
            .collect();
        let kept = keep_leaving && !leaving.is_empty();
        let mut mine: Vec<&Value> = ours.iter().collect();
        if keep_leaving {
            mine.extend(&leaving);
        }
        let mut mine_now: HashMap<&str, Vec<&Value>> = HashMap::new();
        let mut mine_now_count = 0;
        for r in current.iter().filter(|r| is_ours(r)) {
            mine_now_count += 1;
            mine_now
                .entry(registry_name(r).unwrap_or_default())
                .or_default()
                .push(r);
        }
        let same = mine_now_count == mine.len()
            && mine.iter().all(|o| {
                registry_name(o)
                    .and_then(|n| mine_now.get(n))
                    .is_some_and(|now| now.iter().any(|m| crate::apply::contains(m, o)))
            });
        if same {
            return Ok(kept);
        }
        let wanted: Vec<Value> = current
            .iter()
            .filter(|r| !is_ours(r))
            .chain(mine)
            .cloned()
            .collect();
        bridge.data["spec"]["registries"] = Value::Array(wanted);
        // `replace` sends our resourceVersion: a concurrent write makes it fail with 409.
        match api
            .replace("default", &PostParams::default(), &bridge)
            .await
        {
            Ok(_) => {
                ctx.count_write();
                return Ok(kept);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!("McpBridge changed under us; re-reading");
                // Back off a little, with jitter, so two eager writers do not keep colliding.
                let ms = rand::random_range(5..30) * u64::from(attempt + 1);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict {
        object: format!("{ns}/McpBridge/default"),
        attempts: ATTEMPTS,
    })
}

/// One stream of "something we depend on changed", besides Channels and Tenants (whose
/// controllers' watches wake the sync themselves, see `Ctx::sync_wake`): Secrets (metadata only),
/// our Ingresses, WasmPlugins and `EnvoyFilter`s (so manual edits are reverted), McpBridge
/// `default`, and the TLS `ConfigMap`.
fn triggers(ctx: &Ctx) -> futures::stream::BoxStream<'static, ()> {
    fn tick<K, S>(s: S) -> futures::stream::BoxStream<'static, ()>
    where
        S: futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, watcher::Error>>
            + Send
            + 'static,
        K: Send + 'static,
    {
        s.touched_objects().map(|_| ()).boxed()
    }
    let ns = ctx.config.higress_namespace.as_str();
    let ours = watcher::Config::default().labels(&format!("{}={MANAGED_BY}", labels::MANAGED_BY));
    let client = ctx.client.clone();
    let dynamic =
        |ar: &kube::api::ApiResource| Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar);
    stream::select_all(vec![
        // Channel credentials: the only Secrets the upstream config reads, in the one namespace
        // where the operator's role lets it watch Secrets.
        tick(watcher(
            Api::<PartialObjectMeta<Secret>>::namespaced(
                client.clone(),
                &ctx.config.credentials_namespace,
            ),
            watcher::Config::default(),
        )),
        tick(watcher(
            Api::<Ingress>::namespaced(client.clone(), ns),
            ours.clone(),
        )),
        tick(watcher(
            dynamic(&higress::wasm_plugin_resource()),
            ours.clone(),
        )),
        tick(watcher(dynamic(&higress::envoy_filter_resource()), ours)),
        tick(watcher(
            dynamic(&higress::mcp_bridge_resource()),
            watcher::Config::default().fields("metadata.name=default"),
        )),
        // The ConfigMap tenants' served domains go to (`sync_tls`).
        tick(watcher(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            watcher::Config::default().fields(&format!("metadata.name={}", crate::tls::CONFIGMAP)),
        )),
    ])
    .boxed()
}

/// How long the sync loop waits for the watch events to go quiet before a pass.
const QUIET: Duration = Duration::from_millis(25);
/// The longest a pass waits behind a stream of events.
const MOST: Duration = Duration::from_millis(500);

/// Runs one step of a pass, counted under `controller`; whether it succeeded (a failure is logged
/// and counted).
async fn pass(
    ctx: &Ctx,
    controller: &'static str,
    step: impl std::future::Future<Output = Result<()>>,
) -> bool {
    let labels = crate::context::ControllerLabels { controller };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    match step.await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, category = e.category(), step = controller, "higress sync failed; retrying");
            ctx.metrics
                .errors
                .get_or_create(&crate::context::ErrorLabels {
                    controller,
                    category: e.category(),
                })
                .inc();
            false
        }
    }
}

/// Runs the sync loop until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Ctx>,
    store: Store<Channel>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let wake = ctx.sync_wake.clone();
    let triggers = triggers(&ctx);
    let notify = wake.clone();
    let feeder = tokio::spawn(async move {
        let mut triggers = triggers;
        while triggers.next().await.is_some() {
            notify.notify_one();
        }
    });
    let worker = async {
        store.wait_until_ready().await.ok();
        let mut backoff = Duration::from_millis(500);
        // The TLS step has its own schedule: when it fails, the routes go on at once.
        let mut tls_backoff = Duration::from_millis(500);
        let mut tls_due = tokio::time::Instant::now();
        loop {
            // Debounce: a burst of watch events becomes one pass. The pass starts once no event
            // has come for `QUIET`, or `MOST` after the first, whichever is sooner: one change
            // waits `QUIET`, and a cold start's flood of status writes still passes every `MOST`.
            let first = std::time::Instant::now();
            while first.elapsed() < MOST
                && tokio::time::timeout(QUIET, wake.notified()).await.is_ok()
            {}
            if !ctx.term.valid() {
                // Not known to be the leader right now (see `leader`): wait for a renewal.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let started = std::time::Instant::now();
            let routes = pass(&ctx, "higress", Box::pin(sync_once(&ctx, &store))).await;
            if tokio::time::Instant::now() >= tls_due {
                if pass(&ctx, "higress-tls", Box::pin(sync_tls(&ctx))).await {
                    tls_backoff = Duration::from_millis(500);
                } else {
                    tls_due = tokio::time::Instant::now() + tls_backoff;
                    tls_backoff = (tls_backoff * 2).min(Duration::from_secs(30));
                }
            }
            if routes {
                backoff = Duration::from_millis(500);
                ctx.metrics
                    .duration
                    .get_or_create(&crate::context::ControllerLabels {
                        controller: "higress",
                    })
                    .observe(started.elapsed().as_secs_f64());
                // Wait for the next event; resync periodically in case one was missed, and
                // retry a failed TLS step when it is due.
                let until_tls = tls_due.saturating_duration_since(tokio::time::Instant::now());
                let idle = if until_tls.is_zero() {
                    Duration::from_mins(5)
                } else {
                    until_tls.min(Duration::from_mins(5))
                };
                let _ = tokio::time::timeout(idle, wake.notified()).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    tokio::select! {
        () = worker => {}
        () = shutdown => {}
    }
    feeder.abort();
}
