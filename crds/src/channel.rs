//! `Channel`: one upstream LLM provider account (keys + endpoint) owned by the platform.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, ModelPrice, SecretKeyRef};

/// Upstream provider type: the Higress ai-proxy `provider.type` values.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Provider {
    Openai,
    Azure,
    Claude,
    Gemini,
    Vertex,
    Bedrock,
    Deepseek,
    Qwen,
    Moonshot,
    Zhipuai,
    Baichuan,
    Yi,
    Baidu,
    Hunyuan,
    Spark,
    Stepfun,
    Minimax,
    Ai360,
    Mistral,
    Groq,
    Grok,
    Openrouter,
    Fireworks,
    Cloudflare,
    Ollama,
    Generic,
}

impl Provider {
    /// The ai-proxy `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Azure => "azure",
            Self::Claude => "claude",
            Self::Gemini => "gemini",
            Self::Vertex => "vertex",
            Self::Bedrock => "bedrock",
            Self::Deepseek => "deepseek",
            Self::Qwen => "qwen",
            Self::Moonshot => "moonshot",
            Self::Zhipuai => "zhipuai",
            Self::Baichuan => "baichuan",
            Self::Yi => "yi",
            Self::Baidu => "baidu",
            Self::Hunyuan => "hunyuan",
            Self::Spark => "spark",
            Self::Stepfun => "stepfun",
            Self::Minimax => "minimax",
            Self::Ai360 => "ai360",
            Self::Mistral => "mistral",
            Self::Groq => "groq",
            Self::Grok => "grok",
            Self::Openrouter => "openrouter",
            Self::Fireworks => "fireworks",
            Self::Cloudflare => "cloudflare",
            Self::Ollama => "ollama",
            Self::Generic => "generic",
        }
    }
}

/// An upstream channel: a provider account with its keys, the models it serves, and how it ranks
/// against other channels serving the same model.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "aigateway.io",
    version = "v1alpha1",
    kind = "Channel",
    shortname = "ch",
    category = "aigateway",
    status = "ChannelStatus",
    doc = "An upstream LLM provider account (keys and endpoint) owned by the platform.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".spec.weight"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?$')").message("a channel name is a DNS label of at most 48 characters (it names a Higress registry)")
)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    /// The provider type (an ai-proxy provider), e.g. `openai`, `claude`, `gemini`.
    pub provider: Provider,

    /// Custom endpoint, e.g. `https://my-resource.openai.azure.com` or a self-hosted gateway. The
    /// provider's public endpoint when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[a-zA-Z0-9.-]+(:[0-9]{1,5})?(/.*)?$')").message("baseUrl must be an http(s) URL such as https://api.example.com/v1"))]
    pub base_url: Option<String>,

    /// The Secret key holding the upstream API key(s). Keys never appear in the spec.
    pub credentials: SecretKeyRef,

    /// Models this channel serves, as clients name them.
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(min = 1, max = 256), inner(length(min = 1, max = 128)))]
    pub models: Vec<String>,

    /// Renames a client's model to the provider's name, e.g. `gpt-4o: gpt-4o-2024-08-06`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub model_mapping: BTreeMap<String, String>,

    /// Higher tiers are tried first; lower tiers are fallbacks.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,

    /// Share of traffic among channels of the same priority tier (1–100).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,

    /// Retries on another channel after an upstream failure.
    #[serde(default = "default_max_retry")]
    #[schemars(range(min = 0, max = 10))]
    pub max_retry: i32,

    /// A disabled channel keeps its configuration but serves nothing.
    #[serde(default)]
    pub disabled: bool,

    /// What the provider charges the platform, per model, for margin reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]), length(max = 256))]
    pub upstream_cost: Vec<ModelPrice>,
}

fn default_weight() -> i32 {
    100
}

fn default_max_retry() -> i32 {
    2
}

/// Observed state of a Channel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    /// `observedGeneration` and `conditions`.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Numeric id of the channel (the MySQL `channels.id`), used in usage records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<i64>,
    /// Number of upstream keys found in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_count: Option<i32>,
}
