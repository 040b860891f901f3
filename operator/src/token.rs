//! Token controller: makes sure a token has a key (generating one into an owned Secret when the
//! spec has no `keyHash`), computes its phase, mirrors it into MySQL (hash only) and reports status.
//! Tokens never appear in any Higress object: authz reads them from the Token CRs.

use std::{sync::Arc, time::Duration};

use aigw_crds::{
    CommonStatus, FINALIZER, MANAGED_BY, Tenant, Token, TokenPhase, TokenStatus, labels,
};
use k8s_openapi::{ByteString, api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{controller::Action, finalizer},
};
use serde_json::json;

use crate::{
    apply::FIELD_MANAGER,
    conditions::{Cond, merge},
    context::Ctx,
    error::{Error, Result},
    keys,
};

/// Key of the generated API key inside the token's Secret.
pub const SECRET_KEY: &str = "apiKey";

/// The Secret holding a generated key: `<token>-key`.
pub fn secret_name(token: &str) -> String {
    format!("{token}-key")
}

/// The phase of a token at `now`, given what billing has recorded as used (`status.usedQuota` and
/// the MySQL `tokens.used_quota` billing keeps; the larger counts, so a lagging or reset status can
/// never bring an exhausted token back). Pure.
pub fn phase(
    token: &Token,
    tenant_suspended: bool,
    mirrored_used: i64,
    now: Timestamp,
) -> Result<TokenPhase> {
    if token.spec.disabled || tenant_suspended {
        return Ok(TokenPhase::Disabled);
    }
    if let Some(exp) = &token.spec.expires_at {
        let at: Timestamp = exp.parse().map_err(|e| Error::Invalid {
            field: "spec.expiresAt",
            reason: format!("{exp:?} is not RFC 3339: {e}"),
        })?;
        if at <= now {
            return Ok(TokenPhase::Expired);
        }
    }
    let used = token
        .status
        .as_ref()
        .and_then(|s| s.used_quota)
        .unwrap_or(0)
        .max(mirrored_used);
    if token.spec.quota >= 0 && used >= token.spec.quota {
        return Ok(TokenPhase::Exhausted);
    }
    Ok(TokenPhase::Active)
}

pub async fn reconcile(token: Arc<Token>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = token
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let api: Api<Token> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, token, |event| async {
        match event {
            finalizer::Event::Apply(t) => apply_token(&t, &ctx).await,
            finalizer::Event::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(crate::finalizer_error)
}

/// The tenant that owns a namespace `aigw-<tenant>`, if it exists.
pub async fn tenant_of(ctx: &Ctx, namespace: &str) -> Result<Option<Tenant>> {
    let Some(name) = namespace.strip_prefix(aigw_crds::TENANT_NAMESPACE_PREFIX) else {
        return Ok(None);
    };
    // The Tenant controller's store, when running; a GET otherwise (and if the store does not
    // have it yet, which a GET settles).
    if let Some(Some(t)) = ctx.cached_tenant(name) {
        return Ok(Some((*t).clone()));
    }
    // Only a Tenant of this instance counts (the store holds only those; a GET does not filter).
    let tenant = Api::<Tenant>::all(ctx.client.clone()).get_opt(name).await?;
    Ok(tenant.filter(|t| {
        t.labels()
            .get(aigw_crds::labels::INSTANCE)
            .map(String::as_str)
            == ctx.config.instance.as_deref()
    }))
}

async fn apply_token(token: &Token, ctx: &Ctx) -> Result<Action> {
    let ns = token
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let name = token.name_any();
    let old = token.status.clone().unwrap_or_default();
    let tenant = tenant_of(ctx, &ns).await?;
    let tenant_id = tenant
        .as_ref()
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.tenant_id);
    let Some(tenant_id) = tenant_id else {
        let message = format!("namespace {ns} belongs to no ready Tenant");
        not_ready(ctx, token, &old, "TenantNotReady", message).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    let suspended = tenant.as_ref().is_some_and(|t| t.spec.suspended);

    let (hash, prefix, secret) = if let Some(hash) = &token.spec.key_hash {
        (
            hash.clone(),
            token.spec.key_prefix.clone().unwrap_or_default(),
            None,
        )
    } else {
        let key = ensure_key_secret(ctx, token, &ns).await?;
        (
            keys::hash_api_key(&key),
            keys::key_prefix(&key),
            Some(secret_name(&name)),
        )
    };
    let row = mirrored_row(ctx, token).await?;
    let phase = match phase(
        token,
        suspended,
        row.map_or(0, |(_, used)| used),
        Timestamp::now(),
    ) {
        Ok(p) => p,
        // Bad input is a condition, not an error retried forever.
        Err(e @ Error::Invalid { .. }) => {
            not_ready(ctx, token, &old, "Invalid", e.to_string()).await?;
            return Ok(Action::requeue(Duration::from_mins(10)));
        }
        Err(e) => return Err(e),
    };
    let mirrored = mirror(
        ctx,
        token,
        row.map(|(id, _)| id),
        tenant_id,
        &hash,
        &prefix,
        phase,
    )
    .await;
    let (cond, key_hash) = match &mirrored {
        Ok(_) => (
            Cond::new("Ready", true, "Reconciled", format!("phase {phase:?}")),
            Some(hash),
        ),
        // MySQL's unique key decides who holds a hash: the first token keeps it, untouched. This
        // one gets no `status.keyHash`, which is what authz indexes, so it is never admitted.
        Err(Error::MySql(sqlx::Error::Database(e))) if e.is_unique_violation() => (
            Cond::new(
                "Ready",
                false,
                "DuplicateKey",
                "another token already uses this key hash; create a new key",
            ),
            None,
        ),
        Err(_) => return mirrored.map(|_| Action::await_change()),
    };
    // `usedQuota` is billing's field: the operator neither writes nor owns it.
    let status = TokenStatus {
        common: common(token, &old, &[cond]),
        phase: Some(phase),
        key_hash,
        key_prefix: Some(prefix),
        secret_name: secret,
        token_id: mirrored.ok().or(old.token_id),
        used_quota: None,
    };
    write_status(ctx, token, &old, status).await?;
    Ok(next_wakeup(token, Timestamp::now()))
}

/// How far ahead a token's expiry is scheduled: twice the resync round, so a token expiring later
/// is seen by a resync (every hour, `paced`) before it is due, and scheduled then.
const EXPIRY_HORIZON: Duration =
    Duration::from_secs(2 * crate::paced::SLICES * crate::paced::RESYNC_TICK.as_secs());

/// When to look at a token again: just after it expires (to flip the phase), when that is within
/// [`EXPIRY_HORIZON`]. Otherwise only on a change or the token's hourly resync, which keeps
/// kube-runtime's scheduler free of an entry per token.
fn next_wakeup(token: &Token, now: Timestamp) -> Action {
    token
        .spec
        .expires_at
        .as_deref()
        .and_then(|e| e.parse::<Timestamp>().ok())
        .and_then(|at| now.until(at).ok())
        .and_then(|span| span.total(k8s_openapi::jiff::Unit::Second).ok())
        .filter(|s| *s > 0.0 && *s <= EXPIRY_HORIZON.as_secs_f64())
        .map_or_else(Action::await_change, |s| {
            Action::requeue(Duration::from_secs_f64(s + 1.0))
        })
}

/// Marks the token not Ready for `reason`, changing nothing else of its status.
async fn not_ready(
    ctx: &Ctx,
    token: &Token,
    old: &TokenStatus,
    reason: &'static str,
    message: String,
) -> Result<()> {
    let cond = Cond::new("Ready", false, reason, message);
    let status = TokenStatus {
        common: common(token, old, &[cond]),
        used_quota: None,
        ..old.clone()
    };
    write_status(ctx, token, old, status).await
}

fn common(token: &Token, old: &TokenStatus, conds: &[Cond]) -> CommonStatus {
    CommonStatus {
        observed_generation: token.metadata.generation,
        conditions: merge(&old.common.conditions, conds, token.metadata.generation),
    }
}

async fn write_status(ctx: &Ctx, token: &Token, old: &TokenStatus, new: TokenStatus) -> Result<()> {
    let unchanged = !crate::differs_ignoring_time(&old.common, &new.common)
        && old.phase == new.phase
        && old.key_hash == new.key_hash
        && old.key_prefix == new.key_prefix
        && old.secret_name == new.secret_name
        && old.token_id == new.token_id;
    if unchanged {
        return Ok(());
    }
    let ns = token
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    Api::<Token>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &token.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({"apiVersion": Token::api_version(&()), "kind": Token::kind(&()), "status": new})),
        )
        .await?;
    ctx.count_write();
    Ok(())
}

/// Returns the token's generated key, creating its Secret (owned by the Token) the first time.
async fn ensure_key_secret(ctx: &Ctx, token: &Token, ns: &str) -> Result<String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = secret_name(&token.name_any());
    if let Some(secret) = api.get_opt(&name).await?
        && let Some(key) = secret.data.as_ref().and_then(|d| d.get(SECRET_KEY))
    {
        return String::from_utf8(key.0.clone()).map_err(|_| Error::Invalid {
            field: "Secret apiKey",
            reason: format!("{ns}/{name} is not UTF-8"),
        });
    }
    let key = keys::generate_api_key();
    // The store's Token has no uid (`trim_token`): the owner reference takes it from the server.
    let owner = match token.controller_owner_ref(&()) {
        Some(owner) => owner,
        None => Api::<Token>::namespaced(ctx.client.clone(), ns)
            .get(&token.name_any())
            .await?
            .controller_owner_ref(&())
            .ok_or(Error::Missing("metadata.uid"))?,
    };
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "ownerReferences": [owner],
                     "labels": {labels::MANAGED_BY: MANAGED_BY}},
        "type": "Opaque",
    }))?;
    secret.data = Some([(SECRET_KEY.to_owned(), ByteString(key.clone().into_bytes()))].into());
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.count_write();
            Ok(key)
        }
        // Another reconcile created it between our read and write: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&name).await?;
            existing
                .data
                .and_then(|d| d.get(SECRET_KEY).cloned())
                .and_then(|b| String::from_utf8(b.0).ok())
                .ok_or(Error::Missing("apiKey in the token Secret"))
        }
        Err(e) => Err(e.into()),
    }
}

/// The token's mirror row, if any: its id and the `used_quota` billing keeps there.
async fn mirrored_row(ctx: &Ctx, token: &Token) -> Result<Option<(i64, i64)>> {
    Ok(
        sqlx::query_as("SELECT id, used_quota FROM tokens WHERE namespace = ? AND cr_name = ?")
            .bind(token.namespace().unwrap_or_default())
            .bind(token.name_any())
            .fetch_optional(&ctx.db)
            .await?,
    )
}

/// Writes the token's own `tokens` row (inserting it when `id` is `None`); returns its id.
///
/// Never an upsert: `tokens` has two unique keys (`key_hash` and the CR's namespace/name), and an
/// `INSERT … ON DUPLICATE KEY UPDATE` fires on either, so a Token copying another token's hash
/// would overwrite that token's row (tenant, quota, models). Here a hash held by another row is a
/// unique violation the caller reports as `DuplicateKey`, and the holder's row is never touched.
async fn mirror(
    ctx: &Ctx,
    token: &Token,
    id: Option<i64>,
    tenant_id: i64,
    hash: &str,
    prefix: &str,
    phase: TokenPhase,
) -> Result<i64> {
    let spec = &token.spec;
    let ns = token.namespace().unwrap_or_default();
    let user_id: i64 =
        sqlx::query_scalar("SELECT id FROM users WHERE tenant_id = ? AND username = ?")
            .bind(tenant_id)
            .bind(&spec.owner)
            .fetch_optional(&ctx.db)
            .await?
            .unwrap_or(0);
    let models = (!spec.models.is_empty())
        .then(|| serde_json::to_string(&spec.models))
        .transpose()?;
    let expires = match &spec.expires_at {
        Some(e) => Some(
            e.parse::<Timestamp>()
                .map_err(|err| Error::Invalid {
                    field: "spec.expiresAt",
                    reason: err.to_string(),
                })?
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string(),
        ),
        None => None,
    };
    // The columns both statements write, bound in this order.
    let common = |q: sqlx::query::Query<'static, sqlx::MySql, sqlx::mysql::MySqlArguments>| {
        q.bind(tenant_id)
            .bind(user_id)
            .bind(spec.display_name.clone())
            .bind(hash.to_owned())
            .bind(prefix.to_owned())
            .bind(models.clone())
            .bind(spec.quota)
            .bind(spec.rate_limit)
            .bind(expires.clone())
            .bind(i8::from(phase == TokenPhase::Active))
            .bind(spec.owner.clone())
    };
    let query = match id {
        Some(id) => common(sqlx::query(
            "UPDATE tokens SET tenant_id = ?, user_id = ?, name = ?, key_hash = ?, key_prefix = ?, \
             models = ?, quota = ?, rate_limit = ?, expires_at = ?, status = ?, owner = ? WHERE id = ?",
        ))
        .bind(id),
        None => common(sqlx::query(
            "INSERT INTO tokens (tenant_id, user_id, name, key_hash, key_prefix, models, quota, \
             rate_limit, expires_at, status, owner, namespace, cr_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(ns.clone())
        .bind(token.name_any()),
    };
    let done = query.execute(&ctx.db).await?;
    Ok(match id {
        Some(id) => id,
        None => i64::try_from(done.last_insert_id()).map_err(|_| Error::Invalid {
            field: "tokens.id",
            reason: "out of range".into(),
        })?,
    })
}

async fn cleanup(token: &Token, ctx: &Ctx) -> Result<Action> {
    // The key Secret goes with the Token (ownerReference); the MySQL row is ours.
    sqlx::query("DELETE FROM tokens WHERE namespace = ? AND cr_name = ?")
        .bind(token.namespace().unwrap_or_default())
        .bind(token.name_any())
        .execute(&ctx.db)
        .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(spec: serde_json::Value, used: Option<i64>) -> Token {
        let mut t: Token = serde_json::from_value(
            json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": "t", "namespace": "aigw-acme"}, "spec": spec}),
        )
        .unwrap();
        t.status = Some(TokenStatus {
            used_quota: used,
            ..TokenStatus::default()
        });
        t
    }

    #[test]
    fn only_tokens_expiring_within_the_horizon_are_scheduled() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let at = |expires: &str| {
            next_wakeup(
                &token(json!({"owner": "a", "expiresAt": expires}), None),
                now,
            )
        };
        assert_eq!(
            at("2026-06-01T00:30:00Z"),
            Action::requeue(Duration::from_secs(1801))
        );
        assert_eq!(
            at("2026-06-01T01:59:00Z"),
            Action::requeue(Duration::from_secs(7141))
        );
        assert_eq!(at("2026-06-01T03:00:00Z"), Action::await_change());
        assert_eq!(
            at("2026-05-01T00:00:00Z"),
            Action::await_change(),
            "already expired"
        );
        assert_eq!(
            next_wakeup(&token(json!({"owner": "a"}), None), now),
            Action::await_change()
        );
    }

    #[test]
    fn phases() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let active = token(
            json!({"owner": "a", "expiresAt": "2027-01-01T00:00:00Z", "quota": 10}),
            Some(3),
        );
        assert_eq!(phase(&active, false, 0, now).unwrap(), TokenPhase::Active);
        assert_eq!(
            phase(&active, true, 0, now).unwrap(),
            TokenPhase::Disabled,
            "tenant suspended"
        );
        let expired = token(
            json!({"owner": "a", "expiresAt": "2026-01-01T00:00:00Z"}),
            None,
        );
        assert_eq!(phase(&expired, false, 0, now).unwrap(), TokenPhase::Expired);
        let used_up = token(json!({"owner": "a", "quota": 10}), Some(10));
        assert_eq!(
            phase(&used_up, false, 0, now).unwrap(),
            TokenPhase::Exhausted
        );
        assert_eq!(
            phase(&active, false, 10, now).unwrap(),
            TokenPhase::Exhausted,
            "billing's MySQL total counts even when the status lags"
        );
        let unlimited = token(json!({"owner": "a", "quota": -1}), Some(1_000_000));
        assert_eq!(
            phase(&unlimited, false, 0, now).unwrap(),
            TokenPhase::Active
        );
        let disabled = token(json!({"owner": "a", "disabled": true}), None);
        assert_eq!(
            phase(&disabled, false, 0, now).unwrap(),
            TokenPhase::Disabled
        );
    }
}
