//! Who is calling and what they may reach, by construction.
//!
//! A [`TenantScope`] is the only way a handler reaches tenant data (MySQL rows, CRs, reports:
//! [`super::backend::Backend`] takes one for every access), and it can only be made here, by
//! [`authorize`], from the request's domain and an access token that domain's issuer signed for
//! that tenant. Its fields are private, so no handler can make one for another tenant. A
//! [`PlatformScope`], needed for cross-tenant reads and the platform-only functions, is made only
//! when that tenant is the platform.

use std::sync::Arc;

use aigw_crds::TenantType;
use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{
    ApiError,
    backend::Backend,
    matrix::{self, Access},
};
use crate::{
    authz::index::TenantRecord,
    sso::{AuthError, roles::Role},
};

/// One tenant, as the verified caller's domain and token name it.
#[derive(Debug, Clone)]
pub struct TenantScope {
    id: i64,
    name: String,
    kind: TenantType,
    record: Arc<TenantRecord>,
}

impl TenantScope {
    /// The MySQL id of the tenant.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The Tenant CR name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> TenantType {
        self.kind
    }

    /// The namespace of the tenant's Tokens and Pricing.
    pub fn namespace(&self) -> String {
        aigw_crds::tenant_namespace(&self.name)
    }

    pub fn record(&self) -> &TenantRecord {
        &self.record
    }
}

/// The platform tenant's scope: it may name other tenants.
#[derive(Debug, Clone)]
pub struct PlatformScope {
    own: TenantScope,
}

impl PlatformScope {
    /// The scope of the tenant `name`, for a platform caller; `None` when no such tenant is
    /// served.
    pub fn tenant(&self, backend: &Backend, name: &str) -> Option<TenantScope> {
        let record = backend.tenant_record(name)?;
        Some(TenantScope {
            id: record.id,
            name: name.to_owned(),
            kind: record.kind,
            record,
        })
    }

    pub fn own(&self) -> &TenantScope {
        &self.own
    }
}

/// The signed-in member.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub username: String,
    pub roles: Vec<Role>,
}

/// What [`authorize`] hands a handler: the scope, the caller and their access to the route's
/// function.
#[derive(Debug, Clone)]
pub struct Authorized {
    scope: TenantScope,
    platform: Option<PlatformScope>,
    pub caller: Caller,
    pub access: Access,
}

impl Authorized {
    pub fn scope(&self) -> &TenantScope {
        &self.scope
    }

    /// The platform scope, when the caller's tenant is the platform and their access is `All`.
    pub fn platform(&self) -> Option<&PlatformScope> {
        self.platform.as_ref()
    }

    /// The scope of `tenant` if given (platform callers with `All` access only; others get 403
    /// for a tenant other than their own), else the caller's own.
    pub fn tenant_param(
        &self,
        backend: &Backend,
        tenant: Option<&str>,
    ) -> Result<TenantScope, ApiError> {
        match tenant {
            None => Ok(self.scope.clone()),
            Some(t) if t == self.scope.name => Ok(self.scope.clone()),
            Some(t) => match &self.platform {
                Some(p) => p
                    .tenant(backend, t)
                    .ok_or_else(|| ApiError::NotFound(format!("tenant {t:?}"))),
                None => Err(ApiError::Forbidden(
                    "only platform staff may name another tenant".into(),
                )),
            },
        }
    }
}

impl Authorized {
    /// The resellers a platform sales person (access `Bound` on the platform tenant) has as
    /// customers (`reseller_bindings`), as scopes; empty for anyone else.
    pub async fn bound_resellers(&self, backend: &Backend) -> Result<Vec<TenantScope>, ApiError> {
        if self.scope.kind != TenantType::Platform || self.access != Access::Bound {
            return Ok(Vec::new());
        }
        let ids = backend
            .db(&self.scope)
            .resellers_of(self.caller.user_id)
            .await?;
        Ok(backend
            .served_tenants()
            .into_iter()
            .filter(|(_, r)| r.kind == TenantType::Reseller && ids.contains(&r.id))
            .map(|(name, record)| TenantScope {
                id: record.id,
                name,
                kind: record.kind,
                record,
            })
            .collect())
    }

    /// Every reseller of the platform, for a platform caller with `All` or `ReadOnly` access
    /// (its customer list); empty for anyone else.
    pub fn platform_resellers(&self, backend: &Backend) -> Vec<(String, Arc<TenantRecord>)> {
        if self.scope.kind != TenantType::Platform
            || !matches!(self.access, Access::All | Access::ReadOnly)
        {
            return Vec::new();
        }
        backend
            .served_tenants()
            .into_iter()
            .filter(|(_, r)| r.kind == TenantType::Reseller)
            .collect()
    }

    /// The reseller `name`, for a platform sales person about to take it; `None` for anyone
    /// else.
    pub fn any_reseller(
        &self,
        backend: &Backend,
        name: &str,
    ) -> Option<(String, Arc<TenantRecord>)> {
        if self.scope.kind != TenantType::Platform || self.access != Access::Bound {
            return None;
        }
        backend
            .tenant_record(name)
            .filter(|r| r.kind == TenantType::Reseller)
            .map(|r| (name.to_owned(), r))
    }

    /// The tenants whose usage `tenant` (the `tenant` query parameter) names for this caller:
    /// their own tenant when absent; for platform staff with `All` any tenant or `*` (every
    /// tenant: `None`); for a platform sales person their bound resellers (`*`: all of them).
    pub async fn usage_tenants(
        &self,
        backend: &Backend,
        tenant: Option<&str>,
    ) -> Result<Option<Vec<TenantScope>>, ApiError> {
        match tenant {
            None => Ok(Some(vec![self.scope.clone()])),
            Some(t) if t == self.scope.name => Ok(Some(vec![self.scope.clone()])),
            Some(t) if self.platform.is_some() => {
                if t == "*" {
                    Ok(None)
                } else {
                    self.tenant_param(backend, Some(t)).map(|s| Some(vec![s]))
                }
            }
            Some(t) => {
                let bound = self.bound_resellers(backend).await?;
                if bound.is_empty()
                    && !(self.scope.kind == TenantType::Platform && self.access == Access::Bound)
                {
                    return Err(ApiError::Forbidden(
                        "only platform staff may name another tenant".into(),
                    ));
                }
                if t == "*" {
                    return Ok(Some(bound));
                }
                bound
                    .into_iter()
                    .find(|s| s.name == t)
                    .map(|s| Some(vec![s]))
                    .ok_or_else(|| {
                        ApiError::Forbidden(format!("{t:?} is not a reseller bound to you"))
                    })
            }
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The middleware in front of every `/api/v1` route of [`matrix::ENDPOINTS`]: the tenant of the
/// `Host`, the bearer token verified for it, the member still active, and the route's function
/// allowed by the matrix. Routes not in the table are refused.
pub async fn authorize(State(backend): State<Backend>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| {
            req.uri()
                .authority()
                .map(axum::http::uri::Authority::as_str)
        })
        .unwrap_or("")
        .to_owned();
    let call = Call {
        method: req.method().as_str().to_owned(),
        path,
        host,
        token: bearer(req.headers()).map(str::to_owned),
    };
    match authorized(&backend, call).await {
        Ok(auth) => {
            req.extensions_mut().insert(auth);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// What authorisation reads of a request.
struct Call {
    method: String,
    path: String,
    host: String,
    token: Option<String>,
}

async fn authorized(backend: &Backend, call: Call) -> Result<Authorized, ApiError> {
    let Some(endpoint) = matrix::endpoint(&call.method, &call.path) else {
        let allowed: Vec<&str> = matrix::ENDPOINTS
            .iter()
            .filter(|e| e.path == call.path)
            .map(|e| e.method)
            .collect();
        if !allowed.is_empty() {
            return Err(ApiError::MethodNotAllowed(allowed.join(", ")));
        }
        return Err(ApiError::Forbidden(format!(
            "{} {} is not in the role matrix",
            call.method, call.path
        )));
    };
    let sso = backend.sso();
    let Some(site) = sso.site(&call.host) else {
        return Err(ApiError::NotFound("a tenant serving this domain".into()));
    };
    let Some(token) = call.token.as_deref() else {
        return Err(ApiError::Unauthorized(
            "a bearer access token of this domain is required".into(),
        ));
    };
    let claims = match sso.verify_access(&site, token).await {
        Ok(c) => c,
        Err(AuthError::Unavailable) => {
            return Err(ApiError::unavailable("the token store", "redis"));
        }
        Err(e) => return Err(ApiError::Unauthorized(e.to_string())),
    };
    let Some(user_id) = claims.user_id() else {
        return Err(ApiError::Unauthorized("the token names no user".into()));
    };
    let user = crate::sso::store::user_by_id(sso.db(), site.tenant.id, user_id)
        .await?
        .filter(|u| u.active)
        .ok_or_else(|| ApiError::Unauthorized("the account is disabled or gone".into()))?;
    let kind = site.kind();
    let access = match endpoint.function {
        None => Access::Own,
        Some(f) => matrix::access(kind, &claims.roles, f, endpoint.op),
    };
    if access == Access::No {
        return Err(ApiError::Forbidden(format!(
            "your roles ({}) do not allow this",
            claims
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let scope = TenantScope {
        id: site.tenant.id,
        name: site.name.clone(),
        kind,
        record: site.tenant.clone(),
    };
    let platform = (kind == TenantType::Platform && access == Access::All)
        .then(|| PlatformScope { own: scope.clone() });
    Ok(Authorized {
        scope,
        platform,
        caller: Caller {
            user_id,
            username: user.username,
            roles: claims.roles,
        },
        access,
    })
}
