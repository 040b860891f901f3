//! Pricing controller: mirrors a tenant's price list into the MySQL `pricing` table. The list in
//! the platform tenant's namespace is the platform default (`tenant_id = 0`, as in the seed).
//!
//! One price list per tenant: the oldest Pricing of a namespace (creation time, then name) that is
//! not being deleted is in effect; any other gets `Ready=False`, reason `Conflict`, naming the one
//! in effect, and neither writes nor deletes a row (two lists used to delete each other's rows).
//! Rows are keyed by (tenant, model).

use std::{str::FromStr, sync::Arc, time::Duration};

use aigw_crds::{CommonStatus, FINALIZER, Pricing, PricingStatus, TenantType};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, finalizer},
};
use rust_decimal::Decimal;
use serde_json::json;

use crate::{
    apply::FIELD_MANAGER,
    conditions::{Cond, merge},
    context::Ctx,
    error::{Error, Result},
    token::tenant_of,
};

/// One validated price row. Pure data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub model: String,
    pub input: Decimal,
    pub output: Decimal,
    pub cached_input: Option<Decimal>,
}

/// Parses the price list into exact decimals. Pure.
pub fn validate(pricing: &Pricing) -> Result<Vec<Row>> {
    let parse = |field: &'static str, v: &str| {
        Decimal::from_str(v).map_err(|e| Error::Invalid {
            field,
            reason: format!("{v:?}: {e}"),
        })
    };
    // The bound the CRD enforces today; a list stored under an older, looser schema is refused
    // here rather than priced into amounts the cost columns cannot hold.
    let bounded = |field: &'static str, v: &str| {
        let d = parse(field, v)?;
        if d >= Decimal::from(10_000) {
            return Err(Error::Invalid {
                field,
                reason: format!("{v} is above 9999.999999 per million tokens"),
            });
        }
        Ok(d)
    };
    pricing
        .spec
        .models
        .iter()
        .map(|m| {
            Ok(Row {
                model: m.model.clone(),
                input: bounded("input", &m.input)?,
                output: bounded("output", &m.output)?,
                cached_input: m
                    .cached_input
                    .as_deref()
                    .map(|c| bounded("cachedInput", c))
                    .transpose()?,
            })
        })
        .collect()
}

pub async fn reconcile(pricing: Arc<Pricing>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = pricing
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let api: Api<Pricing> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pricing, |event| async {
        match event {
            finalizer::Event::Apply(p) => apply_pricing(&p, &ctx).await,
            finalizer::Event::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(crate::finalizer_error)
}

/// The MySQL tenant id prices of this namespace belong to: 0 for the platform tenant.
async fn pricing_tenant(ctx: &Ctx, ns: &str) -> Result<Option<i64>> {
    let Some(tenant) = tenant_of(ctx, ns).await? else {
        return Ok(None);
    };
    if tenant.spec.tenant_type == TenantType::Platform {
        return Ok(Some(0));
    }
    Ok(tenant.status.and_then(|s| s.tenant_id))
}

pub use aigw_crds::pricing::in_effect;

async fn apply_pricing(pricing: &Pricing, ctx: &Ctx) -> Result<Action> {
    let ns = pricing
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let all = Api::<Pricing>::namespaced(ctx.client.clone(), &ns)
        .list(&kube::api::ListParams::default().labels(&ctx.config.selector()))
        .await?
        .items;
    let effective = in_effect(&all, false);
    let (cond, requeue) = match (pricing_tenant(ctx, &ns).await?, validate(pricing)) {
        _ if effective.as_deref() != Some(pricing.name_any().as_str()) => (
            Cond::new(
                "Ready",
                false,
                "Conflict",
                format!(
                    "namespace {ns} already has the Pricing {} in effect; a tenant has one price \
                     list (merge the models into it, or delete it first)",
                    effective.unwrap_or_default()
                ),
            ),
            Duration::from_secs(30),
        ),
        (None, _) => (
            Cond::new(
                "Ready",
                false,
                "TenantNotReady",
                format!("namespace {ns} belongs to no ready Tenant"),
            ),
            Duration::from_secs(10),
        ),
        (Some(_), Err(e)) => (
            Cond::new("Ready", false, "Invalid", e.to_string()),
            Duration::from_mins(10),
        ),
        (Some(tenant_id), Ok(_))
            if let Some(platform) = platform_currency(ctx, tenant_id).await?
                && platform != pricing.spec.currency =>
        {
            (
                Cond::new(
                    "Ready",
                    false,
                    "CurrencyMismatch",
                    format!(
                        "prices are in {}, the platform's in {platform}: a tenant's prices must be \
                         in the platform's currency (nothing was applied)",
                        pricing.spec.currency
                    ),
                ),
                Duration::from_mins(1),
            )
        }
        (Some(tenant_id), Ok(rows)) => {
            mirror(ctx, tenant_id, &pricing.spec.currency, &rows).await?;
            (
                Cond::new(
                    "Ready",
                    true,
                    "Reconciled",
                    format!("{} model price(s) in effect", rows.len()),
                ),
                Duration::from_mins(10),
            )
        }
    };
    let old = pricing.status.clone().unwrap_or_default();
    let status = PricingStatus {
        common: CommonStatus {
            observed_generation: pricing.metadata.generation,
            conditions: merge(&old.common.conditions, &[cond], pricing.metadata.generation),
        },
    };
    if crate::differs_ignoring_time(&old.common, &status.common) {
        Api::<Pricing>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &pricing.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({"apiVersion": Pricing::api_version(&()), "kind": Pricing::kind(&()), "status": status})),
            )
            .await?;
        ctx.count_write();
    }
    Ok(Action::requeue(requeue))
}

/// The platform list's currency, for a reseller's list (`None` for the platform's own, or when the
/// platform has no prices yet).
async fn platform_currency(ctx: &Ctx, tenant_id: i64) -> Result<Option<String>> {
    if tenant_id == 0 {
        return Ok(None);
    }
    Ok(
        sqlx::query_scalar("SELECT currency FROM pricing WHERE tenant_id = 0 LIMIT 1")
            .fetch_optional(&ctx.db)
            .await?,
    )
}

async fn mirror(ctx: &Ctx, tenant_id: i64, currency: &str, rows: &[Row]) -> Result<()> {
    let mut tx = ctx.db.begin().await?;
    let existing: Vec<String> = sqlx::query_scalar("SELECT model FROM pricing WHERE tenant_id = ?")
        .bind(tenant_id)
        .fetch_all(&mut *tx)
        .await?;
    for gone in existing
        .iter()
        .filter(|m| !rows.iter().any(|r| &r.model == *m))
    {
        sqlx::query("DELETE FROM pricing WHERE tenant_id = ? AND model = ?")
            .bind(tenant_id)
            .bind(gone)
            .execute(&mut *tx)
            .await?;
    }
    for r in rows {
        sqlx::query(
            "INSERT INTO pricing (tenant_id, model, input_price, output_price, cached_input_price, currency) \
             VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE input_price = VALUES(input_price), \
             output_price = VALUES(output_price), cached_input_price = VALUES(cached_input_price), \
             currency = VALUES(currency)",
        )
        .bind(tenant_id)
        .bind(&r.model)
        .bind(r.input)
        .bind(r.output)
        .bind(r.cached_input)
        .bind(currency)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn cleanup(pricing: &Pricing, ctx: &Ctx) -> Result<Action> {
    let ns = pricing
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let all = Api::<Pricing>::namespaced(ctx.client.clone(), &ns)
        .list(&kube::api::ListParams::default().labels(&ctx.config.selector()))
        .await?
        .items;
    // Only the list in effect owns the tenant's rows; a conflicting one never wrote any. When
    // another list remains, it takes over the rows (its reconcile replaces and prunes them), so
    // nothing is deleted here — deleting could remove what the successor already wrote.
    // A successor that cannot write rows (invalid, another currency) does not take over: the
    // deleted list's rows go, and the tenant falls back to platform prices.
    let mut usable = false;
    if let Some(next) = in_effect(&all, false).and_then(|n| all.iter().find(|p| p.name_any() == n))
    {
        let currency_ok = match pricing_tenant(ctx, &ns).await? {
            Some(tenant_id) => platform_currency(ctx, tenant_id)
                .await?
                .is_none_or(|c| c == next.spec.currency),
            None => false,
        };
        usable = currency_ok && validate(next).is_ok();
    }
    if !usable
        && in_effect(&all, true).as_deref() == Some(pricing.name_any().as_str())
        && let Some(tenant_id) = pricing_tenant(ctx, &ns).await?
    {
        sqlx::query("DELETE FROM pricing WHERE tenant_id = ?")
            .bind(tenant_id)
            .execute(&ctx.db)
            .await?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_exactly() {
        let p: Pricing = serde_json::from_value(json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Pricing",
            "metadata": {"name": "default", "namespace": "aigw-acme"},
            "spec": {"currency": "USD", "models": [{"model": "gpt-4o", "input": "2.50", "output": "10.000001"}]}}))
        .unwrap();
        let rows = validate(&p).unwrap();
        assert_eq!(rows[0].output, Decimal::new(10_000_001, 6));
        assert_eq!(rows[0].input.to_string(), "2.50");
        assert_eq!(rows[0].cached_input, None);
    }
}
