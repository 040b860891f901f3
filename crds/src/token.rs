//! `Token`: an API key of one end user, in the tenant's namespace.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::CommonStatus;

/// An API key for the OpenAI-compatible endpoint. Only its SHA-256 hash is ever stored in a CR.
///
/// Created by the REST API (which shows the plaintext once and sets `keyHash`) or with kubectl:
/// without `keyHash` the operator generates a key into a Secret it owns, named in the status.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "aigateway.io",
    version = "v1alpha1",
    kind = "Token",
    namespaced,
    shortname = "tk",
    category = "aigateway",
    status = "TokenStatus",
    doc = "An API key of one end user; only its SHA-256 hash is stored.",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "Prefix", type_ = "string", json_path = ".status.keyPrefix"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(oldSelf.spec.keyHash) || (has(self.spec.keyHash) && self.spec.keyHash == oldSelf.spec.keyHash)").message("keyHash is immutable once set: create a new Token to rotate a key")
)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// The user who owns the token (a username in the tenant).
    #[schemars(length(min = 1, max = 64))]
    pub owner: String,

    /// Display name, e.g. "production key".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub display_name: Option<String>,

    /// SHA-256 of the key, 64 lowercase hex characters. Immutable once set. Leave empty to have the
    /// operator generate a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("keyHash must be the SHA-256 of the key as 64 lowercase hex characters"))]
    pub key_hash: Option<String>,

    /// The first characters of the key (e.g. `sk-ab12`), for display. Set together with `keyHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 4, max = 12))]
    pub key_prefix: Option<String>,

    /// Models the token may call; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 256), inner(length(min = 1, max = 128)))]
    pub models: Vec<String>,

    /// Total quota in tokens; -1 is unlimited.
    #[serde(default = "unlimited")]
    #[schemars(range(min = -1))]
    pub quota: i64,

    /// Requests per minute; 0 means no per-token limit.
    #[serde(default = "default_rpm")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub rate_limit: i32,

    /// When the token stops working, RFC 3339 (e.g. `2027-01-01T00:00:00Z`), in the years 1970 to
    /// 2999 (what every part of the system can represent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    #[x_kube(validation = Rule::new("self >= timestamp('1970-01-01T00:00:00Z') && self < timestamp('3000-01-01T00:00:00Z')").message("expiresAt must be a time in the years 1970 to 2999"))]
    pub expires_at: Option<String>,

    /// A disabled token is refused at the gateway.
    #[serde(default)]
    pub disabled: bool,
}

fn unlimited() -> i64 {
    -1
}

fn default_rpm() -> i32 {
    60
}

/// Lifecycle phase of a Token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum TokenPhase {
    /// Usable.
    Active,
    /// Past `expiresAt`.
    Expired,
    /// Quota used up (set by billing).
    Exhausted,
    /// `disabled` is true or the tenant is suspended.
    Disabled,
}

/// Observed state of a Token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// `observedGeneration` and `conditions`.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Active, Expired, Exhausted or Disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TokenPhase>,
    /// SHA-256 of the key in effect (from the spec, or of the generated key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hash: Option<String>,
    /// Display prefix of the key in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The Secret holding a generated key (key `apiKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Numeric id of the token (the MySQL `tokens.id`), used in usage records and gateway headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<i64>,
    /// Quota used so far, synced from billing at a bounded rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_quota: Option<i64>,
}

/// Characters of a generated key after `sk-`: 48 alphanumerics ≈ 285 bits of entropy.
pub const KEY_LEN: usize = 48;
/// How much of a key is shown for recognition (`sk-` + 4).
pub const PREFIX_LEN: usize = 7;

/// A new API key: `sk-` followed by 48 random alphanumerics from the OS-seeded CSPRNG. The one
/// key generator: the operator's (a Token without `keyHash`) and the REST API's.
pub fn generate_api_key() -> String {
    use rand::{Rng, distr::Alphanumeric};
    let body: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(KEY_LEN)
        .map(char::from)
        .collect();
    format!("sk-{body}")
}

/// SHA-256 of a key as 64 lowercase hex characters: what `keyHash`, MySQL and authz hold. The one
/// hash rule, used by the operator, the REST API and authz.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(api_key_digest(key))
}

/// The same hash as its 32 bytes (what authz's index is keyed by).
pub fn api_key_digest(key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes()).into()
}

/// The display prefix of a key (`keyPrefix`).
pub fn key_prefix(key: &str) -> String {
    key.chars().take(PREFIX_LEN).collect()
}
