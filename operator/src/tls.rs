//! TLS per tenant domain through Higress's own certificate management: the `higress-https`
//! `ConfigMap` in the Higress namespace (key `cert`, YAML), which Higress's controller reads
//! (`pkg/cert/config.go`, read at commit `4e0d6914`): `credentialConfig` entries map domains to a
//! TLS Secret (`namespace/name`), optionally issued by Higress itself over ACME (`tlsIssuer:
//! letsencrypt`, one domain per entry, `automaticHttps: true` and an `acmeIssuer` with an email).
//!
//! The operator writes one entry per domain a tenant serves (`status.domains`), in one object for
//! all tenants. The `ConfigMap` is shared with the Higress console: only entries whose Secret name
//! starts with [`SECRET_PREFIX`] are ours; every other entry and setting is kept.
//!
//! - `secret` mode: the certificate is a Secret `aigw-tls-<domain>` in the tenant's namespace,
//!   written by cert-manager (or by platform staff) — Higress serves it, nothing else is asked of
//!   Higress.
//! - `acme` mode: Higress issues the certificate itself and stores it in `aigw-tls-<domain>` in the
//!   Higress namespace; wildcard domains are skipped (HTTP-01 cannot prove them).
//! - `off`: our entries are removed.

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// The `ConfigMap` Higress reads.
pub const CONFIGMAP: &str = "higress-https";
/// Its data key.
pub const KEY: &str = "cert";
/// Prefix of the Secret names of our entries (what marks an entry as ours).
pub const SECRET_PREFIX: &str = "aigw-tls-";

/// How tenant domains get certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// No entries of ours.
    Off,
    /// A Secret per domain in the tenant's namespace (cert-manager).
    #[default]
    Secret,
    /// Higress issues the certificates over ACME (Let's Encrypt).
    Acme,
}

/// TLS settings of the operator.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub mode: Mode,
    /// The ACME account email (`acme` mode; required there).
    pub acme_email: String,
}

/// The Secret name for `domain`: `aigw-tls-` + the domain with `.` → `-` and `*` → `wildcard`.
pub fn secret_name(domain: &str) -> String {
    format!(
        "{SECRET_PREFIX}{}",
        domain
            .to_ascii_lowercase()
            .replace('*', "wildcard")
            .replace('.', "-")
    )
}

/// Our `credentialConfig` entries: one per served domain, sorted by domain. `tenants` holds each
/// tenant's namespace and served domains.
pub fn entries(
    tenants: &[(String, Vec<String>)],
    settings: &Settings,
    higress_ns: &str,
) -> Vec<Value> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for (ns, domains) in tenants {
        for d in domains {
            let d = d.to_ascii_lowercase();
            let entry = match settings.mode {
                Mode::Off => continue,
                Mode::Secret => {
                    json!({"domains": [d], "tlsSecret": format!("{ns}/{}", secret_name(&d))})
                }
                Mode::Acme if d.starts_with('*') => continue,
                Mode::Acme => json!({"domains": [d], "tlsIssuer": "letsencrypt",
                                     "tlsSecret": format!("{higress_ns}/{}", secret_name(&d))}),
            };
            out.push((d, entry));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, e)| e).collect()
}

fn is_ours(entry: &Value) -> bool {
    let secret = entry["tlsSecret"].as_str().unwrap_or_default();
    let name = secret.rsplit('/').next().unwrap_or_default();
    name.starts_with(SECRET_PREFIX)
}

/// The `cert` document with our entries in place of the previous ones; `existing` is the current
/// document (absent: Higress's defaults).
pub fn merge(existing: Option<&str>, ours: Vec<Value>, settings: &Settings) -> Result<String> {
    let mut doc: Value = match existing {
        Some(text) if !text.trim().is_empty() => {
            serde_yaml::from_str(text).map_err(|e| Error::Invalid {
                field: "higress-https",
                reason: format!("the {CONFIGMAP} ConfigMap's {KEY} is not YAML: {e}"),
            })?
        }
        _ => {
            json!({"automaticHttps": false, "fallbackForInvalidSecret": false, "renewBeforeDays": 30,
                    "credentialConfig": [], "acmeIssuer": []})
        }
    };
    if !doc.is_object() {
        doc = json!({});
    }
    let mut credentials: Vec<Value> = doc["credentialConfig"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !is_ours(e))
        .collect();
    credentials.extend(ours);
    doc["credentialConfig"] = Value::Array(credentials);
    if doc["renewBeforeDays"]
        .as_i64()
        .is_none_or(|d| d <= 0 || d >= 90)
    {
        doc["renewBeforeDays"] = json!(30);
    }
    if settings.mode == Mode::Acme {
        if settings.acme_email.is_empty() {
            return Err(Error::Invalid {
                field: "acme_email",
                reason: "acme mode needs an ACME account email (--acme-email)".into(),
            });
        }
        doc["automaticHttps"] = json!(true);
        let mut issuers: Vec<Value> = doc["acmeIssuer"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["name"] != "letsencrypt")
            .collect();
        issuers.push(json!({"name": "letsencrypt", "email": settings.acme_email}));
        doc["acmeIssuer"] = Value::Array(issuers);
    }
    serde_yaml::to_string(&doc).map_err(|e| Error::Invalid {
        field: "higress-https",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_entries_stay_and_ours_are_replaced() {
        let existing = "automaticHttps: false\nrenewBeforeDays: 20\ncredentialConfig:\n\
            - domains: [console.example]\n  tlsSecret: higress-system/console-cert\n\
            - domains: [old.example]\n  tlsSecret: aigw-old/aigw-tls-old-example\nacmeIssuer: []\n";
        let settings = Settings::default();
        let ours = entries(
            &[(
                "aigw-acme".into(),
                vec!["api.acme.example".into(), "*.acme.example".into()],
            )],
            &settings,
            "higress-system",
        );
        let merged: Value =
            serde_yaml::from_str(&merge(Some(existing), ours, &settings).unwrap()).unwrap();
        assert_eq!(merged["renewBeforeDays"], 20);
        assert_eq!(
            merged["credentialConfig"],
            json!([
                {"domains": ["console.example"], "tlsSecret": "higress-system/console-cert"},
                {"domains": ["*.acme.example"], "tlsSecret": "aigw-acme/aigw-tls-wildcard-acme-example"},
                {"domains": ["api.acme.example"], "tlsSecret": "aigw-acme/aigw-tls-api-acme-example"},
            ])
        );
    }

    #[test]
    fn acme_mode_issues_per_domain_and_needs_an_email() {
        let mut settings = Settings {
            mode: Mode::Acme,
            acme_email: String::new(),
        };
        let ours = entries(
            &[(
                "aigw-a".into(),
                vec!["api.a.example".into(), "*.a.example".into()],
            )],
            &settings,
            "higress-system",
        );
        assert_eq!(
            ours,
            [
                json!({"domains": ["api.a.example"], "tlsIssuer": "letsencrypt",
                    "tlsSecret": "higress-system/aigw-tls-api-a-example"})
            ]
        );
        assert!(merge(None, ours.clone(), &settings).is_err());
        settings.acme_email = "ops@platform.example".into();
        let doc: Value = serde_yaml::from_str(&merge(None, ours, &settings).unwrap()).unwrap();
        assert_eq!(doc["automaticHttps"], true);
        assert_eq!(
            doc["acmeIssuer"],
            json!([{"name": "letsencrypt", "email": "ops@platform.example"}])
        );
    }
}
