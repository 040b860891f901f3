//! OIDC signing keys: Ed25519 (EdDSA), read from a directory holding one PKCS#8 PEM file per key
//! (`<kid>.pem`, e.g. a mounted Secret). All keys of the directory are published in the JWKS and
//! verify tokens; the key named in the file `active` signs (default: the greatest kid, so keys
//! named by date rotate in order). Rotation: add the new key (with `active` still naming the old
//! one while clients refresh their JWKS cache), switch `active`, and remove the old key once the
//! longest-lived token it signed has expired. The directory is re-read periodically; a directory
//! that fails to load leaves the previous set in use.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde_json::{Value, json};

/// One signing key.
pub struct SigningKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// The public key, base64url (the JWK's `x`).
    pub x: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct KeySet {
    active: Arc<SigningKey>,
    all: BTreeMap<String, Arc<SigningKey>>,
}

/// The key set; cheap to clone.
#[derive(Debug, Clone)]
pub struct Keys {
    dir: PathBuf,
    set: Arc<RwLock<Arc<KeySet>>>,
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn parse(kid: &str, pem: &str) -> Result<SigningKey, String> {
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
        .map_err(|e| format!("{kid}.pem is not an Ed25519 PKCS#8 private key: {e}"))?;
    let public = key.verifying_key().to_bytes();
    let x = URL_SAFE_NO_PAD.encode(public);
    let encoding =
        EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| format!("{kid}.pem: {e}"))?;
    let decoding = DecodingKey::from_ed_components(&x).map_err(|e| format!("{kid}.pem: {e}"))?;
    Ok(SigningKey {
        kid: kid.to_owned(),
        encoding,
        decoding,
        x,
    })
}

fn load(dir: &Path) -> Result<KeySet, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut all = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        // A mounted Secret holds `..data` symlinks and dot-directories; only `<kid>.pem` counts.
        let Some(kid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        if kid.starts_with('.') {
            continue;
        }
        if !valid_kid(kid) {
            return Err(format!(
                "{}: a key id has 1–64 characters of A-Z a-z 0-9 . _ -",
                path.display()
            ));
        }
        let pem = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        all.insert(kid.to_owned(), Arc::new(parse(kid, &pem)?));
    }
    let active_file = dir.join("active");
    let active = match std::fs::read_to_string(&active_file) {
        Ok(text) => {
            let kid = text.trim();
            all.get(kid).cloned().ok_or_else(|| {
                format!("{}: names {kid:?}, which is not a key of the directory", active_file.display())
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            all.values().next_back().cloned().ok_or_else(|| {
                format!(
                    "{}: no signing key (<kid>.pem); create one with `aigw-apiserver keygen --dir {}`",
                    dir.display(),
                    dir.display()
                )
            })?
        }
        Err(e) => return Err(format!("{}: {e}", active_file.display())),
    };
    Ok(KeySet { active, all })
}

impl Keys {
    /// Loads the directory; an error when it holds no usable key.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let set = load(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            set: Arc::new(RwLock::new(Arc::new(set))),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the directory; on error the previous keys stay in use.
    pub fn reload(&self) -> Result<(), String> {
        let set = load(&self.dir)?;
        *self
            .set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        Ok(())
    }

    /// The key that signs new tokens.
    pub fn signer(&self) -> Arc<SigningKey> {
        self.current().active.clone()
    }

    /// The key with this id, if still published.
    pub fn get(&self, kid: &str) -> Option<Arc<SigningKey>> {
        self.current().all.get(kid).cloned()
    }

    /// The JWK set (`/oauth/jwks`).
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .current()
            .all
            .values()
            .map(|k| json!({"kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid, "alg": "EdDSA", "use": "sig"}))
            .collect();
        json!({ "keys": keys })
    }

    /// Re-reads the directory every `every` until `shutdown`.
    pub fn spawn_reload(
        &self,
        every: std::time::Duration,
        shutdown: aigw_common::shutdown::Shutdown,
    ) {
        let keys = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.wait() => return,
                }
                if let Err(e) = keys.reload() {
                    tracing::error!(error = %e, "OIDC signing keys not reloaded; the previous keys stay in use");
                }
            }
        });
    }
}

/// Writes a new Ed25519 key `<dir>/<kid>.pem` (mode 0600); refuses to overwrite one.
pub fn generate(dir: &Path, kid: &str) -> Result<PathBuf, String> {
    if !valid_kid(kid) {
        return Err(format!(
            "{kid:?}: a key id has 1–64 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| format!("encoding the key: {e}"))?;
    let path = dir.join(format!("{kid}.pem"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, pem.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aigw-keys-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_greatest_kid_signs_unless_active_names_another() {
        let dir = scratch("active");
        assert!(Keys::load(&dir).unwrap_err().contains("keygen"));
        generate(&dir, "2026-01").unwrap();
        generate(&dir, "2026-02").unwrap();
        assert!(generate(&dir, "2026-02").is_err(), "never overwrites a key");
        let keys = Keys::load(&dir).unwrap();
        assert_eq!(keys.signer().kid, "2026-02");
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
        std::fs::write(dir.join("active"), "2026-01\n").unwrap();
        keys.reload().unwrap();
        assert_eq!(keys.signer().kid, "2026-01");
        std::fs::write(dir.join("active"), "2025-12").unwrap();
        assert!(keys.reload().unwrap_err().contains("not a key"));
        assert_eq!(
            keys.signer().kid,
            "2026-01",
            "a bad directory keeps the old set"
        );
        std::fs::write(dir.join("bad.pem"), "not a key").unwrap();
        assert!(Keys::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
