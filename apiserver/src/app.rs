//! The REST listener: the identity provider (`/oauth/*`, [`crate::sso::web`]) and the reseller
//! API (`/api/v1/*`; today only invitations). Errors of `/api` are RFC 9457 problem details.

use axum::{Router, http::StatusCode, response::Response};

use crate::sso::{Sso, web::problem};

/// The REST router. Without signing keys (`None`) the identity provider answers 503.
pub fn router(sso: Option<Sso>) -> Router {
    match sso {
        Some(sso) => crate::sso::web::router(sso).fallback(not_found),
        None => Router::new()
            .route("/oauth/{*rest}", axum::routing::any(no_sso))
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
