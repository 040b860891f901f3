//! What authz reads from the request itself (ext-auth sends its path in `x-forwarded-uri` and, with
//! `with_request_body`, its body): which endpoint it is, the model, and how many tokens it may use.
//!
//! Policy (docs/architecture.md §5, "Billing policy"):
//! - Only endpoints whose usage the reporter can meter are served ([`Endpoint`]); any other path
//!   is refused with a clear error until it is priced (images, audio, files, batches, …).
//! - The model is the body's `model`; a `x-higress-llm-model` header that says otherwise is
//!   refused, so a client cannot pick the route, allow-list or price by header.
//! - A stream that asks the provider to leave usage out (`stream_options.include_usage: false`)
//!   is refused: ext-auth cannot rewrite the body, and ai-proxy only adds the option when absent.
//! - The reservation is sized from the request: the prompt as `ceil(body bytes / 3)` tokens (about
//!   one token per CJK character, two to four per English word's bytes: an over-estimate for
//!   most text) plus the output limit the client set (`max_completion_tokens`, `max_tokens`,
//!   `max_output_tokens`, times `n`), or the configured default when it set none.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::decide::Denial;

/// An endpoint whose usage the reporter meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions` (OpenAI Chat Completions).
    Chat,
    /// `POST /v1/completions` (OpenAI legacy completions).
    Completions,
    /// `POST /v1/embeddings`: input tokens only.
    Embeddings,
    /// `POST /v1/responses` (OpenAI Responses).
    Responses,
    /// `POST /v1/messages` (Anthropic Messages).
    Messages,
}

impl Endpoint {
    /// Every metered endpoint with its path; the operator routes exactly these.
    pub const ALL: [(&'static str, Self); 5] = [
        ("/v1/chat/completions", Self::Chat),
        ("/v1/completions", Self::Completions),
        ("/v1/embeddings", Self::Embeddings),
        ("/v1/responses", Self::Responses),
        ("/v1/messages", Self::Messages),
    ];

    /// The endpoint of a request URI (`/v1/chat/completions?x=1`), if it is metered.
    pub fn of(uri: &str) -> Option<Self> {
        let path = uri.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_suffix('/').unwrap_or(path);
        Self::ALL.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
    }
}

/// The top-level fields of a request body authz reads.
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Present,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_completion_tokens: Present,
    #[serde(default)]
    max_tokens: Present,
    #[serde(default)]
    max_output_tokens: Present,
    #[serde(default)]
    n: Present,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Present,
}

/// A field's value if the field is present — `null` included (an `Option` would read `null` as
/// absent, and `include_usage: null` must not pass as absent).
#[derive(Debug, Default)]
struct Present(Option<Value>);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(|v| Self(Some(v)))
    }
}

/// The most tokens one side of an estimate may count (prompt, or output): 4M.
pub const MAX_ESTIMATE: i64 = 4_000_000;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub endpoint: Endpoint,
    /// The body's `model`.
    pub model: String,
    /// Estimated prompt tokens.
    pub prompt: i64,
    /// Output tokens the request may produce (its limit, or the default).
    pub completion: i64,
    /// A chat or text completion stream that leaves `stream_options.include_usage` out: only
    /// ai-proxy adds it, and not for a `generic` channel (authz then refuses the request).
    pub stream_usage_implicit: bool,
}

impl Shape {
    /// What to reserve from the token's quota.
    pub fn estimate(&self) -> i64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Reads a request: `uri` from `x-forwarded-uri`, `header_model` from `x-higress-llm-model`,
/// `body` as ext-auth forwarded it. Pure.
pub fn shape(
    uri: Option<&str>,
    header_model: Option<&str>,
    body: &[u8],
    default_output: i64,
) -> Result<Shape, Denial> {
    let uri = uri.unwrap_or_default();
    let endpoint =
        Endpoint::of(uri).ok_or_else(|| Denial::UnsupportedEndpoint(path_only(uri).to_owned()))?;
    // Only the few top-level fields authz needs are kept; the rest (messages, tools, …) is scanned
    // and skipped without building a tree. A repeated field is refused as an invalid body.
    let head: Head<'_> = serde_json::from_slice(body).map_err(|_| Denial::InvalidBody)?;
    let model = head
        .model
        .filter(|m| !m.is_empty())
        .ok_or(Denial::ModelRequired)?
        .into_owned();
    if let Some(h) = header_model
        && h != model
    {
        return Err(Denial::ModelMismatch);
    }
    // Any `include_usage` other than absent or `true` (false, null, 0, "false", …) could leave the
    // provider's stream without usage.
    let include_usage = head.stream_options.and_then(|o| o.include_usage.0);
    if endpoint != Endpoint::Messages
        && include_usage
            .as_ref()
            .is_some_and(|v| *v != Value::Bool(true))
    {
        return Err(Denial::UsageSuppressed);
    }
    let streams = head
        .stream
        .0
        .as_ref()
        .is_some_and(|v| !v.is_null() && *v != Value::Bool(false));
    let stream_usage_implicit = streams
        && include_usage.is_none()
        && matches!(endpoint, Endpoint::Chat | Endpoint::Completions);
    let prompt = i64::try_from(body.len().div_ceil(3)).unwrap_or(i64::MAX);
    let completion = if endpoint == Endpoint::Embeddings {
        0
    } else {
        // Every output limit the client set must be a positive integer (a lenient upstream may
        // accept "32000" or 32000.0 where this estimate could not read it); the largest counts.
        let positive = |field: &'static str, v: &Present| match &v.0 {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or(Denial::InvalidLimit(field)),
        };
        let mut limit: Option<i64> = None;
        for (field, v) in [
            ("max_completion_tokens", &head.max_completion_tokens),
            ("max_tokens", &head.max_tokens),
            ("max_output_tokens", &head.max_output_tokens),
        ] {
            if let Some(n) = positive(field, v)? {
                limit = Some(limit.map_or(n, |l| l.max(n)));
            }
        }
        let n = positive("n", &head.n)?.unwrap_or(1).min(128);
        limit.unwrap_or(default_output).saturating_mul(n)
    };
    // An estimate beyond any model's reach is the client's limit, not usage: cap what is reserved
    // (and what a lost report is billed at) so it always fits the billing columns.
    let completion = completion.min(MAX_ESTIMATE);
    let prompt = prompt.min(MAX_ESTIMATE);
    Ok(Shape {
        endpoint,
        model,
        prompt,
        completion,
        stream_usage_implicit,
    })
}

fn path_only(uri: &str) -> &str {
    let p = uri.split(['?', '#']).next().unwrap_or_default();
    // Keep error messages short whatever a client sends.
    p.get(..p.len().min(128)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_metered_endpoints_are_served() {
        assert_eq!(
            Endpoint::of("/v1/chat/completions?x=1"),
            Some(Endpoint::Chat)
        );
        assert_eq!(Endpoint::of("/v1/messages/"), Some(Endpoint::Messages));
        for p in [
            "/v1/images/generations",
            "/v1/audio/speech",
            "/v1/files",
            "/v1/batches",
            "/v1/chat/completions/x",
            "",
        ] {
            assert_eq!(Endpoint::of(p), None, "{p}");
        }
        assert_eq!(
            shape(Some("/v1/images/generations"), None, b"{}", 10),
            Err(Denial::UnsupportedEndpoint("/v1/images/generations".into()))
        );
        assert_eq!(
            shape(None, None, b"{}", 10),
            Err(Denial::UnsupportedEndpoint(String::new()))
        );
    }

    #[test]
    fn the_body_decides_the_model_and_a_different_header_is_refused() {
        let body = br#"{"model":"gpt-4o","messages":[]}"#;
        let s = shape(Some("/v1/chat/completions"), None, body, 100).unwrap();
        assert_eq!(s.model, "gpt-4o");
        assert!(shape(Some("/v1/chat/completions"), Some("gpt-4o"), body, 100).is_ok());
        assert_eq!(
            shape(Some("/v1/chat/completions"), Some("gpt-4o-mini"), body, 100),
            Err(Denial::ModelMismatch)
        );
        assert_eq!(
            shape(Some("/v1/chat/completions"), Some("gpt-4o"), b"{}", 100),
            Err(Denial::ModelRequired)
        );
        assert_eq!(
            shape(Some("/v1/chat/completions"), None, b"not json", 100),
            Err(Denial::InvalidBody)
        );
        // A repeated model (which one would the upstream use?) is refused; an escaped one is read.
        assert_eq!(
            shape(
                Some("/v1/chat/completions"),
                None,
                br#"{"model":"gpt-4o","model":"o1-pro"}"#,
                100
            ),
            Err(Denial::InvalidBody)
        );
        let s = shape(
            Some("/v1/chat/completions"),
            Some("gpt-4o"),
            br#"{"model":"gpt\u002d4o"}"#,
            100,
        )
        .unwrap();
        assert_eq!(s.model, "gpt-4o");
    }

    #[test]
    fn streams_that_leave_usage_to_the_gateway_are_told_apart() {
        let implicit = |body: &[u8], path: &str| {
            shape(Some(path), None, body, 1)
                .unwrap()
                .stream_usage_implicit
        };
        let chat = "/v1/chat/completions";
        assert!(implicit(br#"{"model":"m","stream":true}"#, chat));
        assert!(implicit(
            br#"{"model":"m","stream":"yes","stream_options":{}}"#,
            chat
        ));
        assert!(implicit(
            br#"{"model":"m","stream":true}"#,
            "/v1/completions"
        ));
        assert!(!implicit(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            chat
        ));
        assert!(!implicit(br#"{"model":"m","stream":false}"#, chat));
        assert!(!implicit(br#"{"model":"m"}"#, chat));
        assert!(!implicit(
            br#"{"model":"m","stream":true}"#,
            "/v1/responses"
        ));
    }

    #[test]
    fn streams_without_usage_are_refused() {
        for off in [
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#.as_slice(),
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":null}}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":0}}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":"false"}}"#,
        ] {
            assert_eq!(
                shape(Some("/v1/chat/completions"), None, off, 1),
                Err(Denial::UsageSuppressed),
                "{}",
                String::from_utf8_lossy(off)
            );
        }
        let on = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(shape(Some("/v1/chat/completions"), None, on, 1).is_ok());
        let absent = br#"{"model":"m","stream":true}"#;
        assert!(shape(Some("/v1/chat/completions"), None, absent, 1).is_ok());
    }

    #[test]
    fn the_estimate_follows_the_request() {
        let body = br#"{"model":"m","max_tokens":1000,"n":2,"messages":[{"role":"user","content":"hello"}]}"#;
        let s = shape(Some("/v1/chat/completions"), None, body, 4096).unwrap();
        assert_eq!(s.prompt, i64::try_from(body.len().div_ceil(3)).unwrap());
        assert_eq!(s.completion, 2000);
        let s = shape(
            Some("/v1/chat/completions"),
            None,
            br#"{"model":"m"}"#,
            4096,
        )
        .unwrap();
        assert_eq!(s.completion, 4096, "no limit: the default");
        let s = shape(
            Some("/v1/embeddings"),
            None,
            br#"{"model":"e","input":"x"}"#,
            4096,
        )
        .unwrap();
        assert_eq!(s.completion, 0);
        let s = shape(
            Some("/v1/responses"),
            None,
            br#"{"model":"m","max_output_tokens":77}"#,
            4096,
        )
        .unwrap();
        assert_eq!(s.completion, 77);
        let s = shape(
            Some("/v1/chat/completions"),
            None,
            br#"{"model":"m","max_tokens":10,"max_completion_tokens":900}"#,
            4096,
        )
        .unwrap();
        assert_eq!(s.completion, 900, "the largest limit counts");
        for bad in [
            br#"{"model":"m","max_tokens":"32000"}"#.as_slice(),
            br#"{"model":"m","max_tokens":32000.0}"#,
            br#"{"model":"m","max_tokens":-1}"#,
            br#"{"model":"m","n":"2"}"#,
        ] {
            assert!(
                matches!(
                    shape(Some("/v1/chat/completions"), None, bad, 4096),
                    Err(Denial::InvalidLimit(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let s = shape(
            Some("/v1/chat/completions"),
            None,
            br#"{"model":"m","max_tokens":9000000000,"n":128}"#,
            4096,
        )
        .unwrap();
        assert_eq!(
            s.completion, MAX_ESTIMATE,
            "capped to fit the billing columns"
        );
    }
}
