//! Usage and bills (ClickHouse reports) and settlement (the billing crate's statements, records
//! and withdrawals). Whose usage a caller sees is their `Usage` access: their own (users), their
//! bound customers' (sales), the tenant's (finance, owner, operator), every tenant's (platform
//! staff, with `tenant=*` or a tenant's name). A reseller never sees the platform's upstream
//! cost; customers and sales see only what customers were charged.

use aigw_billing::reports::GroupBy;
use aigw_crds::TenantType;
use axum::{
    Extension,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    ApiError, List,
    backend::{Backend, UsageScope},
    body, json,
    matrix::Access,
    scope::Authorized,
};

/// Report parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day (UTC, inclusive); default the first of this month.
    pub from: Option<NaiveDate>,
    /// Last day (UTC, exclusive); default tomorrow.
    pub to: Option<NaiveDate>,
    /// `day` (default), `model`, `user` or `tenant`.
    #[param(inline, value_type = Option<String>, pattern = "^(day|model|user|tenant)$")]
    pub group_by: Option<String>,
    /// Platform staff: another tenant's name, or `*` for every tenant.
    #[param(max_length = 64)]
    pub tenant: Option<String>,
}

/// One line of a report. Money is a decimal string.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageLine {
    /// The day, model, user id or tenant id.
    pub key: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What customers were charged.
    #[schema(value_type = String)]
    pub cost: Decimal,
    /// What the tenant owes the platform (tenant-wide readers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub platform_cost: Option<Decimal>,
    /// What the platform paid upstream (platform staff only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub upstream_cost: Option<Decimal>,
}

fn period(
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let today = chrono::Utc::now().date_naive();
    let from = from.unwrap_or_else(|| today.with_day(1).unwrap_or(today));
    let to = to.unwrap_or_else(|| today.succ_opt().unwrap_or(today));
    if from >= to {
        return Err(ApiError::Unprocessable(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    if (to - from).num_days() > 3660 {
        return Err(ApiError::Unprocessable(
            "a report covers at most ten years".into(),
        ));
    }
    Ok((from, to))
}

#[utoipa::path(get, path = "/api/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, description = "Totals in the caller's scope", body = List<UsageLine>),
        (status = 403, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn usage(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let (from, to) = period(q.from, q.to)?;
    let by = match q.group_by.as_deref().unwrap_or("day") {
        "day" => GroupBy::Day,
        "model" => GroupBy::Model,
        "user" => GroupBy::User,
        "tenant" => GroupBy::Tenant,
        other => {
            return Err(ApiError::BadRequest(format!(
                "groupBy must be day, model, user or tenant, not {other:?}"
            )));
        }
    };
    let users = match auth.access {
        Access::Own => Some(vec![u64::try_from(auth.caller.user_id).unwrap_or(0)]),
        Access::Bound => Some(
            backend
                .db(auth.scope())
                .bound_customers(auth.caller.user_id)
                .await?
                .into_iter()
                .filter_map(|(id, _)| u64::try_from(id).ok())
                .collect(),
        ),
        Access::All | Access::ReadOnly | Access::No => None,
    };
    // The caller's own tenant, or — for platform staff and a platform sales person's bound
    // resellers — the tenants the `tenant` parameter names.
    let own = q.tenant.as_deref().is_none_or(|t| t == auth.scope().name());
    if !own && auth.access == Access::Bound && by == GroupBy::User {
        return Err(ApiError::Forbidden(
            "a reseller's usage by user is the reseller's and the platform staff's".into(),
        ));
    }
    let users = if own { users } else { None };
    let lines = match auth.usage_tenants(&backend, q.tenant.as_deref()).await? {
        None => {
            let p = auth.platform().ok_or_else(|| {
                ApiError::Forbidden("only platform staff may read every tenant's usage".into())
            })?;
            backend
                .usage(UsageScope::AllTenants(p), users, from, to, by)
                .await?
        }
        Some(scopes) => {
            let mut merged: std::collections::BTreeMap<String, aigw_billing::reports::Line> =
                std::collections::BTreeMap::new();
            for s in &scopes {
                for l in backend
                    .usage(UsageScope::Tenant(s), users.clone(), from, to, by)
                    .await?
                {
                    match merged.get_mut(&l.key) {
                        Some(m) => {
                            m.requests += l.requests;
                            m.prompt_tokens += l.prompt_tokens;
                            m.completion_tokens += l.completion_tokens;
                            m.cost += l.cost;
                            m.platform_cost += l.platform_cost;
                            m.upstream_cost += l.upstream_cost;
                        }
                        None => {
                            merged.insert(l.key.clone(), l);
                        }
                    }
                }
            }
            merged.into_values().collect()
        }
    };
    // What a tenant owes the platform: tenant-wide readers, and a platform sales person for the
    // resellers bound to them (their customers' spend with the platform).
    let tenant_wide = auth.access == Access::All || (!own && auth.access == Access::Bound);
    let platform = auth.access == Access::All && auth.scope().kind() == TenantType::Platform;
    let items: Vec<UsageLine> = lines
        .into_iter()
        .map(|l| UsageLine {
            key: l.key,
            requests: l.requests,
            prompt_tokens: l.prompt_tokens,
            completion_tokens: l.completion_tokens,
            cost: l.cost,
            platform_cost: tenant_wide.then_some(l.platform_cost),
            upstream_cost: platform.then_some(l.upstream_cost),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        None,
        &List {
            items,
            next_cursor: None,
        },
    ))
}

/// Which tenant a settlement call is about (platform staff may name one).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct TenantQuery {
    /// Platform staff: the reseller's name (default: the caller's tenant).
    #[param(max_length = 64)]
    pub tenant: Option<String>,
}

/// A settlement or withdrawal record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: i64,
    /// `settlement` or `withdrawal`.
    pub kind: String,
    pub period_start: Option<NaiveDate>,
    pub period_end: Option<NaiveDate>,
    #[schema(value_type = String)]
    pub revenue: Decimal,
    #[schema(value_type = String)]
    pub platform_cost: Decimal,
    #[schema(value_type = String)]
    pub margin: Decimal,
    #[schema(value_type = String)]
    pub amount: Decimal,
    pub created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl From<aigw_billing::settlement::Record> for Record {
    fn from(r: aigw_billing::settlement::Record) -> Self {
        Self {
            id: r.id,
            kind: r.kind,
            period_start: r.period_start,
            period_end: r.period_end,
            revenue: r.revenue,
            platform_cost: r.platform_cost,
            margin: r.margin,
            amount: r.amount,
            created_by: r.created_by,
            note: r.note,
        }
    }
}

/// A tenant's records and what it may still withdraw.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    pub tenant: String,
    /// Settled margin less withdrawals.
    #[schema(value_type = String)]
    pub balance: Decimal,
    pub records: Vec<Record>,
}

#[utoipa::path(get, path = "/api/v1/settlements", tag = "settlement", params(TenantQuery),
    responses((status = 200, description = "Records, oldest first, and the balance", body = Ledger),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn settlements(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let scope = auth.tenant_param(&backend, q.tenant.as_deref())?;
    let (records, balance) = backend.settlements(&scope).await?;
    Ok(json(
        StatusCode::OK,
        None,
        &Ledger {
            tenant: scope.name().to_owned(),
            balance,
            records: records.into_iter().map(Record::from).collect(),
        },
    ))
}

/// A period, `from` inclusive, `to` exclusive (UTC days).
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Period {
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// Platform staff: the reseller's name.
    #[serde(default)]
    #[param(max_length = 64)]
    #[schema(max_length = 64)]
    pub tenant: Option<String>,
}

/// A statement: revenue, what is owed to the platform, and the margin.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    pub tenant: String,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub requests: u64,
    #[schema(value_type = String)]
    pub revenue: Decimal,
    #[schema(value_type = String)]
    pub platform_cost: Decimal,
    #[schema(value_type = String)]
    pub margin: Decimal,
}

#[utoipa::path(get, path = "/api/v1/settlements/statement", tag = "settlement", params(Period),
    responses((status = 200, description = "The live numbers of a period", body = Statement),
        (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn statement(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(p): Query<Period>,
) -> Result<Response, ApiError> {
    let scope = auth.tenant_param(&backend, p.tenant.as_deref())?;
    let (from, to) = period(Some(p.from), Some(p.to))?;
    let s = backend.statement(&scope, from, to).await?;
    Ok(json(
        StatusCode::OK,
        None,
        &Statement {
            tenant: scope.name().to_owned(),
            from: s.from,
            to: s.to,
            requests: s.requests,
            revenue: s.revenue,
            platform_cost: s.platform_cost,
            margin: s.margin,
        },
    ))
}

#[utoipa::path(post, path = "/api/v1/settlements", tag = "settlement", request_body = Period,
    responses((status = 201, description = "The period's record (the first one, if it was settled before)", body = Record),
        (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn settle(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p: Period = body(&bytes)?;
    let scope = auth.tenant_param(&backend, p.tenant.as_deref())?;
    let (from, to) = period(Some(p.from), Some(p.to))?;
    // Late usage (a reservation settled by the pending sweep, a late correction) still arrives
    // for a while after a period ends, and a settled period never changes: a day's grace.
    let today = chrono::Utc::now().date_naive();
    if to > today.pred_opt().unwrap_or(today) {
        return Err(ApiError::Unprocessable(
            "only a period that ended at least a day ago can be settled".into(),
        ));
    }
    let by = format!("{}@{}", auth.caller.username, auth.scope().name());
    let r = backend.settle(&scope, from, to, &by).await?;
    backend
        .audit(
            &scope,
            auth.caller.user_id,
            "settlement.recorded",
            &format!("settlement/{}", r.id),
        )
        .await;
    Ok(json(StatusCode::CREATED, None, &Record::from(r)))
}

/// Money paid out of the balance.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Withdrawal {
    /// A positive decimal string with at most 6 decimals, at most the balance.
    #[schema(value_type = String, pattern = r"^[0-9]{1,14}(\.[0-9]{1,6})?$")]
    pub amount: String,
    #[serde(default)]
    #[schema(max_length = 512)]
    pub note: String,
    /// Platform staff: the reseller's name.
    #[serde(default)]
    #[schema(max_length = 64)]
    pub tenant: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/withdrawals", tag = "settlement", request_body = Withdrawal,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key returns the first answer")),
    responses((status = 201, description = "The withdrawal", body = Record),
        (status = 422, description = "Not a positive amount, or more than the balance", body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn withdraw(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let w: Withdrawal = body(&bytes)?;
    let scope = auth.tenant_param(&backend, w.tenant.as_deref())?;
    let amount: Decimal = w
        .amount
        .parse()
        .map_err(|_| ApiError::Unprocessable(format!("amount {:?} is not a decimal", w.amount)))?;
    if w.note.chars().count() > 512 {
        return Err(ApiError::Unprocessable(
            "note has at most 512 characters".into(),
        ));
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fingerprint = crate::sso::digest(&format!(
        "{}\n{}",
        scope.id(),
        String::from_utf8_lossy(&bytes)
    ));
    if let Some(k) = &key
        && let Some((status, body)) = backend
            .idempotent(
                auth.scope(),
                auth.caller.user_id,
                "withdrawals",
                k,
                &fingerprint,
            )
            .await?
    {
        return Ok(json(
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            None,
            &body,
        ));
    }
    // The withdrawal and its idempotency record run to their end even if the client hangs up:
    // a cancelled handler would leave the key "in progress" with the money moved.
    let task = {
        let backend = backend.clone();
        let auth = auth.clone();
        let scope = scope.clone();
        let note = w.note.clone();
        tokio::spawn(async move {
            let by = format!("{}@{}", auth.caller.username, auth.scope().name());
            let result = backend.withdraw(&scope, amount, &by, &note).await;
            let answer = result.as_ref().ok().map(|r| Record::from(r.clone()));
            if let Some(k) = &key {
                let value = answer.as_ref().and_then(|a| serde_json::to_value(a).ok());
                backend
                    .remember(
                        auth.scope(),
                        auth.caller.user_id,
                        "withdrawals",
                        k,
                        &fingerprint,
                        value.as_ref().map(|v| (201, v)),
                    )
                    .await;
            }
            if let Ok(r) = &result {
                backend
                    .audit(
                        &scope,
                        auth.caller.user_id,
                        "withdrawal.recorded",
                        &format!("settlement/{}", r.id),
                    )
                    .await;
            }
            (result, answer)
        })
    };
    let (result, answer) = task
        .await
        .map_err(|e| ApiError::unavailable("the withdrawal", e))?;
    let r = result?;
    Ok(json(
        StatusCode::CREATED,
        None,
        &answer.unwrap_or_else(|| Record::from(r)),
    ))
}
