//! The caller's profile, members (staff and customers) and their roles, and customers — the
//! seed's `users`, `user_roles` and `customer_bindings` of the caller's tenant.

use std::collections::BTreeMap;

use axum::{
    Extension,
    extract::{Path, Query, State},
    http::StatusCode,
    response::Response,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ApiError, List, Page,
    backend::{Backend, Member, Who},
    body, cursor, json,
    matrix::{self, Access, MATRIX, Op},
    scope::Authorized,
};
use crate::sso::roles::Role;

/// The signed-in member and what the matrix gives them.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub user_id: i64,
    pub username: String,
    pub tenant: String,
    #[serde(rename = "tenantType")]
    pub tenant_type: String,
    pub roles: Vec<String>,
    /// Per function of the matrix, the caller's access for reading (`no`, `own`, `bound`,
    /// `readOnly`, `all`).
    #[schema(value_type = BTreeMap<String, String>)]
    pub access: BTreeMap<String, matrix::Access>,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "members",
    responses((status = 200, description = "The caller", body = Me), (status = 401, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn me(Extension(auth): Extension<Authorized>) -> Result<Response, ApiError> {
    let kind = auth.scope().kind();
    let access = MATRIX
        .iter()
        .map(|r| {
            let name = serde_json::to_value(r.function)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            (
                name,
                matrix::access(kind, &auth.caller.roles, r.function, Op::Read),
            )
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        None,
        &Me {
            user_id: auth.caller.user_id,
            username: auth.caller.username.clone(),
            tenant: auth.scope().name().to_owned(),
            tenant_type: match kind {
                aigw_crds::TenantType::Platform => "platform".into(),
                aigw_crds::TenantType::Reseller => "reseller".into(),
            },
            roles: auth
                .caller
                .roles
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect(),
            access,
        },
    ))
}

fn after_id(page: &Page) -> Result<i64, ApiError> {
    let after = page.after()?;
    if after.is_empty() {
        return Ok(0);
    }
    after
        .parse()
        .map_err(|_| ApiError::BadRequest("cursor is not one this API gave".into()))
}

fn page_of(mut items: Vec<Member>, limit: u32) -> List<Member> {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = more
        .then(|| items.last().map(|m| cursor(&m.id.to_string())))
        .flatten();
    List { items, next_cursor }
}

#[utoipa::path(get, path = "/api/v1/members", tag = "members", params(Page),
    responses((status = 200, description = "Every member of the tenant, by id", body = List<Member>),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn list_members(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit()?;
    let items = backend
        .db(auth.scope())
        .members(Who::Everyone, after_id(&page)?, limit + 1)
        .await?;
    Ok(json(StatusCode::OK, None, &page_of(items, limit)))
}

/// Enables or disables a member or customer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberPatch {
    /// `false` disables the account and ends its sessions at once.
    pub active: bool,
}

#[utoipa::path(patch, path = "/api/v1/members/{id}", tag = "members", request_body = MemberPatch,
    params(("id" = i64, Path, description = "The member's user id")),
    responses((status = 200, description = "The member", body = Member),
        (status = 403, body = super::doc::Problem), (status = 404, body = super::doc::Problem),
        (status = 409, description = "The last owner cannot be disabled", body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn patch_member(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(id): Path<i64>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let change: MemberPatch = body(&bytes)?;
    let db = backend.db(auth.scope());
    let member = db
        .member(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("member {id}")))?;
    let is_owner = member.roles.iter().any(|r| r == "owner");
    // An owner's account is the owners' to disable (role assignment); nobody disables the last.
    if is_owner
        && matrix::access(
            auth.scope().kind(),
            &auth.caller.roles,
            matrix::Function::RoleAssignment,
            Op::Write,
        ) == Access::No
    {
        return Err(ApiError::Forbidden(
            "only an owner may disable an owner".into(),
        ));
    }
    db.set_active(id, change.active).await?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            if change.active {
                "member.enabled"
            } else {
                "member.disabled"
            },
            &format!("user/{id}"),
        )
        .await;
    let member = db
        .member(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("member {id}")))?;
    Ok(json(StatusCode::OK, None, &member))
}

/// A member's roles.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Roles {
    /// Role names: owner, operator, sales, finance, tech, user (a reseller grants owner, sales,
    /// finance and user).
    #[schema(min_items = 1)]
    pub roles: Vec<String>,
}

#[utoipa::path(put, path = "/api/v1/members/{id}/roles", tag = "members", request_body = Roles,
    params(("id" = i64, Path, description = "The member's user id")),
    responses((status = 200, description = "The member with the new roles; their older tokens end", body = Member),
        (status = 403, body = super::doc::Problem), (status = 404, body = super::doc::Problem),
        (status = 409, description = "The last owner keeps the owner role", body = super::doc::Problem),
        (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn put_roles(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(id): Path<i64>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: Roles = body(&bytes)?;
    let mut roles: Vec<Role> = req
        .roles
        .iter()
        .map(|r| r.parse())
        .collect::<Result<_, String>>()
        .map_err(ApiError::Unprocessable)?;
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        return Err(ApiError::Unprocessable("at least one role".into()));
    }
    let db = backend.db(auth.scope());
    db.member(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("member {id}")))?;
    db.set_roles(id, &roles).await?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "member.roles",
            &format!("user/{id}"),
        )
        .await;
    let member = db
        .member(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("member {id}")))?;
    Ok(json(StatusCode::OK, None, &member))
}

#[utoipa::path(get, path = "/api/v1/customers", tag = "customers", params(Page),
    responses((status = 200, description = "Customers (members whose only role is user), by id: all of them, or a sales person's bound ones", body = List<Member>),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn list_customers(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit()?;
    let sales = (auth.access == Access::Bound).then_some(auth.caller.user_id);
    let items = backend
        .db(auth.scope())
        .members(Who::Customers { sales }, after_id(&page)?, limit + 1)
        .await?;
    Ok(json(StatusCode::OK, None, &page_of(items, limit)))
}

#[utoipa::path(patch, path = "/api/v1/customers/{id}", tag = "customers", request_body = MemberPatch,
    params(("id" = i64, Path, description = "The customer's user id")),
    responses((status = 200, description = "The customer", body = Member),
        (status = 403, body = super::doc::Problem), (status = 404, description = "No such customer, or not one bound to the calling sales person", body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn patch_customer(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(id): Path<i64>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let change: MemberPatch = body(&bytes)?;
    let db = backend.db(auth.scope());
    let customer = db
        .customer(id)
        .await?
        .filter(|c| auth.access != Access::Bound || c.sales_id == Some(auth.caller.user_id))
        .ok_or_else(|| ApiError::NotFound(format!("customer {id}")))?;
    db.set_active(customer.id, change.active).await?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            if change.active {
                "customer.enabled"
            } else {
                "customer.disabled"
            },
            &format!("user/{id}"),
        )
        .await;
    let customer = db
        .customer(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("customer {id}")))?;
    Ok(json(StatusCode::OK, None, &customer))
}

/// A reseller as a platform customer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reseller {
    /// The Tenant CR name.
    pub name: String,
    pub id: i64,
    pub display_name: String,
    pub suspended: bool,
    /// The platform sales person the reseller is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sales_id: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/resellers", tag = "customers", params(Page),
    responses((status = 200, description = "The platform's resellers, by name: all of them, or a platform sales person's bound ones (empty on a reseller's domain)", body = List<Reseller>),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn list_resellers(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit()? as usize;
    let after = page.after()?;
    let bindings = backend.db(auth.scope()).reseller_sales().await?;
    let mut items: Vec<Reseller> = if auth.scope().kind() != aigw_crds::TenantType::Platform {
        Vec::new()
    } else if auth.access == Access::Bound {
        auth.bound_resellers(&backend)
            .await?
            .into_iter()
            .map(|s| (s.name().to_owned(), s.record().clone()))
            .map(|(name, r)| reseller(name, &r, &bindings))
            .collect()
    } else {
        auth.platform_resellers(&backend)
            .into_iter()
            .map(|(name, r)| reseller(name, &r, &bindings))
            .collect()
    };
    items.retain(|r| r.name.as_str() > after.as_str());
    items.sort_by(|a, b| a.name.cmp(&b.name));
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = more
        .then(|| items.last().map(|r| cursor(&r.name)))
        .flatten();
    Ok(json(StatusCode::OK, None, &List { items, next_cursor }))
}

fn reseller(
    name: String,
    r: &crate::authz::index::TenantRecord,
    bindings: &std::collections::HashMap<i64, i64>,
) -> Reseller {
    Reseller {
        name,
        id: r.id,
        display_name: r.display_name.clone(),
        suspended: r.suspended,
        sales_id: bindings.get(&r.id).copied(),
    }
}

/// The platform sales person a reseller is bound to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SalesBinding {
    /// User id of a platform member holding the `sales` role (a sales person may name only
    /// themselves, for a reseller already theirs).
    pub sales_id: i64,
}

#[utoipa::path(put, path = "/api/v1/resellers/{name}/sales", tag = "customers", request_body = SalesBinding,
    params(("name" = String, Path, description = "The reseller's Tenant name")),
    responses((status = 200, description = "The reseller with its sales person", body = Reseller),
        (status = 403, description = "A sales person naming someone else", body = super::doc::Problem),
        (status = 404, description = "No such reseller of the platform, or (for a sales person) not one bound to them; always on a reseller's domain", body = super::doc::Problem),
        (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn bind_reseller(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: SalesBinding = body(&bytes)?;
    let db = backend.db(auth.scope());
    // A sales person reaches only the resellers already bound to them (binding is the owner's or
    // an operator's): another's, an unbound one and a missing one all answer 404.
    let found = if auth.access == Access::Bound {
        if req.sales_id != auth.caller.user_id {
            return Err(ApiError::Forbidden(
                "a sales person binds resellers to themselves only".into(),
            ));
        }
        auth.bound_resellers(&backend)
            .await?
            .into_iter()
            .find(|s| s.name() == name)
            .map(|s| (s.name().to_owned(), std::sync::Arc::new(s.record().clone())))
    } else {
        auth.platform_resellers(&backend)
            .into_iter()
            .find(|(n, _)| *n == name)
    };
    let (_, record) = found.ok_or_else(|| ApiError::NotFound(format!("reseller {name:?}")))?;
    db.bind_reseller(record.id, req.sales_id).await?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "reseller.bound",
            &format!("tenant/{name}"),
        )
        .await;
    let bindings = db.reseller_sales().await?;
    Ok(json(
        StatusCode::OK,
        None,
        &reseller(name, &record, &bindings),
    ))
}
