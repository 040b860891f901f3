//! What Higress's controller makes of a `WasmPlugin` for the plugin's `on_configure` — for tests
//! that load our plugins the way a gateway would. Reproduces the shape built by Higress's
//! `convertIstioWasmPlugin` (`pkg/ingress/config/ingress_config.go`, read at commit `4e0d6914`):
//!
//! - `defaultConfig`, unless `defaultConfigDisable` is true;
//! - plus `_rules_`: for each `matchRules` item without `configDisable`, its `config` (or `{}`) with
//!   `_match_route_` = its `ingress` list, `_match_service_` = its `service` list and
//!   `_match_domain_` = its `domain` list added (only the non-empty ones); an item with none of the
//!   three is an error (Higress refuses the plugin);
//! - no configuration at all (the plugin is not applied) when the default is disabled and no rule
//!   remains.

use serde_json::{Map, Value, json};

/// The document Higress delivers for a `WasmPlugin`'s `spec`; `Ok(None)` when it applies nowhere.
pub fn delivered_config(spec: &Value) -> Result<Option<Value>, String> {
    let disabled = spec["defaultConfigDisable"].as_bool() == Some(true);
    let mut config: Option<Map<String, Value>> = if disabled {
        None
    } else {
        spec["defaultConfig"].as_object().cloned()
    };
    let mut rules = Vec::new();
    for rule in spec["matchRules"].as_array().into_iter().flatten() {
        if rule["configDisable"].as_bool() == Some(true) {
            continue;
        }
        let mut own = rule["config"].as_object().cloned().unwrap_or_default();
        let mut matched = false;
        for (from, key) in [
            ("ingress", "_match_route_"),
            ("service", "_match_service_"),
            ("domain", "_match_domain_"),
        ] {
            if let Some(items) = rule[from].as_array().filter(|a| !a.is_empty()) {
                own.insert(key.to_owned(), Value::Array(items.clone()));
                matched = true;
            }
        }
        if !matched {
            return Err(format!(
                "invalid match rule has no match condition, rule: {rule}"
            ));
        }
        rules.push(Value::Object(own));
    }
    if !rules.is_empty() {
        config
            .get_or_insert_with(Map::new)
            .insert("_rules_".to_owned(), Value::Array(rules));
    } else if disabled {
        return Ok(None);
    }
    Ok(Some(config.map_or_else(|| json!({}), Value::Object)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shapes_higress_builds() {
        let global = json!({"defaultConfig": {"a": 1}});
        assert_eq!(delivered_config(&global).unwrap(), Some(json!({"a": 1})));
        let rules_only = json!({"defaultConfigDisable": true, "defaultConfig": {"a": 1},
            "matchRules": [{"ingress": ["r1"], "config": {"b": 2}},
                           {"ingress": ["r2"], "configDisable": true, "config": {"b": 3}},
                           {"service": ["s.dns"], "domain": ["*.x"], "config": {"b": 4}}]});
        assert_eq!(
            delivered_config(&rules_only).unwrap(),
            Some(json!({"_rules_": [
                {"b": 2, "_match_route_": ["r1"]},
                {"b": 4, "_match_service_": ["s.dns"], "_match_domain_": ["*.x"]}]}))
        );
        let nowhere = json!({"defaultConfigDisable": true, "matchRules": []});
        assert_eq!(delivered_config(&nowhere).unwrap(), None);
        let bad = json!({"matchRules": [{"config": {}}]});
        assert!(delivered_config(&bad).is_err());
    }
}
