//! Types shared by several resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A non-negative decimal money amount with at most 6 decimals, as a string (`"2.50"`).
///
/// Strings, not numbers: a JSON number goes through `f64` in most clients and loses exactness.
///
/// At most 4 integer digits (≤ 9999.999999 per million tokens): every accepted price fits the
/// MySQL `pricing` columns (`DECIMAL(12,6)`), and the cost of one request — even 100 million tokens
/// at the highest price — fits the `Decimal(12,6)` cost columns, so no accepted price can make a
/// request unbillable (a larger price used to fail the mirror forever, or dead-letter the usage).
pub const DECIMAL_RULE: &str = r"self.matches('^[0-9]{1,4}(\\.[0-9]{1,6})?$')";
/// The message of [`DECIMAL_RULE`].
pub const DECIMAL_MESSAGE: &str = "must be a non-negative decimal string of at most 4 integer digits and 6 decimals \
     (at most 9999.999999 per million tokens), e.g. \"2.50\"";

/// A reference to one key of a Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret. Channels are cluster-scoped, so the namespace is explicit.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Key within the Secret's data. Several keys may be given as one value separated by commas or
    /// newlines; each becomes one upstream key, used in rotation.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Per-model prices per million tokens, as decimal strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPrice {
    /// Model name as clients send it, e.g. `gpt-4o`.
    #[schemars(length(min = 1, max = 128))]
    pub model: String,
    /// Price per million input (prompt) tokens.
    #[schemars(length(max = 24))]
    #[x_kube(validation = Rule::new(DECIMAL_RULE).message(DECIMAL_MESSAGE))]
    pub input: String,
    /// Price per million output (completion, including reasoning) tokens.
    #[schemars(length(max = 24))]
    #[x_kube(validation = Rule::new(DECIMAL_RULE).message(DECIMAL_MESSAGE))]
    pub output: String,
    /// Price per million cached input tokens; the input price applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 24))]
    #[x_kube(validation = Rule::new(DECIMAL_RULE).message(DECIMAL_MESSAGE))]
    pub cached_input: Option<String>,
}

/// Standard status fields every resource carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions; `Ready` summarises them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
