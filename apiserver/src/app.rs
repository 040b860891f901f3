//! The REST router. Every error is a JSON body `{"error": {"code": …, "message": …}}` with a 4xx/5xx
//! status, the shape resellers' scripts can rely on.

use axum::{Json, Router, http::StatusCode, response::IntoResponse};
use serde_json::json;

/// The REST API router (no routes yet: every path is a JSON 404).
pub fn router() -> Router {
    Router::new().fallback(not_found)
}

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"error": {"code": "not_found", "message": format!("no route for {}", uri.path())}}),
        ),
    )
}
