//! Errors of the REST API, each an RFC 9457 problem+json answer. Causes of 5xx answers are logged,
//! never shown.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::sso::web::problem;

/// A failed REST call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Missing, or another tenant's (indistinguishable on purpose).
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The path exists with other methods (listed in `Allow`).
    #[error("this path does not answer this method (it answers {0})")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    /// An object a GitOps tool manages: changed in its repository, not here.
    #[error("{0}")]
    GitOps(String),
    /// `If-Match` does not match the object's `ETag`.
    #[error("the object changed since you read it (ETag {0}); read it again and retry")]
    PreconditionFailed(String),
    #[error("{0}")]
    PreconditionRequired(String),
    /// A dependency failed; the cause is logged.
    #[error("{what} is unavailable")]
    Unavailable { what: &'static str, cause: String },
}

impl ApiError {
    pub fn unavailable(what: &'static str, cause: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            what,
            cause: cause.to_string(),
        }
    }

    fn status_title(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
            Self::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid value"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            Self::GitOps(_) => (StatusCode::CONFLICT, "Managed by GitOps"),
            Self::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "Precondition failed"),
            Self::PreconditionRequired(_) => {
                (StatusCode::PRECONDITION_REQUIRED, "Precondition required")
            }
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Unavailable { what, cause } = &self {
            tracing::error!(what, cause, "REST call failed on a dependency");
        }
        let (status, title) = self.status_title();
        let mut resp = problem(status, title, &self.to_string());
        if let Self::MethodNotAllowed(allow) = &self
            && let Ok(v) = axum::http::HeaderValue::from_str(allow)
        {
            resp.headers_mut().insert(axum::http::header::ALLOW, v);
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::unavailable("the database", e)
    }
}

/// Maps a Kubernetes error: the apiserver's refusal of an invalid object is the caller's 422 with
/// the apiserver's message (CEL and schema messages are written for people); a conflict is 412
/// (the `resourceVersion` sent did not match); a 404 is `what` not found.
pub fn kube_error(what: &str, e: kube::Error) -> ApiError {
    match e {
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => ApiError::Unprocessable(s.message),
        kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict" => {
            ApiError::PreconditionFailed("(stale)".into())
        }
        kube::Error::Api(s) if s.code == 409 => {
            ApiError::Conflict(format!("{what} already exists"))
        }
        kube::Error::Api(s) if s.code == 404 => ApiError::NotFound(what.to_owned()),
        other => ApiError::unavailable("the Kubernetes API", other),
    }
}
