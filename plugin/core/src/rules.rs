//! Plugin configuration as Higress delivers it, and the choice of the configuration for a request.
//!
//! Higress's controller turns a `WasmPlugin` into one JSON document for `on_configure`: the
//! `defaultConfig` fields (unless `defaultConfigDisable`), plus `_rules_`, one entry per enabled
//! `matchRules` item — that item's `config` fields with `_match_route_` (its `ingress` list),
//! `_match_service_` and `_match_domain_` added (Higress `pkg/ingress/config/ingress_config.go`,
//! `convertIstioWasmPlugin`). Higress's plugin SDK then picks, per request, the first rule whose
//! match holds and otherwise the global config (`wasm-go` `pkg/matcher/rule_matcher.go`). This
//! module reproduces both sides for our plugin: [`RuleSet::parse`] reads the delivered document, and
//! [`RuleSet::select`] makes the same choice from the request's route name, cluster name and host.
//! A document our plugin could read only in part is refused whole, as the SDK does without rule
//! isolation.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The key Higress puts the rules under.
pub const RULES_KEY: &str = "_rules_";
const MATCH_ROUTE: &str = "_match_route_";
const MATCH_ROUTE_PREFIX: &str = "_match_route_prefix_";
const MATCH_SERVICE: &str = "_match_service_";
const MATCH_DOMAIN: &str = "_match_domain_";

/// What a request is matched on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestKeys<'a> {
    /// The `route_name` property (Higress: the route's Ingress, `namespace/name`).
    pub route: &'a str,
    /// The `cluster_name` property, e.g. `outbound|443||aigw-openai-main.dns`.
    pub cluster: &'a str,
    /// The `:authority` header (a port is ignored).
    pub host: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `*suffix`
    Suffix(String),
    /// `prefix*`
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule<T> {
    routes: Vec<String>,
    prefixes: Vec<String>,
    services: Vec<String>,
    hosts: Vec<Host>,
    config: T,
}

/// A delivered configuration: the global part (if any) and the rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet<T> {
    global: Option<T>,
    rules: Vec<Rule<T>>,
}

/// Why a delivered configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError<E: std::error::Error> {
    #[error("plugin configuration is not a JSON object: {0}")]
    NotAnObject(serde_json::Error),
    #[error("the global configuration is invalid and there are no rules: {0}")]
    Global(E),
    #[error(
        "rule {index} has none of _match_route_, _match_domain_, _match_service_, _match_route_prefix_"
    )]
    NoMatch { index: usize },
    #[error("rule {index}: {source}")]
    Rule { index: usize, source: E },
}

fn strings(rule: &Map<String, Value>, key: &str) -> Vec<String> {
    rule.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        // `[v6]:port` or `name:port`; a bare IPv6 address (no `]` after the colon) keeps its colons.
        Some(colon) if host.rfind(']').is_none_or(|b| b < colon) => &host[..colon],
        _ => host,
    }
}

impl<T> RuleSet<T> {
    /// Reads a delivered document; `parse` reads one configuration (the global part, or a rule
    /// without its `_match_*` keys).
    pub fn parse<E: std::error::Error>(
        bytes: &[u8],
        parse: impl Fn(&[u8]) -> Result<T, E>,
    ) -> Result<Self, RulesError<E>> {
        let mut doc: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(RulesError::NotAnObject)?;
        let rules = doc.remove(RULES_KEY);
        let encode = |m: &Map<String, Value>| serde_json::to_vec(m).unwrap_or_default();
        // An empty document enables the plugin globally with an empty configuration.
        let global = if doc.is_empty() && rules.is_none() {
            Some(parse(b"{}").map_err(RulesError::Global)?)
        } else if doc.is_empty() {
            None
        } else {
            match parse(&encode(&doc)) {
                Ok(c) => Some(c),
                Err(e) if rules.is_none() => return Err(RulesError::Global(e)),
                // With rules, a global part that does not parse is simply absent.
                Err(_) => None,
            }
        };
        let mut out = Vec::new();
        for (index, rule) in rules
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(rule) = rule.as_object() else {
                return Err(RulesError::NoMatch { index });
            };
            let hosts = strings(rule, MATCH_DOMAIN)
                .into_iter()
                .map(|h| {
                    if let Some(s) = h.strip_prefix('*') {
                        Host::Suffix(s.to_owned())
                    } else if let Some(p) = h.strip_suffix('*') {
                        Host::Prefix(p.to_owned())
                    } else {
                        Host::Exact(h)
                    }
                })
                .collect::<Vec<_>>();
            let (routes, prefixes, services) = (
                strings(rule, MATCH_ROUTE),
                strings(rule, MATCH_ROUTE_PREFIX),
                strings(rule, MATCH_SERVICE),
            );
            if routes.is_empty() && prefixes.is_empty() && services.is_empty() && hosts.is_empty() {
                return Err(RulesError::NoMatch { index });
            }
            let own: Map<String, Value> = rule
                .iter()
                .filter(|(k, _)| !k.starts_with("_match_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let config =
                parse(&encode(&own)).map_err(|source| RulesError::Rule { index, source })?;
            out.push(Rule {
                routes,
                prefixes,
                services,
                hosts,
                config,
            });
        }
        Ok(Self { global, rules: out })
    }

    /// The configuration for a request: the first rule that matches it, else the global one, else
    /// none (the plugin does nothing for that request).
    pub fn select(&self, keys: RequestKeys<'_>) -> Option<&T> {
        let host = strip_port(keys.host);
        let service_matches = |rule: &Rule<T>| {
            let parts: Vec<&str> = keys.cluster.split('|').collect();
            let [_, port, _, fqdn] = parts.as_slice() else {
                return false;
            };
            rule.services.iter().any(|s| match s.rsplit_once(':') {
                Some((name, p)) if name == *fqdn && p == *port => true,
                _ => s == fqdn,
            })
        };
        let matches = |rule: &Rule<T>| {
            if !rule.routes.is_empty() {
                // A route rule; with services it needs both.
                rule.routes.iter().any(|r| r == keys.route)
                    && (rule.services.is_empty() || service_matches(rule))
            } else if !rule.hosts.is_empty() {
                rule.hosts.iter().any(|h| match h {
                    Host::Exact(e) => e == host,
                    Host::Suffix(s) => host.ends_with(s.as_str()),
                    Host::Prefix(p) => host.starts_with(p.as_str()),
                })
            } else if !rule.services.is_empty() {
                service_matches(rule)
            } else {
                rule.prefixes
                    .iter()
                    .any(|p| keys.route.starts_with(p.as_str()))
            }
        };
        self.rules
            .iter()
            .find(|r| matches(r))
            .map(|r| &r.config)
            .or(self.global.as_ref())
    }

    /// Every configuration, global first.
    pub fn configs(&self) -> impl Iterator<Item = &T> {
        self.global
            .iter()
            .chain(self.rules.iter().map(|r| &r.config))
    }

    /// Whether any configuration could apply at all.
    pub fn is_empty(&self) -> bool {
        self.global.is_none() && self.rules.is_empty()
    }
}

/// [`RuleSet::parse`] for any `serde` type.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct C {
        name: String,
    }

    fn set(doc: &str) -> RuleSet<C> {
        RuleSet::parse(doc.as_bytes(), parse_json::<C>).unwrap()
    }

    fn name<'a>(s: &'a RuleSet<C>, route: &str, cluster: &str, host: &str) -> Option<&'a str> {
        s.select(RequestKeys {
            route,
            cluster,
            host,
        })
        .map(|c| c.name.as_str())
    }

    #[test]
    fn global_only_rules_only_and_both() {
        let g = set(r#"{"name":"g"}"#);
        assert_eq!(name(&g, "any", "", "a.example"), Some("g"));
        let r = set(r#"{"_rules_":[{"_match_route_":["ns/r1"],"name":"r1"}]}"#);
        assert_eq!(name(&r, "ns/r1", "", "h"), Some("r1"));
        assert_eq!(
            name(&r, "ns/r2", "", "h"),
            None,
            "no rule, no global: nothing"
        );
        let b = set(r#"{"name":"g","_rules_":[{"_match_route_":["ns/r1"],"name":"r1"}]}"#);
        assert_eq!(name(&b, "ns/r1", "", "h"), Some("r1"));
        assert_eq!(name(&b, "ns/r2", "", "h"), Some("g"));
    }

    #[test]
    fn services_domains_and_prefixes_match_as_the_sdk_does() {
        let s = set(r#"{"_rules_":[
              {"_match_domain_":["*.example.com","www.*","exact.test"],"name":"d"},
              {"_match_service_":["a.dns","b.static:8080"],"name":"s"},
              {"_match_route_":["r"],"_match_service_":["c.dns"],"name":"rs"},
              {"_match_route_prefix_":["api-"],"name":"p"}]}"#);
        assert_eq!(name(&s, "", "", "x.example.com:443"), Some("d"));
        assert_eq!(name(&s, "", "", "www.other.org"), Some("d"));
        assert_eq!(name(&s, "", "", "exact.test"), Some("d"));
        assert_eq!(name(&s, "", "outbound|443||a.dns", "h"), Some("s"));
        assert_eq!(name(&s, "", "outbound|8080||b.static", "h"), Some("s"));
        assert_eq!(
            name(&s, "", "outbound|9090||b.static", "h"),
            None,
            "port must match"
        );
        assert_eq!(name(&s, "r", "outbound|80||c.dns", "h"), Some("rs"));
        assert_eq!(
            name(&s, "r", "outbound|80||d.dns", "h"),
            None,
            "route and service both"
        );
        assert_eq!(name(&s, "api-users", "", "h"), Some("p"));
    }

    #[test]
    fn a_rule_without_a_match_or_that_does_not_parse_refuses_the_whole_document() {
        assert!(matches!(
            RuleSet::parse(br#"{"_rules_":[{"name":"x"}]}"#, parse_json::<C>),
            Err(RulesError::NoMatch { index: 0 })
        ));
        assert!(matches!(
            RuleSet::parse(
                br#"{"_rules_":[{"_match_route_":["a"],"name":"ok"},{"_match_route_":["b"],"nom":"x"}]}"#,
                parse_json::<C>
            ),
            Err(RulesError::Rule { index: 1, .. })
        ));
        assert!(matches!(
            RuleSet::parse(br#"{"nom":"x"}"#, parse_json::<C>),
            Err(RulesError::Global(_))
        ));
        // With rules, a global part that does not parse is ignored (the SDK's behaviour).
        let s = RuleSet::parse(
            br#"{"nom":"x","_rules_":[{"_match_route_":["a"],"name":"ok"}]}"#,
            parse_json::<C>,
        )
        .unwrap();
        assert_eq!(name(&s, "b", "", "h"), None);
    }
}
