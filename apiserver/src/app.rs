//! The REST listener: the identity provider (`/oauth/*`, [`crate::sso::web`]) and the reseller
//! API (`/api/v1/*`, [`crate::api`]). Errors of `/api` are RFC 9457 problem details.

use axum::{Router, http::StatusCode, response::Response};

use crate::{api::backend::Backend, sso::web::problem};

/// The REST router. Without signing keys (`None`) there is no sign-in, so no token to call the
/// API with: `/oauth/*` and `/api/*` answer 503.
pub fn router(api: Option<Backend>) -> Router {
    match api {
        Some(backend) => crate::sso::web::router(backend.sso().clone())
            .merge(crate::api::router(backend))
            .fallback(not_found),
        None => Router::new()
            .route("/oauth/{*rest}", axum::routing::any(no_sso))
            .route("/api/{*rest}", axum::routing::any(no_sso))
            .fallback(not_found),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("no route for {}", uri.path()),
    )
}

async fn no_sso() -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in not configured",
        "this apiserver has no OIDC signing keys (--oidc-keys-dir)",
    )
}
