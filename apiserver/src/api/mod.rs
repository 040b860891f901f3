//! The reseller REST API, `/api/v1/*` on every tenant domain (docs/architecture.md §5f).
//!
//! Every route is a row of [`matrix::ENDPOINTS`]; [`scope::authorize`] runs in front of all of
//! them and hands the handler an [`scope::Authorized`], whose [`scope::TenantScope`] is the only
//! key to the stores ([`backend::Backend`]). Errors are RFC 9457 problem+json ([`ApiError`]); the
//! OpenAPI 3.1 document is generated from the handlers ([`doc`]) and served at
//! `/api/v1/openapi.json`.

pub mod backend;
pub mod doc;
pub mod error;
pub mod keys;
pub mod matrix;
pub mod money;
pub mod people;
pub mod platform;
pub mod scope;
pub mod settings;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
pub use error::ApiError;
use serde::{Deserialize, de::DeserializeOwned};

use self::backend::Backend;

/// The largest request body the API reads (a price list of 1,024 models fits).
pub const MAX_BODY: usize = 256 * 1024;

/// The `/api/v1` routes, each behind [`scope::authorize`], and the OpenAPI document.
pub fn router(backend: Backend) -> Router {
    let authorized = Router::new()
        .route("/api/v1/me", get(people::me))
        .route(
            "/api/v1/tenant",
            get(settings::get_tenant).patch(settings::patch_tenant),
        )
        .route("/api/v1/members", get(people::list_members))
        .route(
            "/api/v1/members/{id}",
            axum::routing::patch(people::patch_member),
        )
        .route(
            "/api/v1/members/{id}/roles",
            axum::routing::put(people::put_roles),
        )
        .route("/api/v1/customers", get(people::list_customers))
        .route("/api/v1/resellers", get(people::list_resellers))
        .route(
            "/api/v1/resellers/{name}/sales",
            axum::routing::put(people::bind_reseller),
        )
        .route(
            "/api/v1/customers/{id}",
            axum::routing::patch(people::patch_customer),
        )
        .route("/api/v1/keys", get(keys::list).post(keys::create))
        .route(
            "/api/v1/keys/{name}",
            get(keys::get).patch(keys::patch).delete(keys::delete),
        )
        .route(
            "/api/v1/pricing",
            get(settings::get_pricing).put(settings::put_pricing),
        )
        .route("/api/v1/usage", get(money::usage))
        .route(
            "/api/v1/settlements",
            get(money::settlements).post(money::settle),
        )
        .route("/api/v1/settlements/statement", get(money::statement))
        .route("/api/v1/withdrawals", axum::routing::post(money::withdraw))
        .route(
            "/api/v1/channels",
            get(platform::list_channels).post(platform::create_channel),
        )
        .route(
            "/api/v1/channels/{name}",
            get(platform::get_channel)
                .patch(platform::patch_channel)
                .delete(platform::delete_channel),
        )
        .route("/api/v1/monitoring/channels", get(platform::monitoring))
        .route_layer(axum::middleware::from_fn_with_state(
            backend.clone(),
            scope::authorize,
        ));
    authorized
        .route("/api/v1/openapi.json", get(doc::serve))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(as_problem))
        .with_state(backend)
}

/// Answers axum's own refusals (a path parameter of the wrong type, a body over the limit, a
/// method not allowed) as problem+json too, so every 4xx of the API has one shape.
async fn as_problem(resp: Response) -> Response {
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let detail = String::from_utf8_lossy(&text);
    let mut out = crate::sso::web::problem(
        status,
        status.canonical_reason().unwrap_or("Error"),
        if detail.is_empty() {
            status.canonical_reason().unwrap_or("")
        } else {
            &detail
        },
    );
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// A JSON request body of type `T`; unknown fields and wrong types are a 400 that says which.
pub fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("a JSON body is required".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}

/// A JSON answer with `status` and, when given, an `ETag`.
pub fn json(status: StatusCode, etag: Option<&str>, value: &impl serde::Serialize) -> Response {
    let mut resp = (status, axum::Json(value)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&format!("\"{t}\"")).ok()) {
        resp.headers_mut().insert(header::ETAG, tag);
    }
    resp
}

/// The `If-Match` of a request, without quotes (`None` when absent or `*`).
pub fn if_match(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::IF_MATCH)?.to_str().ok()?.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    (v != "*").then(|| v.trim_matches('"').to_owned())
}

/// Checks `If-Match` against the object's `resourceVersion` (its `ETag`).
pub fn check_if_match(headers: &HeaderMap, current: Option<&str>) -> Result<(), ApiError> {
    match (if_match(headers), current) {
        (Some(want), Some(have)) if want != have => Err(ApiError::PreconditionFailed(want)),
        _ => Ok(()),
    }
}

/// Labels and annotations by which GitOps tools mark what they manage: Argo CD's tracking label
/// (its default) and tracking annotation, Flux's kustomize-controller labels.
pub const GITOPS_MARKERS: [&str; 3] = [
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/tracking-id",
    "kustomize.toolkit.fluxcd.io/name",
];

/// Refuses a write to an object a GitOps tool manages (409 that names the tool's marker).
pub fn refuse_gitops(meta: &kube::api::ObjectMeta, what: &str) -> Result<(), ApiError> {
    let marked = |key: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(key))
            .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(key)))
            .map(|v| format!("{key}={v}"))
    };
    match GITOPS_MARKERS.iter().find_map(|k| marked(k)) {
        Some(mark) => Err(ApiError::GitOps(format!(
            "{what} is managed by GitOps ({mark}); change it in its repository, not through the API"
        ))),
        None => Ok(()),
    }
}

/// Whether a GitOps tool manages the object (shown in answers as `managedBy`).
pub fn gitops_managed(meta: &kube::api::ObjectMeta) -> bool {
    refuse_gitops(meta, "").is_err()
}

/// Cursor pagination: `limit` (1–500, default 50) and the opaque `cursor` of a previous page.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    #[param(max_length = 512)]
    pub cursor: Option<String>,
}

impl Page {
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(50),
            Some(n @ 1..=500) => Ok(n),
            Some(n) => Err(ApiError::BadRequest(format!(
                "limit must be 1 to 500, got {n}"
            ))),
        }
    }

    /// The position the cursor names (what the previous page ended with), or `""`.
    pub fn after(&self) -> Result<String, ApiError> {
        match &self.cursor {
            None => Ok(String::new()),
            Some(c) => URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::BadRequest("cursor is not one this API gave".into())),
        }
    }
}

/// The cursor that continues after `last`.
pub fn cursor(last: &str) -> String {
    URL_SAFE_NO_PAD.encode(last)
}

/// A page of items and the cursor of the next page (absent on the last page).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    pub items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `Option<Option<T>>` from JSON: absent → `None`, `null` → `Some(None)` (clear the field).
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Checks an object name from a path: a DNS-1123 subdomain (what Kubernetes names are), so no
/// name can reach another URL of the kube-apiserver (`x/status`, `x?dryRun=All`). Anything else is
/// a 404, as a missing object.
pub fn object_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
        && name
            .as_bytes()
            .last()
            .is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("{what} {name:?}")))
    }
}
