//! The OpenAPI 3.1 document of `/api/v1`, generated from the handlers' annotations (`utoipa`),
//! served at `/api/v1/openapi.json` and committed as `apiserver/openapi.json` (a test fails when
//! the two differ).

use axum::{http::StatusCode, response::Response};
use serde::Serialize;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{keys, money, people, platform, settings};

/// RFC 9457 problem details: every error of the API.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: `title` and `status` say what happened.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What was wrong, for people.
    pub detail: String,
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from the tenant domain's sign-in (/oauth/token)",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AIGateway reseller API",
        version = "v1",
        description = "Served on every tenant domain. A caller reaches what the role matrix gives their roles in the tenant of the domain; another tenant's objects answer 404. Errors are RFC 9457 problem+json."
    ),
    paths(
        people::me,
        settings::get_tenant,
        settings::patch_tenant,
        people::list_members,
        people::patch_member,
        people::put_roles,
        people::list_customers,
        people::patch_customer,
        people::list_resellers,
        people::bind_reseller,
        keys::list,
        keys::create,
        keys::get,
        keys::patch,
        keys::delete,
        settings::get_pricing,
        settings::put_pricing,
        money::usage,
        money::settlements,
        money::statement,
        money::settle,
        money::withdraw,
        platform::list_channels,
        platform::create_channel,
        platform::get_channel,
        platform::patch_channel,
        platform::delete_channel,
        platform::monitoring,
    ),
    components(schemas(Problem)),
    modifiers(&Bearer),
    security(("bearer" = [])),
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document as pretty JSON (what is committed).
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> Response {
    let mut resp = axum::response::IntoResponse::into_response((StatusCode::OK, document()));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_openapi_matches_the_handlers() {
        let committed = include_str!("../../openapi.json");
        assert!(
            committed.trim_end() == document().trim_end(),
            "apiserver/openapi.json is out of date: run `make generate` and commit the result"
        );
    }

    #[test]
    fn document_router_and_matrix_agree() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| !m.starts_with("parameters"))
                    .map(move |m| (m.to_ascii_uppercase(), path.clone()))
            })
            .collect();
        documented.sort();
        let mut table: Vec<(String, String)> = super::super::matrix::ENDPOINTS
            .iter()
            .map(|e| (e.method.to_owned(), e.path.to_owned()))
            .collect();
        table.sort();
        assert_eq!(
            documented, table,
            "every matrix endpoint is documented, and only those"
        );
    }
}
