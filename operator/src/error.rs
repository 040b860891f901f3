//! One error type for every controller, with a stable `category()` used as a metric label.

/// What can go wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kube api: {0}")]
    Kube(#[from] kube::Error),
    #[error("mysql: {0}")]
    MySql(#[from] sqlx::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("gave up after {attempts} conflicting writes to {object}")]
    Conflict { object: String, attempts: u32 },
    #[error("object has no {0}")]
    Missing(&'static str),
    #[error("crypto: {0}")]
    Crypto(String),
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::MySql(_) => "mysql",
            Self::Json(_) => "json",
            Self::Kafka(_) => "kafka",
            Self::Invalid { .. } => "invalid",
            Self::Conflict { .. } => "conflict",
            Self::Missing(_) => "missing",
            Self::Crypto(_) => "crypto",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
