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
//! - `secret` mode: the certificate is a Secret [`secret_name`] (`aigw-tls-<domain>`, `aigw-tls--<base>`
//!   for `*.<base>`) in the tenant's namespace,
//!   written by cert-manager (or by platform staff) — Higress serves it, nothing else is asked of
//!   Higress.
//! - `acme` mode: Higress issues the certificate itself and stores it in `aigw-tls-<domain>` in the
//!   Higress namespace; wildcard domains are skipped (HTTP-01 cannot prove them).
//! - `off`: our entries are removed.

use serde_json::{Value, json};
use sha2::Digest;

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

/// The Secret name for `domain`. Never the same for two domains: in `acme` mode every tenant's
/// certificate Secret is in the Higress namespace, so a shared name would let one tenant's claim
/// have Higress overwrite another tenant's certificate (an earlier rule, `.` → `-`, gave
/// `a-b.example` and `a.b-example` one name).
/// - `api.acme.example` → `aigw-tls-api.acme.example` (a Secret name may hold dots);
/// - `*.acme.example` → `aigw-tls--acme.example` (no domain label starts with `-`);
/// - a name that would pass the kube-apiserver's 253 characters → `aigw-tls-h-` + the domain's
///   SHA-256 in hex (one label, and every domain has two or more).
pub fn secret_name(domain: &str) -> String {
    let domain = domain.to_ascii_lowercase();
    let name = match domain.strip_prefix("*.") {
        Some(base) => format!("{SECRET_PREFIX}-{base}"),
        None => format!("{SECRET_PREFIX}{domain}"),
    };
    if name.len() <= 253 {
        return name;
    }
    format!(
        "{SECRET_PREFIX}h-{}",
        hex::encode(sha2::Sha256::digest(domain.as_bytes()))
    )
}

/// The kube-apiserver's limit on one `ConfigMap`: the lengths of its values (`data` and
/// `binaryData`) together may not pass 1 MiB. The operator counts the keys too, a few bytes to
/// spare.
pub const CONFIGMAP_LIMIT: usize = 1024 * 1024;

/// Our `credentialConfig` entries, each with its domain: one per served domain, in priority order
/// for when not all fit (see [`merge`]). `tenants` holds each tenant's namespace and served
/// domains, oldest tenant first (the caller's order). Every tenant's first domain comes before any
/// tenant's second, and so on, oldest tenant first at each rank: a tenant that adds domains never
/// takes an entry away from another tenant's first domain, and a new tenant never from an older
/// tenant's domain of the same rank.
pub fn entries(
    tenants: &[(String, Vec<String>)],
    settings: &Settings,
    higress_ns: &str,
) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let ranks = tenants.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
    for rank in 0..ranks {
        for (ns, domains) in tenants {
            let Some(d) = domains.get(rank) else {
                continue;
            };
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
    out
}

fn is_ours(entry: &Value) -> bool {
    let secret = entry["tlsSecret"].as_str().unwrap_or_default();
    let name = secret.rsplit('/').next().unwrap_or_default();
    name.starts_with(SECRET_PREFIX)
}

/// The `cert` document [`merge`] made, and the domains left out of it.
#[derive(Debug)]
pub struct Merged {
    pub text: String,
    /// Domains of ours that did not fit in `budget`, the newest tenants' first to go.
    pub left_out: Vec<String>,
}

/// The `cert` document with our entries in place of the previous ones, in at most `budget` bytes;
/// `existing` is the current document (absent: Higress's defaults).
///
/// When not all of `ours` fit, the longest prefix of it that does is kept (its order is the
/// priority, see [`entries`]), and the rest is returned as left out. The entries in the document are sorted by domain, whatever their priority.
pub fn merge(
    existing: Option<&str>,
    ours: Vec<(String, Value)>,
    settings: &Settings,
    budget: usize,
) -> Result<Merged> {
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
    let others: Vec<Value> = doc["credentialConfig"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !is_ours(e))
        .collect();
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
    // The document with the first `n` of ours.
    let render = |n: usize| -> Result<String> {
        let mut kept: Vec<&(String, Value)> = ours[..n].iter().collect();
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        let mut doc = doc.clone();
        let mut credentials = others.clone();
        credentials.extend(kept.into_iter().map(|(_, e)| e.clone()));
        doc["credentialConfig"] = Value::Array(credentials);
        serde_yaml::to_string(&doc).map_err(|e| Error::Invalid {
            field: "higress-https",
            reason: e.to_string(),
        })
    };
    let all = render(ours.len())?;
    if all.len() <= budget {
        return Ok(Merged {
            text: all,
            left_out: Vec::new(),
        });
    }
    // The most that fit: `lo` fits, `hi` does not (a document grows with every entry).
    let (mut lo, mut hi, mut text) = (0, ours.len(), render(0)?);
    if text.len() > budget {
        return Err(Error::Invalid {
            field: "higress-https",
            reason: format!(
                "the {CONFIGMAP} ConfigMap holds {} bytes of other entries, more than its {budget} \
                 byte budget, before any tenant domain",
                text.len()
            ),
        });
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let t = render(mid)?;
        if t.len() <= budget {
            (lo, text) = (mid, t);
        } else {
            hi = mid;
        }
    }
    Ok(Merged {
        text,
        left_out: ours[lo..].iter().map(|(d, _)| d.clone()).collect(),
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
        let merged = merge(Some(existing), ours, &settings, CONFIGMAP_LIMIT).unwrap();
        assert!(merged.left_out.is_empty());
        let merged: Value = serde_yaml::from_str(&merged.text).unwrap();
        assert_eq!(merged["renewBeforeDays"], 20);
        assert_eq!(
            merged["credentialConfig"],
            json!([
                {"domains": ["console.example"], "tlsSecret": "higress-system/console-cert"},
                {"domains": ["*.acme.example"], "tlsSecret": "aigw-acme/aigw-tls--acme.example"},
                {"domains": ["api.acme.example"], "tlsSecret": "aigw-acme/aigw-tls-api.acme.example"},
            ])
        );
    }

    /// Two tenants' domains never share a Secret name (in `acme` mode all are in one namespace),
    /// and every name is one the kube-apiserver accepts.
    #[test]
    fn secret_names_are_distinct_and_valid() {
        let long = format!("{}.example", vec!["a".repeat(63); 3].join("."));
        assert_eq!(long.len(), 199);
        let longest = format!("{0}.{0}.{1}.{1}.example", "b".repeat(61), "b".repeat(60));
        assert_eq!(longest.len(), 253);
        let domains = [
            "a-b.example.com",
            "a.b-example.com",
            "a.b.example.com",
            "*.example.com",
            "wildcard.example.com",
            long.as_str(),
            longest.as_str(),
            "*.b.example.com",
            "h-0.example",
        ];
        let label = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let mut seen = std::collections::HashSet::new();
        for d in domains {
            let name = secret_name(d);
            assert!(seen.insert(name.clone()), "{d} shares {name}");
            assert!(name.starts_with(SECRET_PREFIX), "{name}");
            assert!(name.len() <= 253, "{name}");
            assert!(name.split('.').all(label), "{d} → {name}");
        }
        assert_eq!(secret_name("api.acme.example"), "aigw-tls-api.acme.example");
        assert_eq!(secret_name("*.acme.example"), "aigw-tls--acme.example");
        assert!(secret_name(&longest).starts_with("aigw-tls-h-"));
        assert_eq!(secret_name(&long), format!("aigw-tls-{long}"));
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
            [(
                "api.a.example".to_owned(),
                json!({"domains": ["api.a.example"], "tlsIssuer": "letsencrypt",
                    "tlsSecret": "higress-system/aigw-tls-api.a.example"})
            )]
        );
        assert!(merge(None, ours.clone(), &settings, CONFIGMAP_LIMIT).is_err());
        settings.acme_email = "ops@platform.example".into();
        let doc = merge(None, ours, &settings, CONFIGMAP_LIMIT).unwrap().text;
        let doc: Value = serde_yaml::from_str(&doc).unwrap();
        assert_eq!(doc["automaticHttps"], true);
        assert_eq!(
            doc["acmeIssuer"],
            json!([{"name": "letsencrypt", "email": "ops@platform.example"}])
        );
    }

    /// Over the budget, entries go in reverse priority: the newest tenants' later domains first,
    /// and an old tenant holding many domains cannot push out a newer tenant's only domain. The
    /// console's entry always stays.
    #[test]
    fn over_the_budget_later_domains_and_newer_tenants_go_first() {
        let existing = "credentialConfig:\n\
            - domains: [console.example]\n  tlsSecret: higress-system/console-cert\n";
        let settings = Settings::default();
        // Oldest first: "zz" sorts last but came first, and holds six domains.
        let mut tenants: Vec<(String, Vec<String>)> = vec![(
            "aigw-zz".into(),
            (0..6).map(|i| format!("d{i}.zz.example")).collect(),
        )];
        for t in ["mm", "aa", "bb"] {
            tenants.push((
                format!("aigw-{t}"),
                vec![format!("api.{t}.example"), format!("www.{t}.example")],
            ));
        }
        let ours = entries(&tenants, &settings, "higress-system");
        let order: Vec<&str> = ours.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            order[..6],
            [
                "d0.zz.example",
                "api.mm.example",
                "api.aa.example",
                "api.bb.example",
                "d1.zz.example",
                "www.mm.example"
            ]
        );
        let whole = merge(Some(existing), ours.clone(), &settings, CONFIGMAP_LIMIT).unwrap();
        assert!(whole.left_out.is_empty());
        // One byte short of the whole document: exactly the last in priority goes.
        let short = merge(
            Some(existing),
            ours.clone(),
            &settings,
            whole.text.len() - 1,
        )
        .unwrap();
        assert_eq!(short.left_out, ["d5.zz.example"]);
        // Room for about half: every tenant's first domain stays; only later ones go.
        let half = merge(
            Some(existing),
            ours.clone(),
            &settings,
            whole.text.len() / 2 + 60,
        )
        .unwrap();
        assert!(half.text.len() <= whole.text.len() / 2 + 60);
        let doc: Value = serde_yaml::from_str(&half.text).unwrap();
        let kept: Vec<&str> = doc["credentialConfig"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["domains"][0].as_str().unwrap())
            .collect();
        assert_eq!(kept[0], "console.example");
        for first in [
            "d0.zz.example",
            "api.mm.example",
            "api.aa.example",
            "api.bb.example",
        ] {
            assert!(kept.contains(&first), "{first} left out: {kept:?}");
        }
        assert!(half.left_out.contains(&"d5.zz.example".to_owned()));
        assert_eq!(kept.len() - 1 + half.left_out.len(), ours.len());
        let mut sorted = kept[1..].to_vec();
        sorted.sort_unstable();
        assert_eq!(kept[1..], sorted[..], "entries are sorted by domain");
        // No room even for the console's entry: an error, not a document without it.
        assert!(merge(Some(existing), ours, &settings, 10).is_err());
    }
}
