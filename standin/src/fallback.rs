//! Envoy's `custom_response` filter with its redirect policy, as Higress's Envoy build runs it —
//! emulated, because Envoy cannot run here. Read from the `EnvoyFilter`s the operator wrote (as
//! read back from the kube-apiserver), per route (`typed_per_filter_config` of an `HTTP_ROUTE`
//! patch). What is reproduced, from Higress's Envoy (`redirect_policy.cc` of its `envoy-1.36`
//! branch, the `HIGRESS` build):
//! - the matcher: `HttpResponseStatusCodeClassMatchInput` / `HttpResponseStatusCodeMatchInput`
//!   with an exact value, first match wins;
//! - `only_redirect_upstream_code`: only an answer that came from the upstream
//!   (`response.code_details` = `via_upstream`) is redirected;
//! - the redirected request is the stream's request headers **as the filters and the router left
//!   them** (the same header map: plugin rewrites and the route's header removal stay), with
//!   `use_original_request_uri` putting back `x-envoy-original-host` / `x-envoy-original-path`
//!   (else the current host and path), `request_headers_to_add` evaluated on the first stream
//!   (so `%FILTER_STATE(…)%` reads what its plugins set), `content-length` removed, the method
//!   kept, and with `use_original_request_body` the body the client sent;
//! - `max_internal_redirects` (default 1) bounds the passes; `keep_original_response_code`
//!   (default true) gives the client the first pass's status.
//!
//! Not reproduced: where Envoy places the filter relative to the Wasm filters (here the plugins
//! see the first pass's answer before the redirect, as when the filter precedes them in the
//! chain), and any other policy than the redirect.

use serde_json::Value;

use crate::host::{Error, Headers, Result, header};

/// One `custom_response` matcher: a status class (`5xx`) or an exact status (`429`), and the
/// redirect it triggers.
#[derive(Debug, Clone)]
pub struct Rule {
    pub class: bool,
    pub value: String,
    pub redirect: Redirect,
}

/// The fields of a redirect policy the stand-in acts on.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // the policy's own flags, one field each
pub struct Redirect {
    pub max_internal_redirects: u32,
    pub use_original_request_uri: bool,
    pub use_original_request_body: bool,
    pub keep_original_response_code: bool,
    pub only_redirect_upstream_code: bool,
    /// (name, value template, overwrite).
    pub request_headers_to_add: Vec<(String, String, bool)>,
}

/// The custom responses of every route: route name → its rules.
pub type CustomResponses = std::collections::HashMap<String, Vec<Rule>>;

/// The message inside a typed config: a `udpa.type.v1.TypedStruct`'s `value` (as Istio passes
/// it to Envoy), or the config itself when it is typed directly.
fn unwrap_typed(config: &Value) -> (&str, &Value) {
    if config["@type"] == "type.googleapis.com/udpa.type.v1.TypedStruct" {
        (
            config["type_url"].as_str().unwrap_or_default(),
            &config["value"],
        )
    } else {
        (config["@type"].as_str().unwrap_or_default(), config)
    }
}

fn flag(v: &Value, name: &str, default: bool) -> Result<bool> {
    match &v[name] {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        other => Err(Error(format!(
            "redirect policy: {name} is {other}, not a bool"
        ))),
    }
}

fn redirect(action: &Value) -> Result<Redirect> {
    let (type_url, v) = unwrap_typed(&action["typed_config"]);
    if !type_url
        .ends_with("envoy.extensions.http.custom_response.redirect_policy.v3.RedirectPolicy")
    {
        return Err(Error(format!(
            "custom_response action {type_url}: not a redirect policy"
        )));
    }
    let mut request_headers_to_add = Vec::new();
    for h in v["request_headers_to_add"].as_array().into_iter().flatten() {
        let key = h["header"]["key"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let value = h["header"]["value"].as_str().unwrap_or_default().to_owned();
        // `append_action` (default APPEND_IF_EXISTS_OR_ADD), or the deprecated `append` bool.
        let overwrite = match (&h["append_action"], &h["append"]) {
            (Value::String(a), _) => a == "OVERWRITE_IF_EXISTS_OR_ADD",
            (_, Value::Bool(append)) => !append,
            _ => false,
        };
        request_headers_to_add.push((key, value, overwrite));
    }
    Ok(Redirect {
        max_internal_redirects: v["max_internal_redirects"]
            .as_u64()
            .map_or(Ok(1), u32::try_from)
            .map_err(|e| Error(format!("max_internal_redirects: {e}")))?,
        use_original_request_uri: flag(v, "use_original_request_uri", false)?,
        use_original_request_body: flag(v, "use_original_request_body", false)?,
        keep_original_response_code: flag(v, "keep_original_response_code", true)?,
        only_redirect_upstream_code: flag(v, "only_redirect_upstream_code", false)?,
        request_headers_to_add,
    })
}

/// The custom responses configured by `EnvoyFilter`s (JSON, as read back).
pub fn custom_responses(envoy_filters: &[Value]) -> Result<CustomResponses> {
    let mut out = CustomResponses::new();
    for ef in envoy_filters {
        for patch in ef["spec"]["configPatches"].as_array().into_iter().flatten() {
            if patch["applyTo"] != "HTTP_ROUTE" {
                continue;
            }
            let Some(route) =
                patch["match"]["routeConfiguration"]["vhost"]["route"]["name"].as_str()
            else {
                continue;
            };
            let config = &patch["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.custom_response"];
            if config.is_null() {
                continue;
            }
            let (_, v) = unwrap_typed(config);
            let mut rules = Vec::new();
            for m in v["custom_response_matcher"]["matcher_list"]["matchers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let single = &m["predicate"]["single_predicate"];
                let input = single["input"]["typed_config"]["@type"]
                    .as_str()
                    .unwrap_or_default();
                let class = if input.ends_with("HttpResponseStatusCodeClassMatchInput") {
                    true
                } else if input.ends_with("HttpResponseStatusCodeMatchInput") {
                    false
                } else {
                    return Err(Error(format!(
                        "custom_response input {input}: not emulated"
                    )));
                };
                let value = single["value_match"]["exact"].as_str().unwrap_or_default();
                rules.push(Rule {
                    class,
                    value: value.to_owned(),
                    redirect: redirect(&m["on_match"]["action"])?,
                });
            }
            out.insert(route.to_owned(), rules);
        }
    }
    Ok(out)
}

/// The redirect for an answer of `status` (and `details`), if a rule matches.
pub fn matching<'a>(rules: &'a [Rule], status: u16, details: &str) -> Option<&'a Redirect> {
    let class = format!("{}xx", status / 100);
    let code = status.to_string();
    rules
        .iter()
        .find(|r| {
            if r.class {
                r.value == class
            } else {
                r.value == code
            }
        })
        .map(|r| &r.redirect)
        .filter(|r| !r.only_redirect_upstream_code || details == "via_upstream")
}

/// A header value template with Envoy's formatters: `%FILTER_STATE(key:PLAIN)%` (from the
/// stream's filter state; Wasm properties are kept under `wasm.<name>`) and `%REQ(name)%`; `%%`
/// is a literal `%`. Any other operator is an error, so a config the stand-in cannot evaluate
/// fails the test rather than passing unexamined.
pub fn format(
    template: &str,
    filter_state: &dyn Fn(&str) -> Option<String>,
    request: &Headers,
) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            out.push('%');
            rest = tail;
            continue;
        }
        let end = after
            .find('%')
            .ok_or_else(|| Error(format!("unterminated operator in {template:?}")))?;
        let op = &after[..end];
        if let Some(arg) = op
            .strip_prefix("FILTER_STATE(")
            .and_then(|a| a.strip_suffix(')'))
        {
            let key = arg.strip_suffix(":PLAIN").unwrap_or(arg);
            out.push_str(&filter_state(key).unwrap_or_default());
        } else if let Some(arg) = op.strip_prefix("REQ(").and_then(|a| a.strip_suffix(')')) {
            out.push_str(header(request, &arg.to_ascii_lowercase()).unwrap_or_default());
        } else {
            return Err(Error(format!("formatter %{op}% is not emulated")));
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The request of the next pass: the first pass's final request headers with the policy applied.
pub fn redirected(
    policy: &Redirect,
    mut headers: Headers,
    filter_state: &dyn Fn(&str) -> Option<String>,
) -> Result<Headers> {
    if policy.use_original_request_uri {
        for (pseudo, original) in [
            (":authority", "x-envoy-original-host"),
            (":path", "x-envoy-original-path"),
        ] {
            if let Some(v) = header(&headers, original)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
            {
                set(&mut headers, pseudo, v);
            }
        }
    }
    let evaluated: Vec<(String, String, bool)> = policy
        .request_headers_to_add
        .iter()
        .map(|(k, t, o)| Ok((k.clone(), format(t, filter_state, &headers)?, *o)))
        .collect::<Result<_>>()?;
    for (k, v, overwrite) in evaluated {
        // Envoy adds no header whose value formats to nothing.
        if v.is_empty() {
            continue;
        }
        if overwrite {
            set(&mut headers, &k, v);
        } else {
            headers.push((k, v));
        }
    }
    headers.retain(|(k, _)| k != "content-length");
    Ok(headers)
}

fn set(headers: &mut Headers, name: &str, value: String) {
    headers.retain(|(k, _)| k != name);
    headers.push((name.to_owned(), value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatters_read_filter_state_and_request_headers() {
        let state = |k: &str| (k == "wasm.aigw_event_id").then(|| "e1".to_owned());
        let req: Headers = vec![("x-request-id".into(), "r1".into())];
        assert_eq!(
            format(
                "%FILTER_STATE(wasm.aigw_event_id:PLAIN)%/%REQ(X-Request-Id)%/100%%",
                &state,
                &req
            )
            .unwrap(),
            "e1/r1/100%"
        );
        assert_eq!(
            format("%FILTER_STATE(wasm.other:PLAIN)%", &state, &req).unwrap(),
            ""
        );
        assert!(format("%START_TIME%", &state, &req).is_err());
        assert!(format("50%", &state, &req).is_err());
    }
}
