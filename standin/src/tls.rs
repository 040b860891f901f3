//! TLS as the gateway would serve it: certificates chosen by SNI from Higress's `higress-https`
//! `ConfigMap` (the `cert` document's `credentialConfig`: domains → `namespace/name` of a TLS
//! Secret) and the Secrets it names. Read with Higress's rules (`pkg/cert/config.go`, commit
//! `4e0d6914`): the document must validate (`renewBeforeDays` in 1..=89, an ACME entry has one
//! domain and needs `automaticHttps` with a Let's Encrypt issuer email), and a domain matches an
//! entry when it is a subset of one of its domains (exact, or under a `*.` wildcard); the first
//! matching entry wins. An entry whose Secret is missing or unreadable is skipped.

use std::sync::Arc;

use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::Value;

use crate::host::{Error, Result};

/// One `credentialConfig` entry: its domains and its Secret (`namespace`, `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub domains: Vec<String>,
    pub namespace: String,
    pub name: String,
}

/// The entries of a `cert` document, validated as Higress validates it.
pub fn credentials(cert_yaml: &str) -> Result<Vec<Credential>> {
    let doc: Value =
        serde_yaml::from_str(cert_yaml).map_err(|e| Error(format!("cert is not YAML: {e}")))?;
    let renew = doc["renewBeforeDays"].as_i64().unwrap_or(30);
    if !(1..90).contains(&renew) {
        return Err(Error(format!("renewBeforeDays {renew} outside 1..=89")));
    }
    let letsencrypt_email = doc["acmeIssuer"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == "letsencrypt")
        .and_then(|i| i["email"].as_str())
        .filter(|e| e.contains('@'));
    let mut out = Vec::new();
    for e in doc["credentialConfig"].as_array().into_iter().flatten() {
        let domains: Vec<String> = e["domains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_ascii_lowercase))
            .collect();
        if domains.is_empty() {
            return Err(Error("credentialConfig domains is empty".into()));
        }
        let secret = e["tlsSecret"].as_str().unwrap_or_default();
        let (namespace, name) = match secret.split('/').collect::<Vec<_>>().as_slice() {
            [name] if !name.is_empty() => (String::new(), (*name).to_owned()),
            [ns, name] if !name.is_empty() => ((*ns).to_owned(), (*name).to_owned()),
            _ => {
                return Err(Error(format!(
                    "credentialConfig tlsSecret {secret:?} is not supported"
                )));
            }
        };
        match e["tlsIssuer"].as_str() {
            None | Some("") => {}
            Some("letsencrypt") => {
                if domains.len() > 1 {
                    return Err(Error("a letsencrypt entry has one domain only".into()));
                }
                if doc["automaticHttps"] != true || letsencrypt_email.is_none() {
                    return Err(Error(
                        "letsencrypt entries need automaticHttps and an issuer email".into(),
                    ));
                }
            }
            Some(other) => return Err(Error(format!("tls issuer {other} is not supported"))),
        }
        out.push(Credential {
            domains,
            namespace,
            name,
        });
    }
    Ok(out)
}

/// Whether `host` is a subset of the configured `domain` (Istio's `host.Name.SubsetOf`).
pub fn covers(domain: &str, host: &str) -> bool {
    match domain.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => domain == host,
    }
}

/// Reads a TLS Secret by namespace and name: its `tls.crt` and `tls.key` (PEM).
pub type SecretReader<'a> = dyn Fn(&str, &str) -> Option<(Vec<u8>, Vec<u8>)> + 'a;

/// Certificates by SNI.
#[derive(Debug)]
pub struct SniResolver {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl SniResolver {
    /// From a `cert` document and a reader of TLS Secrets (`tls.crt`, `tls.key` PEM bytes).
    pub fn new(cert_yaml: &str, secret: &SecretReader<'_>) -> Result<Self> {
        let mut entries = Vec::new();
        for c in credentials(cert_yaml)? {
            let Some((crt, key)) = secret(&c.namespace, &c.name) else {
                continue;
            };
            let Ok(chain) =
                CertificateDer::pem_slice_iter(&crt).collect::<std::result::Result<Vec<_>, _>>()
            else {
                continue;
            };
            let Ok(key) = PrivateKeyDer::from_pem_slice(&key) else {
                continue;
            };
            let Ok(signer) = any_supported_type(&key) else {
                continue;
            };
            entries.push((c.domains, Arc::new(CertifiedKey::new(chain, signer))));
        }
        Ok(Self { entries })
    }

    /// The certificate served for `host`.
    pub fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.to_ascii_lowercase();
        self.entries
            .iter()
            .find(|(domains, _)| domains.iter().any(|d| covers(d, &host)))
            .map(|(_, k)| k.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name()?)
    }
}

/// A TLS server configuration serving certificates by SNI from `resolver`.
pub fn server_config(resolver: SniResolver) -> Result<Arc<ServerConfig>> {
    server_config_with(Arc::new(resolver))
}

/// [`server_config`] with any certificate resolver (e.g. one reloaded as the `ConfigMap` changes).
pub fn server_config_with(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}
