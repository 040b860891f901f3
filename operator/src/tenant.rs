//! Tenant controller: namespace `aigw-<name>`, the MySQL mirror (tenant row, domain claims), status,
//! and `tenant.events`.
//!
//! Domain ownership is decided by MySQL: `tenant_domains.domain` is the primary key, so the first
//! tenant to claim a domain keeps it and a later claimant gets a `DomainConflict` condition —
//! atomic across operator replicas, and nothing of the earlier tenant changes. A conflicted tenant is
//! re-checked every 30 s, so it gets the domain once the owner lets go.

use std::{sync::Arc, time::Duration};

use aigw_crds::{
    FINALIZER, MANAGED_BY, Tenant, TenantStatus, TenantType, labels, tenant_namespace,
};
use k8s_openapi::api::{core::v1::Namespace, rbac::v1::RoleBinding};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{controller::Action, finalizer},
};
use rdkafka::producer::FutureRecord;
use serde_json::json;

use crate::{
    apply::{FIELD_MANAGER, apply_over},
    conditions::{Cond, merge},
    context::Ctx,
    error::{Error, Result},
};

/// What `build` decides for one tenant; pure data.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub namespace: Namespace,
}

/// The children of a tenant. Pure: no client.
pub fn build(tenant: &Tenant) -> Result<Desired> {
    let name = tenant.name_any();
    let owner = tenant
        .controller_owner_ref(&())
        .ok_or(Error::Missing("metadata.uid"))?;
    let namespace: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": tenant_namespace(&name),
            "labels": {labels::MANAGED_BY: MANAGED_BY, labels::TENANT: name},
            "ownerReferences": [owner],
        }
    }))?;
    Ok(Desired { namespace })
}

pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Ctx>) -> Result<Action> {
    let api: Api<Tenant> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, tenant, |event| async {
        match event {
            finalizer::Event::Apply(t) => apply_tenant(&t, &ctx).await,
            finalizer::Event::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        finalizer::Error::UnnamedObject => Error::Missing("metadata.name"),
        finalizer::Error::InvalidFinalizer => Error::Invalid {
            field: "finalizer",
            reason: FINALIZER.into(),
        },
    })
}

/// Why a tenant's namespace may not be used, if it may not: a platform namespace, or one that
/// exists and is not controlled by this Tenant (created by someone else, or left by an earlier
/// Tenant of the same name that is still being deleted). Pure.
pub fn namespace_refusal(
    tenant: &Tenant,
    config: &crate::context::Config,
    live: Option<&Namespace>,
) -> Option<(&'static str, String)> {
    let ns = tenant_namespace(&tenant.name_any());
    if config.is_platform_namespace(&ns) {
        return Some((
            "ReservedName",
            format!("namespace {ns} belongs to the platform; choose another tenant name"),
        ));
    }
    let live = live?;
    let ours = live
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == tenant.metadata.uid.as_ref());
    (!ours).then(|| {
        (
            "NamespaceConflict",
            format!(
                "namespace {ns} already exists and was not created for this Tenant; AIGateway \
                 never adopts a namespace (delete it, or choose another tenant name)"
            ),
        )
    })
}

/// Name of the `RoleBinding` that gives the operator its rights in a tenant namespace.
pub const GRANT_BINDING: &str = "aigw-operator";

/// The operator's own `RoleBinding` in a tenant namespace: its `ServiceAccount` bound to the
/// tenant-namespace `ClusterRole` (key Secrets there), owned by the Tenant like the namespace.
///
/// # Errors
/// When the Tenant has no uid yet.
pub fn grant_binding(
    tenant: &Tenant,
    namespace: &str,
    grant: &crate::context::TenantGrant,
) -> Result<RoleBinding> {
    let owner = tenant
        .controller_owner_ref(&())
        .ok_or(Error::Missing("metadata.uid"))?;
    Ok(serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": GRANT_BINDING,
            "namespace": namespace,
            "labels": {labels::MANAGED_BY: MANAGED_BY, labels::TENANT: tenant.name_any()},
            "ownerReferences": [owner],
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": grant.cluster_role,
        },
        "subjects": [{
            "kind": "ServiceAccount",
            "name": grant.service_account,
            "namespace": grant.namespace,
        }],
    }))?)
}

async fn apply_tenant(tenant: &Tenant, ctx: &Ctx) -> Result<Action> {
    let name = tenant.name_any();
    let desired = build(tenant)?;
    let ns_api: Api<Namespace> = Api::all(ctx.client.clone());
    let ns_name = tenant_namespace(&name);
    let live = ns_api.get_opt(&ns_name).await?;
    if let Some((reason, message)) = namespace_refusal(tenant, &ctx.config, live.as_ref()) {
        refuse(ctx, tenant, reason, message).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    if live.is_none() {
        // Create, never apply: an apply would adopt a namespace someone created since our read.
        match ns_api
            .create(&PostParams::default(), &desired.namespace)
            .await
        {
            Ok(_) => ctx.count_write(),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        apply_over(ctx, &ns_api, &ns_name, &desired.namespace, live.as_ref()).await?;
    }
    if let Some(grant) = &ctx.config.tenant_grant {
        let binding = grant_binding(tenant, &ns_name, grant)?;
        let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &ns_name);
        crate::apply::apply(ctx, &api, GRANT_BINDING, &binding).await?;
    }

    let tenant_id = mirror_tenant(tenant, ctx).await?;
    let conflicts = claim_domains(ctx, tenant_id, &tenant.spec.domains).await?;

    let mut wanted = Vec::new();
    if conflicts.is_empty() {
        wanted.push(Cond::new(
            "Ready",
            true,
            "Reconciled",
            "namespace, MySQL row and domains are in place",
        ));
    } else {
        let list: Vec<String> = conflicts
            .iter()
            .map(|(d, why)| format!("{d} ({why})"))
            .collect();
        let message = format!("domains this tenant may not serve: {}", list.join(", "));
        wanted.push(Cond::new("Ready", false, "DomainConflict", message.clone()));
        wanted.push(Cond::new("DomainConflict", true, "DomainConflict", message));
    }
    let old = tenant.status.clone().unwrap_or_default();
    let status = TenantStatus {
        common: aigw_crds::CommonStatus {
            observed_generation: tenant.metadata.generation,
            conditions: merge(&old.common.conditions, &wanted, tenant.metadata.generation),
        },
        tenant_id: Some(tenant_id),
        namespace: Some(tenant_namespace(&name)),
        domains: tenant
            .spec
            .domains
            .iter()
            .filter(|d| !conflicts.iter().any(|(c, _)| c == *d))
            .cloned()
            .collect(),
    };
    if status_differs(&old, &status) {
        // Publish before recording the generation as observed: if Kafka fails, the reconcile
        // fails and the retry publishes again (at least once, keyed by tenant for ordering).
        if old.common.observed_generation != tenant.metadata.generation {
            publish(
                ctx,
                &name,
                "upserted",
                tenant_id,
                tenant.metadata.generation,
            )
            .await?;
        }
        write_status(ctx, &name, &status).await?;
    }
    Ok(if conflicts.is_empty() {
        Action::requeue(Duration::from_mins(10))
    } else {
        Action::requeue(Duration::from_secs(30))
    })
}

/// Marks the tenant not Ready for `reason` and stops it being served (no `tenantId`, no domains in
/// the status authz reads); touches nothing else (no namespace, no MySQL row, no domain claim).
async fn refuse(ctx: &Ctx, tenant: &Tenant, reason: &'static str, message: String) -> Result<()> {
    let old = tenant.status.clone().unwrap_or_default();
    let status = TenantStatus {
        common: aigw_crds::CommonStatus {
            observed_generation: tenant.metadata.generation,
            conditions: merge(
                &old.common.conditions,
                &[Cond::new("Ready", false, reason, message)],
                tenant.metadata.generation,
            ),
        },
        tenant_id: None,
        domains: Vec::new(),
        ..old.clone()
    };
    if status_differs(&old, &status) {
        write_status(ctx, &tenant.name_any(), &status).await?;
    }
    Ok(())
}

/// Applies a Tenant's status (field manager `aigw-operator`).
async fn write_status(ctx: &Ctx, name: &str, status: &TenantStatus) -> Result<()> {
    Api::<Tenant>::all(ctx.client.clone())
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": Tenant::api_version(&()),
                "kind": Tenant::kind(&()),
                "status": status,
            })),
        )
        .await?;
    ctx.count_write();
    Ok(())
}

/// Whether the status changed, ignoring condition transition times.
fn status_differs(old: &TenantStatus, new: &TenantStatus) -> bool {
    crate::differs_ignoring_time(&old.common, &new.common)
        || (&old.tenant_id, &old.namespace, &old.domains)
            != (&new.tenant_id, &new.namespace, &new.domains)
}

/// Upserts the `tenants` row; returns its id.
async fn mirror_tenant(tenant: &Tenant, ctx: &Ctx) -> Result<i64> {
    let spec = &tenant.spec;
    let parent_id: Option<i64> = match &spec.parent {
        Some(parent) => {
            sqlx::query_scalar("SELECT id FROM tenants WHERE slug = ?")
                .bind(parent)
                .fetch_optional(&ctx.db)
                .await?
        }
        None => None,
    };
    let kind = match spec.tenant_type {
        TenantType::Platform => "platform",
        TenantType::Reseller => "reseller",
    };
    let config = serde_json::to_string(&spec.config)?;
    let branding = spec.branding.clone().unwrap_or(aigw_crds::Branding {
        logo_url: None,
        theme_color: None,
    });
    sqlx::query(
        "INSERT INTO tenants (slug, name, type, parent_id, logo_url, theme_color, config, status) \
         VALUES (?, ?, ?, ?, ?, COALESCE(?, '#6c8cff'), ?, ?) \
         ON DUPLICATE KEY UPDATE name = VALUES(name), type = VALUES(type), parent_id = VALUES(parent_id), \
         logo_url = VALUES(logo_url), theme_color = VALUES(theme_color), config = VALUES(config), \
         status = VALUES(status)",
    )
    .bind(tenant.name_any())
    .bind(&spec.display_name)
    .bind(kind)
    .bind(parent_id)
    .bind(&branding.logo_url)
    .bind(&branding.theme_color)
    .bind(config)
    .bind(i8::from(!spec.suspended))
    .execute(&ctx.db)
    .await?;
    let id = sqlx::query_scalar("SELECT id FROM tenants WHERE slug = ?")
        .bind(tenant.name_any())
        .fetch_one(&ctx.db)
        .await?;
    Ok(id)
}

/// Why a domain may not be claimed at all, if it may not: it is itself a public suffix, or a
/// wildcard over one (`co.uk`, `*.co.uk`, `*.github.io` — the Public Suffix List, private section
/// included), or an IP literal. Pure.
pub fn domain_refusal(domain: &str) -> Option<&'static str> {
    let base = domain.strip_prefix("*.").unwrap_or(domain);
    if base.parse::<std::net::IpAddr>().is_ok()
        || base
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("an IP address is not a domain");
    }
    // `psl::domain_str` is the registrable part (`acme.co.uk` of `api.acme.co.uk`); a name with
    // none is a public suffix, and a wildcard over it would cover every customer of that suffix.
    if psl::domain_str(base).is_none() {
        return Some("a public suffix (or a wildcard over one) cannot belong to one tenant");
    }
    None
}

/// Whether two claims can match the same host: equal, or one is a wildcard `*.s` and the other a
/// name (or wildcard) below `s`. Authz matches `*.s` against every name below `s`, at any depth.
pub fn overlaps(a: &str, b: &str) -> bool {
    let covers = |w: &str, d: &str| {
        w.strip_prefix('*')
            .is_some_and(|dot_s| d.ends_with(dot_s) && d != w)
    };
    a == b || covers(a, b) || covers(b, a)
}

/// The claims that could overlap `domain`: itself, every wildcard above it, and for a wildcard
/// `*.s` every name below `s` (as a `LIKE` pattern).
fn overlap_candidates(domain: &str) -> (Vec<String>, Option<String>) {
    let base = domain.strip_prefix("*.").unwrap_or(domain);
    let mut exact = vec![domain.to_owned()];
    let mut rest = base;
    while let Some((_, up)) = rest.split_once('.') {
        exact.push(format!("*.{up}"));
        rest = up;
    }
    if domain != base {
        exact.push(base.to_owned());
    }
    let below =
        (domain != base).then(|| format!("%.{}", base.replace('%', "").replace('_', "\\_")));
    (exact, below)
}

/// Claims `domains` for the tenant and releases the ones it no longer lists; returns the domains it
/// may not have, each with why (a refused name, or the slug of the tenant holding an overlapping
/// claim). The first claimant keeps a domain and everything its claim covers; nothing of it changes.
async fn claim_domains(
    ctx: &Ctx,
    tenant_id: i64,
    domains: &[String],
) -> Result<Vec<(String, String)>> {
    let mut tx = ctx.db.begin().await?;
    // Serialises every claim (see migrations/mysql/0003): overlap checks read, then insert.
    sqlx::query("SELECT name FROM locks WHERE name = 'tenant_domains' FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let held: Vec<String> =
        sqlx::query_scalar("SELECT domain FROM tenant_domains WHERE tenant_id = ?")
            .bind(tenant_id)
            .fetch_all(&mut *tx)
            .await?;
    for gone in held.iter().filter(|d| !domains.contains(d)) {
        sqlx::query("DELETE FROM tenant_domains WHERE tenant_id = ? AND domain = ?")
            .bind(tenant_id)
            .bind(gone)
            .execute(&mut *tx)
            .await?;
    }
    let mut refused = Vec::new();
    for domain in domains {
        if let Some(why) = domain_refusal(domain) {
            refused.push((domain.clone(), why.to_owned()));
            continue;
        }
        let (exact, below) = overlap_candidates(domain);
        let list = vec!["?"; exact.len()].join(", ");
        // A domain this tenant already holds yields only to an older overlapping claim (claims
        // made before overlaps were checked); a new one yields to any.
        let sql = format!(
            "SELECT d.domain, t.slug FROM tenant_domains d JOIN tenants t ON t.id = d.tenant_id \
             WHERE d.tenant_id <> ? AND (d.domain IN ({list}){}) \
             AND d.created_at <= COALESCE((SELECT m.created_at FROM tenant_domains m \
                                           WHERE m.domain = ? AND m.tenant_id = ?), NOW())",
            if below.is_some() {
                " OR d.domain LIKE ?"
            } else {
                ""
            }
        );
        let mut q = sqlx::query_as::<_, (String, String)>(&sql).bind(tenant_id);
        for e in &exact {
            q = q.bind(e);
        }
        if let Some(b) = &below {
            q = q.bind(b);
        }
        q = q.bind(domain).bind(tenant_id);
        let owners: Vec<(String, String)> = q.fetch_all(&mut *tx).await?;
        if let Some((theirs, owner)) = owners.iter().find(|(d, _)| overlaps(d, domain)) {
            if held.contains(domain) {
                // Claimed before overlap checks existed: the older claim wins, this one goes.
                sqlx::query("DELETE FROM tenant_domains WHERE tenant_id = ? AND domain = ?")
                    .bind(tenant_id)
                    .bind(domain)
                    .execute(&mut *tx)
                    .await?;
            }
            let why = if theirs == domain {
                format!("served by tenant {owner}")
            } else {
                format!("overlaps {theirs} of tenant {owner}")
            };
            refused.push((domain.clone(), why));
        } else if !held.contains(domain) {
            sqlx::query("INSERT INTO tenant_domains (domain, tenant_id) VALUES (?, ?)")
                .bind(domain)
                .bind(tenant_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(refused)
}

async fn cleanup(tenant: &Tenant, ctx: &Ctx) -> Result<Action> {
    // The namespace goes with the Tenant through its ownerReference; only MySQL is ours to clean.
    let name = tenant.name_any();
    let id: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE slug = ?")
        .bind(&name)
        .fetch_optional(&ctx.db)
        .await?;
    if let Some(id) = id {
        let mut tx = ctx.db.begin().await?;
        for table in ["tenant_domains", "pricing", "tokens"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = ?"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM reseller_bindings WHERE reseller_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tenants WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        publish(ctx, &name, "deleted", id, tenant.metadata.generation).await?;
    }
    Ok(Action::await_change())
}

/// Sends a `tenant.events` record keyed by the tenant name.
async fn publish(
    ctx: &Ctx,
    tenant: &str,
    event: &str,
    id: i64,
    generation: Option<i64>,
) -> Result<()> {
    let Some(producer) = &ctx.events else {
        return Ok(());
    };
    let payload = aigw_common::events::TenantEvent {
        event: event.to_owned(),
        tenant: tenant.to_owned(),
        tenant_id: id,
        generation,
        actor: None,
        object: None,
    }
    .to_json();
    producer
        .send(
            FutureRecord::to(TENANT_EVENTS)
                .key(tenant)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| Error::Kafka(e.to_string()))?;
    Ok(())
}

/// Topic of tenant lifecycle events.
pub use aigw_common::events::TENANT_EVENTS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_owns_a_labelled_namespace() {
        let mut t: Tenant = serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "uid": "u-1"},
            "spec": {"type": "reseller", "displayName": "Acme"}
        }))
        .unwrap();
        let d = build(&t).unwrap();
        let ns = serde_json::to_value(&d.namespace).unwrap();
        assert_eq!(
            ns,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": "aigw-acme",
                "labels": {"app.kubernetes.io/managed-by": "aigateway", "aigateway.io/tenant": "acme"},
                "ownerReferences": [{"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant", "name": "acme",
                                     "uid": "u-1", "controller": true}]
            }})
        );
        t.metadata.uid = None;
        assert!(build(&t).is_err(), "no uid, no ownerReference");
    }
}
