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
pub mod pricing;
pub mod sync;
pub mod tenant;
pub mod token;

use std::{future::Future, sync::Arc, time::Duration};

use aigw_common::shutdown::Shutdown;
use aigw_crds::{Channel, CommonStatus, Pricing, Tenant, Token};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource,
    runtime::{Controller, controller::Action, finalizer, reflector::ObjectRef, watcher},
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
    let cfg = watcher::Config::default().any_semantic();
    match ctx.config.selector() {
        Some(sel) => cfg.labels(&sel),
        None => cfg,
    }
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

fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn drain<S, K>(name: &'static str, stream: S)
where
    S: futures::Stream<
            Item = Result<
                (ObjectRef<K>, Action),
                kube::runtime::controller::Error<Error, watcher::Error>,
            >,
        >,
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

/// Runs every controller and the Higress sync until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: Shutdown) {
    let client = ctx.client.clone();
    let stop = || {
        let s = shutdown.clone();
        futures::FutureExt::shared(Box::pin(async move { s.wait().await }))
    };
    let cfg = watch_config(&ctx);

    let tenants =
        Controller::new(Api::<Tenant>::all(client.clone()), cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                |t, c| {
                    let obj = t.clone();
                    async move {
                        instrumented("tenant", &*obj, c.clone(), tenant::reconcile(t, c)).await
                    }
                },
                error_policy,
                ctx.clone(),
            );

    let channel_ctl = Controller::new(Api::<Channel>::all(client.clone()), cfg.clone());
    let channel_store = channel_ctl.store();
    let store_for_map = channel_store.clone();
    let channels =
        channel_ctl
            .watches(
                Api::<Secret>::all(client.clone()),
                watcher::Config::default(),
                move |secret| {
                    let (ns, name) = (
                        secret.metadata.namespace.clone(),
                        secret.metadata.name.clone(),
                    );
                    store_for_map
                        .state()
                        .into_iter()
                        .filter(|c| {
                            Some(&c.spec.credentials.namespace) == ns.as_ref()
                                && Some(&c.spec.credentials.name) == name.as_ref()
                        })
                        .map(|c| ObjectRef::from_obj(&*c))
                        .collect::<Vec<_>>()
                },
            )
            .graceful_shutdown_on(stop())
            .run(
                |c, x| {
                    let obj = c.clone();
                    async move {
                        instrumented("channel", &*obj, x.clone(), channel::reconcile(c, x)).await
                    }
                },
                error_policy,
                ctx.clone(),
            );

    let tokens = Controller::new(Api::<Token>::all(client.clone()), cfg.clone())
        .owns(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(stop())
        .run(
            |t, c| {
                let obj = t.clone();
                async move { instrumented("token", &*obj, c.clone(), token::reconcile(t, c)).await }
            },
            error_policy,
            ctx.clone(),
        );

    let pricings =
        Controller::new(Api::<Pricing>::all(client.clone()), cfg)
            .graceful_shutdown_on(stop())
            .run(
                |p, c| {
                    let obj = p.clone();
                    async move {
                        instrumented("pricing", &*obj, c.clone(), pricing::reconcile(p, c)).await
                    }
                },
                error_policy,
                ctx.clone(),
            );

    tokio::join!(
        drain("tenant", tenants),
        drain("channel", channels),
        drain("token", tokens),
        drain("pricing", pricings),
        sync::run(ctx.clone(), channel_store, stop()),
    );
}
