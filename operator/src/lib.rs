//! The AIGateway operator: reconciles Tenant, Channel, Token and Pricing into Higress objects,
//! tenant namespaces, status and the MySQL mirror.
//!
//! Each controller follows `dereference → validate → build → apply → status`; `build` functions
//! are pure (no client) and unit-tested on their output. The Higress configuration is one pure
//! function of all channels (`higress::build`) applied by one loop (`sync`), because every Higress
//! object we write is shared by all channels and tenants (the scale rule in docs/architecture.md).

pub mod apply;
pub mod channel;
pub mod conditions;
pub mod context;
pub mod error;
pub mod higress;
pub mod keys;
pub mod leader;
pub mod paced;
pub mod pricing;
pub mod sync;
pub mod tenant;
pub mod tls;
pub mod token;

use std::{future::Future, sync::Arc, time::Duration};

use aigw_common::shutdown::Shutdown;
use aigw_crds::{Channel, CommonStatus, Pricing, Tenant, Token};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource,
    api::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        finalizer,
        reflector::{self, ObjectRef, store::Writer},
        watcher,
    },
};

use crate::{
    context::{ControllerLabels, Ctx, ErrorLabels},
    error::Error,
};

pub(crate) fn finalizer_error(e: finalizer::Error<Error>) -> Error {
    match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        finalizer::Error::UnnamedObject => Error::Missing("metadata.name"),
        finalizer::Error::InvalidFinalizer => Error::Invalid {
            field: "finalizer",
            reason: aigw_crds::FINALIZER.into(),
        },
    }
}

/// Whether two statuses differ other than in condition transition times.
pub(crate) fn differs_ignoring_time(a: &CommonStatus, b: &CommonStatus) -> bool {
    let key = |s: &CommonStatus| {
        (
            s.observed_generation,
            s.conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone(),
                        c.message.clone(),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    key(a) != key(b)
}

fn watch_config(ctx: &Ctx) -> watcher::Config {
    watcher::Config::default()
        .any_semantic()
        .labels(&ctx.config.selector())
}

/// Counts, times and traces one reconcile (one span per reconcile, named after the object).
async fn instrumented<K, F>(
    controller: &'static str,
    obj: &K,
    ctx: Arc<Ctx>,
    fut: F,
) -> Result<Action, Error>
where
    K: Resource,
    F: Future<Output = Result<Action, Error>>,
{
    if !ctx.term.valid() {
        // Not (or no longer known to be) the leader: act on nothing until the lease is renewed.
        return Ok(Action::requeue(std::time::Duration::from_secs(2)));
    }
    let labels = ControllerLabels { controller };
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        controller,
        namespace = obj.meta().namespace.as_deref().unwrap_or(""),
        name = obj.meta().name.as_deref().unwrap_or(""),
        generation = obj.meta().generation.unwrap_or_default(),
    );
    let result = tracing::Instrument::instrument(fut, span).await;
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics
            .errors
            .get_or_create(&ErrorLabels {
                controller,
                category: e.category(),
            })
            .inc();
    }
    result
}

fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    _ctx: Arc<Ctx>,
) -> Action {
    tracing::warn!(
        kind = %K::kind(&()),
        namespace = obj.meta().namespace.as_deref().unwrap_or(""),
        name = obj.meta().name.as_deref().unwrap_or(""),
        error = %error,
        category = error.category(),
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// What a controller's run stream yields for each reconcile.
type Reconciled<K> =
    Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<Error, watcher::Error>>;

async fn drain<S, K>(name: &'static str, stream: S)
where
    S: futures::Stream<Item = Reconciled<K>>,
    K: Resource,
{
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = name, error = %e, "reconcile error");
            }
        })
        .await;
}

/// Drops what no reconcile reads from an object kept in a store: `managedFields` (most of an
/// object's size), annotations (`kubectl apply` keeps a whole copy of the object there), labels
/// (the watch already selects this instance's objects; a label map is a 600-byte tree node per
/// object, a quarter of a stored Token: see `docs/benchmarks.md`) and `resourceVersion` (kept
/// twice, in the object and in the store's key; the watch keeps its own). Reconciles write status
/// and finalizers with patches that send no `resourceVersion`, never the stored object whole, so
/// nothing is lost on the server.
fn trim<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.resource_version = None;
}

/// [`trim`], and for a Token also its uid (kept twice as well): only the owner reference of a
/// generated key's Secret needs it, and that reconcile reads the Token (`token.rs`).
fn trim_token(o: &mut Token) {
    trim(o);
    o.metadata.uid = None;
}

/// A watch of `K` whose objects are kept in `writer`'s store [trimmed](trim), as the trigger
/// stream of a controller. With `wake`, every event also wakes the Higress sync — after the store
/// has it, so the pass reads it.
fn lean_stream<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: Writer<K>,
    wake: Option<Arc<tokio::sync::Notify>>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, cfg)
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .inspect(move |_| {
            if let Some(wake) = &wake {
                wake.notify_one();
            }
        })
        .applied_objects()
        // The controller keys its queue by the object's name and namespace; without the uid its
        // queued references hold two strings each instead of three (every object is queued at
        // once at start). The store's copy above keeps it (`trim` already dropped the
        // resourceVersion).
        .map_ok(|mut o| {
            o.meta_mut().uid = None;
            o
        })
}

/// A metadata-only watch (no Secret data is ever held in memory).
fn metadata_stream<K>(
    api: Api<PartialObjectMeta<K>>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .touched_objects()
}

/// The channels whose credentials name this Secret.
fn channels_using(
    store: &reflector::Store<Channel>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<Channel>> {
    let (ns, name) = (
        secret.metadata.namespace.as_ref(),
        secret.metadata.name.as_ref(),
    );
    store
        .state()
        .into_iter()
        .filter(|c| {
            Some(&c.spec.credentials.namespace) == ns && Some(&c.spec.credentials.name) == name
        })
        .map(|c| ObjectRef::from_obj(&*c))
        .collect()
}

/// Wraps a reconcile function with metrics and a tracing span.
fn reconciler<K, F, Fut>(
    controller: &'static str,
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Ctx>) -> futures::future::BoxFuture<'static, Result<Action, Error>>
where
    K: Resource + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        let o = obj.clone();
        Box::pin(
            async move { instrumented(controller, &*o, ctx.clone(), reconcile(obj, ctx)).await },
        )
    }
}

/// The Token controller and the watch that feeds it. Tokens are most of the objects (100,000 at
/// 10×), so the controller is fed at its own pace (`paced`), not with every event at once.
fn token_controller(
    ctx: &Arc<Ctx>,
    cfg: watcher::Config,
    stop: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) -> (
    impl futures::Stream<Item = Reconciled<Token>>,
    impl Future<Output = ()>,
) {
    let (store, writer) = reflector::store();
    let paced = paced::Paced::<Token>::new();
    // Boxed: the watch's state is large, and `run`'s own future would carry it inline.
    let watch = Box::pin(paced.clone().drive(
        Api::<Token>::all(ctx.client.clone()),
        cfg,
        writer,
        trim_token,
        stop.clone(),
    ));
    let mut reconcile = reconciler("token", token::reconcile);
    let pacing = paced.clone();
    let controller = Controller::for_stream(paced.feed(store.clone()), store)
        .with_config(controller_config())
        .graceful_shutdown_on(stop)
        .run(
            move |token: Arc<Token>, ctx| {
                pacing.release(&token);
                reconcile(token, ctx)
            },
            error_policy,
            ctx.clone(),
        );
    (controller, watch)
}

/// Runs every controller and the Higress sync until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: Shutdown) {
    let client = ctx.client.clone();
    let stop = || {
        let s = shutdown.clone();
        futures::FutureExt::shared(Box::pin(async move { s.wait().await }))
    };
    let cfg = watch_config(&ctx);

    let (tenant_store, tenant_writer) = reflector::store();
    ctx.set_tenants(tenant_store.clone());
    let tenants = Controller::for_stream(
        lean_stream(
            Api::<Tenant>::all(client.clone()),
            cfg.clone(),
            tenant_writer,
            Some(ctx.sync_wake.clone()),
        ),
        tenant_store,
    )
    .with_config(controller_config())
    .graceful_shutdown_on(stop())
    .run(
        reconciler("tenant", tenant::reconcile),
        error_policy,
        ctx.clone(),
    );

    let (channel_store, channel_writer) = reflector::store();
    let store_for_map = channel_store.clone();
    let channels = Controller::for_stream(
        lean_stream(
            Api::<Channel>::all(client.clone()),
            cfg.clone(),
            channel_writer,
            Some(ctx.sync_wake.clone()),
        ),
        channel_store.clone(),
    )
    .watches_stream(
        metadata_stream(Api::<PartialObjectMeta<Secret>>::namespaced(
            client.clone(),
            &ctx.config.credentials_namespace,
        )),
        move |secret| channels_using(&store_for_map, &secret),
    )
    .with_config(controller_config())
    .graceful_shutdown_on(stop())
    .run(
        reconciler("channel", channel::reconcile),
        error_policy,
        ctx.clone(),
    );

    let (tokens, watch_tokens) = token_controller(&ctx, cfg.clone(), stop());

    let (pricing_store, pricing_writer) = reflector::store();
    let pricings = Controller::for_stream(
        lean_stream(
            Api::<Pricing>::all(client.clone()),
            cfg,
            pricing_writer,
            None,
        ),
        pricing_store,
    )
    .with_config(controller_config())
    .graceful_shutdown_on(stop())
    .run(
        reconciler("pricing", pricing::reconcile),
        error_policy,
        ctx.clone(),
    );

    let all = async {
        tokio::join!(
            drain("tenant", tenants),
            drain("channel", channels),
            drain("token", tokens),
            watch_tokens,
            drain("pricing", pricings),
            sync::run(ctx.clone(), channel_store, stop()),
        );
    };
    // Controllers finish their in-flight reconciles on shutdown; a watch stuck retrying (an API
    // that went away) must not keep the process alive, so give them a bounded grace period.
    tokio::select! {
        () = all => {}
        () = async { shutdown.wait().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("controllers did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    }
}

/// Reconciles running at once per controller: unbounded, a cold start with 10,000 tokens runs
/// 10,000 reconciles at once, each holding a request and a MySQL wait (memory and apiserver load).
const CONCURRENCY: u16 = 32;

fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(CONCURRENCY)
}

/// How long controllers get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Waits until every AIGateway CRD is established (logging once what is missing), or shutdown.
/// Returns false on shutdown.
pub async fn wait_for_crds(client: &kube::Client, shutdown: &Shutdown) -> bool {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut logged = false;
    loop {
        let mut missing = Vec::new();
        for crd in aigw_crds::crds() {
            let name = crd.metadata.name.unwrap_or_default();
            let established = match api.get_opt(&name).await {
                Ok(Some(live)) => live.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                }),
                _ => false,
            };
            if !established {
                missing.push(name);
            }
        }
        if missing.is_empty() {
            return true;
        }
        if !logged {
            tracing::warn!(missing = ?missing, "waiting for CRDs to be installed (kubectl apply --server-side -f crds/crds.yaml)");
            logged = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = shutdown.wait() => return false,
        }
    }
}
