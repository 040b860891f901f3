//! API keys: the Token CRs of the caller's tenant namespace. A key is generated here, shown once
//! in the create answer, and only its hash goes into the CR (`spec.keyHash`). Who sees which key
//! is the matrix's `ApiKeys` access: all of the tenant's, the caller's own and their bound
//! customers' (sales), or only the caller's own (users). A key outside that is a 404, as a missing
//! one.

use std::collections::BTreeSet;

use aigw_crds::{Token, TokenSpec, labels};
use axum::{
    Extension,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use kube::{
    ResourceExt,
    api::{DeleteParams, PostParams, Preconditions},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    ApiError, List, Page, backend::Backend, body, check_if_match, cursor, error::kube_error,
    gitops_managed, json, matrix::Access, nullable, refuse_gitops, scope::Authorized,
};

/// An API key as the API shows it (never the key itself, except once in [`CreatedKey`]).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// The Token CR name.
    pub name: String,
    /// Username of the key's owner.
    pub owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The first characters of the key, for recognition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Models the key may call; empty allows all.
    pub models: Vec<String>,
    /// Total quota in tokens; -1 is unlimited.
    pub quota: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_quota: Option<i64>,
    /// Requests per minute; 0 is no limit.
    pub rate_limit: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub disabled: bool,
    /// Active, Expired, Exhausted or Disabled; absent until the operator has seen the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Whether a GitOps tool manages the key (then it is read-only here).
    pub gitops: bool,
    /// The `ETag` of the key (its `resourceVersion`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl Key {
    fn of(t: &Token) -> Self {
        let status = t.status.as_ref();
        Self {
            name: t.name_any(),
            owner: t.spec.owner.clone(),
            display_name: t.spec.display_name.clone(),
            key_prefix: t
                .spec
                .key_prefix
                .clone()
                .or_else(|| status.and_then(|s| s.key_prefix.clone())),
            models: t.spec.models.clone(),
            quota: t.spec.quota,
            used_quota: status.and_then(|s| s.used_quota),
            rate_limit: t.spec.rate_limit,
            expires_at: t.spec.expires_at.clone(),
            disabled: t.spec.disabled,
            phase: status.and_then(|s| s.phase).map(|p| format!("{p:?}")),
            gitops: gitops_managed(&t.metadata),
            etag: t.metadata.resource_version.clone(),
        }
    }
}

/// The answer to a create: the key, shown this once, and the stored key.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    /// The API key (`sk-…`). It is not stored anywhere and cannot be shown again.
    pub api_key: String,
    #[serde(flatten)]
    pub key: Key,
}

/// A new key.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewKey {
    /// The owner's username (default: the caller). Sales may name their bound customers, users
    /// only themselves.
    #[schema(min_length = 1, max_length = 64)]
    pub owner: Option<String>,
    #[schema(max_length = 64)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    /// Total quota in tokens; -1 (default) is unlimited.
    #[schema(minimum = -1)]
    pub quota: Option<i64>,
    /// Requests per minute (default 60); 0 is no limit.
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub rate_limit: Option<i32>,
    /// RFC 3339 expiry.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
}

/// Changes to a key; absent fields stay, `expiresAt: null` removes the expiry.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyPatch {
    #[schema(max_length = 64)]
    pub display_name: Option<String>,
    pub models: Option<Vec<String>>,
    #[schema(minimum = -1)]
    pub quota: Option<i64>,
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub rate_limit: Option<i32>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Option<String>>,
    pub disabled: Option<bool>,
}

/// Filters of the key list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct KeyFilter {
    /// Only keys of this owner.
    #[param(max_length = 64)]
    pub owner: Option<String>,
}

/// The owners (lowercase) whose keys the caller reaches; `None` is every owner (access `All`).
async fn reachable(
    backend: &Backend,
    auth: &Authorized,
) -> Result<Option<BTreeSet<String>>, ApiError> {
    match auth.access {
        Access::All | Access::ReadOnly => Ok(None),
        Access::Bound => {
            let mut owners: BTreeSet<String> = backend
                .db(auth.scope())
                .bound_customers(auth.caller.user_id)
                .await?
                .into_iter()
                .map(|(_, name)| name.to_ascii_lowercase())
                .collect();
            owners.insert(auth.caller.username.to_ascii_lowercase());
            Ok(Some(owners))
        }
        Access::Own | Access::No => Ok(Some(BTreeSet::from([auth
            .caller
            .username
            .to_ascii_lowercase()]))),
    }
}

fn may_see(owners: Option<&BTreeSet<String>>, owner: &str) -> bool {
    // Usernames compare case-insensitively, as MySQL's collation compares them (they are ASCII).
    owners.is_none_or(|o| o.contains(&owner.to_ascii_lowercase()))
}

/// The key `name` if the caller reaches it.
async fn visible(backend: &Backend, auth: &Authorized, name: &str) -> Result<Token, ApiError> {
    super::object_name("key", name)?;
    let what = format!("key {name:?}");
    let token = backend
        .tokens(auth.scope())
        .get_opt(name)
        .await
        .map_err(|e| kube_error(&what, e))?
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .ok_or_else(|| ApiError::NotFound(what.clone()))?;
    let owners = reachable(backend, auth).await?;
    if may_see(owners.as_ref(), &token.spec.owner) {
        Ok(token)
    } else {
        Err(ApiError::NotFound(what))
    }
}

#[utoipa::path(get, path = "/api/v1/keys", tag = "keys", params(Page, KeyFilter),
    responses((status = 200, description = "Keys the caller reaches, by name", body = List<Key>),
        (status = 401, body = super::doc::Problem), (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(page): Query<Page>,
    Query(filter): Query<KeyFilter>,
) -> Result<Response, ApiError> {
    let limit = page.limit()? as usize;
    let after = page.after()?;
    let owners = reachable(&backend, &auth).await?;
    let mut tokens: Vec<_> = backend
        .cached_tokens(auth.scope())
        .await?
        .into_iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .filter(|t| may_see(owners.as_ref(), &t.spec.owner))
        .filter(|t| {
            filter
                .owner
                .as_deref()
                .is_none_or(|o| t.spec.owner.eq_ignore_ascii_case(o))
        })
        .filter(|t| t.metadata.name.as_deref().unwrap_or("") > after.as_str())
        .collect();
    // Only the page is sorted: the first `limit + 1` by name are selected in linear time.
    let by_name = |a: &std::sync::Arc<Token>, b: &std::sync::Arc<Token>| {
        a.metadata.name.cmp(&b.metadata.name)
    };
    if tokens.len() > limit + 1 {
        tokens.select_nth_unstable_by(limit, by_name);
        tokens.truncate(limit + 1);
    }
    tokens.sort_unstable_by(by_name);
    let more = tokens.len() > limit;
    tokens.truncate(limit);
    let items: Vec<Key> = tokens.iter().map(|t| Key::of(t)).collect();
    let next_cursor = more
        .then(|| items.last().map(|k| cursor(&k.name)))
        .flatten();
    Ok(json(StatusCode::OK, None, &List { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/keys/{name}", tag = "keys",
    params(("name" = String, Path, description = "The key's name")),
    responses((status = 200, description = "The key", body = Key, headers(("ETag" = String))),
        (status = 404, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let t = visible(&backend, &auth, &name).await?;
    Ok(json(
        StatusCode::OK,
        t.metadata.resource_version.as_deref(),
        &Key::of(&t),
    ))
}

/// The CR name of a new key: from the idempotency key when there is one (a retry finds the key
/// it created), random otherwise.
fn new_name(auth: &Authorized, idempotency: Option<&str>) -> String {
    let seed = if let Some(k) = idempotency {
        crate::sso::digest(&format!(
            "{}/{}/{k}",
            auth.scope().id(),
            auth.caller.user_id
        ))
    } else {
        crate::sso::random_id().to_ascii_lowercase()
    };
    format!("key-{}", seed.get(..16).unwrap_or(&seed))
}

#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = NewKey,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retrying with the same key does not create a second API key")),
    responses((status = 201, description = "Created; `apiKey` is shown this once", body = CreatedKey),
        (status = 400, body = super::doc::Problem), (status = 403, body = super::doc::Problem),
        (status = 409, description = "An earlier request with this Idempotency-Key created the key", body = super::doc::Problem),
        (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: NewKey = body(&bytes)?;
    check_own_limits(
        &auth,
        req.quota.is_some() || req.rate_limit.is_some() || !req.models.is_empty(),
        false,
    )?;
    let owner = req
        .owner
        .clone()
        .unwrap_or_else(|| auth.caller.username.clone());
    let owners = reachable(&backend, &auth).await?;
    if !may_see(owners.as_ref(), &owner) {
        return Err(ApiError::Forbidden(format!(
            "you may not create keys for {owner:?} (only for yourself{})",
            if auth.access == Access::Bound {
                " and your customers"
            } else {
                ""
            }
        )));
    }
    let idempotency = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    if idempotency.is_some_and(|k| k.len() > 255) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key must have at most 255 characters".into(),
        ));
    }
    let name = new_name(&auth, idempotency);
    let api_key = aigw_crds::token::generate_api_key();
    let spec = TokenSpec {
        owner,
        display_name: req.display_name,
        key_hash: Some(aigw_crds::token::hash_api_key(&api_key)),
        key_prefix: Some(aigw_crds::token::key_prefix(&api_key)),
        models: req.models,
        quota: req.quota.unwrap_or(-1),
        rate_limit: req.rate_limit.unwrap_or(60),
        expires_at: req.expires_at,
        disabled: false,
    };
    let mut token = Token::new(&name, spec);
    token.metadata.namespace = Some(auth.scope().namespace());
    let mut labels = std::collections::BTreeMap::new();
    if let Some(i) = backend.instance() {
        labels.insert(labels::INSTANCE.to_owned(), i.to_owned());
    }
    token.metadata.labels = Some(labels);
    token.metadata.annotations = Some(std::collections::BTreeMap::from([(
        "aigateway.io/created-by".to_owned(),
        auth.caller.user_id.to_string(),
    )]));
    let created = match backend
        .tokens(auth.scope())
        .create(&PostParams::default(), &token)
        .await
    {
        Ok(t) => t,
        Err(kube::Error::Api(s)) if s.code == 409 && idempotency.is_some() => {
            return Err(ApiError::Conflict(format!(
                "an earlier request with this Idempotency-Key created the key {name:?}; its key was shown only in that answer (delete it and create another if it was lost)"
            )));
        }
        Err(e) => return Err(kube_error(&format!("key {name:?}"), e)),
    };
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "key.created",
            &format!("token/{name}"),
        )
        .await;
    Ok(json(
        StatusCode::CREATED,
        created.metadata.resource_version.as_deref(),
        &CreatedKey {
            api_key,
            key: Key::of(&created),
        },
    ))
}

#[utoipa::path(patch, path = "/api/v1/keys/{name}", tag = "keys", request_body = KeyPatch,
    params(("name" = String, Path, description = "The key's name"),
        ("If-Match" = Option<String>, Header, description = "The ETag read; a changed key answers 412")),
    responses((status = 200, description = "The changed key", body = Key),
        (status = 404, body = super::doc::Problem), (status = 409, description = "Managed by GitOps", body = super::doc::Problem),
        (status = 412, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn patch(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let change: KeyPatch = body(&bytes)?;
    check_own_limits(
        &auth,
        change.quota.is_some() || change.rate_limit.is_some() || change.models.is_some(),
        change.disabled == Some(false),
    )?;
    let mut t = visible(&backend, &auth, &name).await?;
    check_if_match(&headers, t.metadata.resource_version.as_deref())?;
    refuse_gitops(&t.metadata, &format!("key {name:?}"))?;
    if auth.access == Access::Own
        && let (Some(new), Some(old)) = (&change.expires_at, &t.spec.expires_at)
        && !new.as_deref().is_some_and(|n| earlier(n, old))
    {
        return Err(ApiError::Forbidden(
            "you may bring your key's expiry forward, not remove or extend it".into(),
        ));
    }
    if let Some(v) = change.display_name {
        t.spec.display_name = Some(v);
    }
    if let Some(v) = change.models {
        t.spec.models = v;
    }
    if let Some(v) = change.quota {
        t.spec.quota = v;
    }
    if let Some(v) = change.rate_limit {
        t.spec.rate_limit = v;
    }
    if let Some(v) = change.expires_at {
        t.spec.expires_at = v;
    }
    if let Some(v) = change.disabled {
        t.spec.disabled = v;
    }
    t.status = None;
    let saved = backend
        .tokens(auth.scope())
        .replace(&name, &PostParams::default(), &t)
        .await
        .map_err(|e| kube_error(&format!("key {name:?}"), e))?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "key.updated",
            &format!("token/{name}"),
        )
        .await;
    Ok(json(
        StatusCode::OK,
        saved.metadata.resource_version.as_deref(),
        &Key::of(&saved),
    ))
}

#[utoipa::path(delete, path = "/api/v1/keys/{name}", tag = "keys",
    params(("name" = String, Path, description = "The key's name"),
        ("If-Match" = Option<String>, Header, description = "The ETag read; a changed key answers 412")),
    responses((status = 204, description = "Deleted; the key stops working within a second"),
        (status = 404, body = super::doc::Problem), (status = 409, description = "Managed by GitOps", body = super::doc::Problem),
        (status = 412, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = visible(&backend, &auth, &name).await?;
    check_if_match(&headers, t.metadata.resource_version.as_deref())?;
    refuse_gitops(&t.metadata, &format!("key {name:?}"))?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: t.metadata.uid.clone(),
            resource_version: super::if_match(&headers),
        }),
        ..DeleteParams::default()
    };
    backend
        .tokens(auth.scope())
        .delete(&name, &dp)
        .await
        .map_err(|e| kube_error(&format!("key {name:?}"), e))?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "key.deleted",
            &format!("token/{name}"),
        )
        .await;
    Ok(axum::response::IntoResponse::into_response(
        StatusCode::NO_CONTENT,
    ))
}

/// Whether RFC 3339 time `a` is before `b` (unparseable: no).
fn earlier(a: &str, b: &str) -> bool {
    use k8s_openapi::jiff::Timestamp;
    match (a.parse::<Timestamp>(), b.parse::<Timestamp>()) {
        (Ok(a), Ok(b)) => a < b,
        _ => false,
    }
}

/// A user managing their own keys (access `Own`) names them, sets their expiry and disables or
/// deletes them; limits (quota, rate, models) and re-enabling are the staff's, so a customer
/// cannot lift a limit their reseller set.
fn check_own_limits(auth: &Authorized, limits: bool, enable: bool) -> Result<(), ApiError> {
    if auth.access != Access::Own {
        return Ok(());
    }
    if limits {
        return Err(ApiError::Forbidden(
            "quota, rateLimit and models of your keys are set by your provider's staff".into(),
        ));
    }
    if enable {
        return Err(ApiError::Forbidden(
            "a disabled key is enabled again by your provider's staff".into(),
        ));
    }
    Ok(())
}
