//! Channel controller: checks the referenced Secret, mirrors the channel into MySQL with its
//! upstream keys sealed (AES-256-GCM), and reports status. The Higress side of channels is built by
//! `higress` and applied by `sync` for all channels at once.

use std::{sync::Arc, time::Duration};

use aigw_crds::{Channel, ChannelStatus, CommonStatus, FINALIZER};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, finalizer},
};
use serde_json::json;

use crate::{
    apply::FIELD_MANAGER,
    conditions::{Cond, merge},
    context::Ctx,
    error::{Error, Result},
    sync::read_keys,
};

pub async fn reconcile(channel: Arc<Channel>, ctx: Arc<Ctx>) -> Result<Action> {
    let api: Api<Channel> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, channel, |event| async {
        match event {
            finalizer::Event::Apply(c) => apply_channel(&c, &ctx).await,
            finalizer::Event::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(crate::finalizer_error)
}

async fn apply_channel(channel: &Channel, ctx: &Ctx) -> Result<Action> {
    let name = channel.name_any();
    let r = &channel.spec.credentials;
    let keys = read_keys(ctx, channel).await?;
    let (conditions, channel_id, key_count) = match &keys {
        None if r.namespace != ctx.config.credentials_namespace => (
            vec![Cond::new(
                "Ready",
                false,
                "CredentialsNamespaceNotAllowed",
                format!(
                    "credentials must be a Secret in namespace {} (the platform's credentials \
                     namespace), not {}; the Secret was not read and the channel serves nothing",
                    ctx.config.credentials_namespace, r.namespace
                ),
            )],
            None,
            None,
        ),
        None => (
            vec![Cond::new(
                "Ready",
                false,
                "SecretMissing",
                format!(
                    "Secret {}/{} has no non-empty key {:?}; the channel serves nothing until it does",
                    r.namespace, r.name, r.key
                ),
            )],
            None,
            None,
        ),
        Some(keys) => {
            let id = mirror(channel, ctx, keys).await?;
            let problem = crate::higress::provider_problem(channel);
            let ready = if let Some(problem) = problem {
                Cond::new(
                    "Ready",
                    false,
                    "ProviderConfigInvalid",
                    format!("{problem}; the channel serves nothing until it is fixed"),
                )
            } else if channel.spec.disabled {
                Cond::new(
                    "Ready",
                    true,
                    "Disabled",
                    "channel is disabled: configured but serving nothing",
                )
            } else {
                Cond::new(
                    "Ready",
                    true,
                    "Reconciled",
                    format!("{} upstream key(s); routed through Higress", keys.len()),
                )
            };
            (vec![ready], Some(id), i32::try_from(keys.len()).ok())
        }
    };
    let old = channel.status.clone().unwrap_or_default();
    let status = ChannelStatus {
        common: CommonStatus {
            observed_generation: channel.metadata.generation,
            conditions: merge(
                &old.common.conditions,
                &conditions,
                channel.metadata.generation,
            ),
        },
        channel_id: channel_id.or(old.channel_id),
        key_count,
    };
    if crate::differs_ignoring_time(&old.common, &status.common)
        || old.channel_id != status.channel_id
        || old.key_count != status.key_count
    {
        Api::<Channel>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({"apiVersion": Channel::api_version(&()), "kind": Channel::kind(&()), "status": status})),
            )
            .await?;
        ctx.count_write();
    }
    Ok(Action::requeue(if keys.is_none() {
        Duration::from_secs(30)
    } else {
        Duration::from_mins(10)
    }))
}

/// Upserts the `channels` row; returns its id.
async fn mirror(channel: &Channel, ctx: &Ctx, keys: &[String]) -> Result<i64> {
    let spec = &channel.spec;
    let name = channel.name_any();
    let sealed = ctx
        .sealer
        .seal(keys.join("\n").as_bytes(), name.as_bytes())?;
    sqlx::query(
        "INSERT INTO channels (name, provider, api_key_enc, base_url, models, upstream_cost, priority, weight, status, max_retry) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE provider = VALUES(provider), api_key_enc = VALUES(api_key_enc), \
         base_url = VALUES(base_url), models = VALUES(models), upstream_cost = VALUES(upstream_cost), \
         priority = VALUES(priority), weight = VALUES(weight), status = VALUES(status), max_retry = VALUES(max_retry)",
    )
    .bind(&name)
    .bind(spec.provider.as_str())
    .bind(sealed)
    .bind(&spec.base_url)
    .bind(serde_json::to_string(&spec.models)?)
    .bind(serde_json::to_string(&spec.upstream_cost)?)
    .bind(spec.priority)
    .bind(spec.weight)
    .bind(i8::from(!spec.disabled))
    .bind(spec.max_retry)
    .execute(&ctx.db)
    .await?;
    Ok(sqlx::query_scalar("SELECT id FROM channels WHERE name = ?")
        .bind(&name)
        .fetch_one(&ctx.db)
        .await?)
}

async fn cleanup(channel: &Channel, ctx: &Ctx) -> Result<Action> {
    // The McpBridge registry and ai-proxy entry disappear with the channel from the sync's view;
    // the MySQL row is ours to delete.
    sqlx::query("DELETE FROM channels WHERE name = ?")
        .bind(channel.name_any())
        .execute(&ctx.db)
        .await
        .map_err(Error::from)?;
    Ok(Action::await_change())
}
