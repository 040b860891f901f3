//! Key material: API keys for Tokens (generated, hashed) and the AES-GCM sealing of upstream keys
//! stored in MySQL.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};

use rand::Rng;

use crate::error::{Error, Result};

pub use aigw_crds::token::{KEY_LEN, PREFIX_LEN, generate_api_key, hash_api_key, key_prefix};

/// Seals upstream keys for the MySQL mirror with AES-256-GCM. The key comes from config; it is
/// never logged (Debug is redacted).
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    /// From a 32-byte key given as 64 hex characters.
    pub fn from_hex(key_hex: &str) -> Result<Self> {
        let bytes = hex::decode(key_hex.trim())
            .map_err(|e| Error::Crypto(format!("key is not hex: {e}")))?;
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| Error::Crypto(format!("key must be 32 bytes, got {}", bytes.len())))?;
        Ok(Self { cipher })
    }

    /// `nonce (12 bytes) || ciphertext+tag`; `aad` binds the blob to its row (the channel name).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let nonce: [u8; 12] = rand::rng().random();
        let mut out = nonce.to_vec();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| Error::Crypto("encryption failed".into()))?;
        out.extend(sealed);
        Ok(out)
    }

    /// Reverses [`Sealer::seal`].
    pub fn open(&self, blob: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        if blob.len() < 12 {
            return Err(Error::Crypto("sealed blob too short".into()));
        }
        let (nonce, sealed) = blob.split_at(12);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map_err(|_| Error::Crypto("decryption failed (wrong key or tampered data)".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_well_formed() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + KEY_LEN);
        assert!(a.starts_with("sk-") && a[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(key_prefix(&a).len(), PREFIX_LEN);
    }

    #[test]
    fn hash_is_sha256_hex() {
        // SHA-256("abc"), a published test vector.
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn sealing_round_trips_and_detects_tampering() {
        let sealer = Sealer::from_hex(&"11".repeat(32)).unwrap();
        let blob = sealer.seal(b"sk-upstream", b"openai-main").unwrap();
        assert_ne!(&blob[12..], b"sk-upstream");
        assert_eq!(sealer.open(&blob, b"openai-main").unwrap(), b"sk-upstream");
        assert!(
            sealer.open(&blob, b"other-channel").is_err(),
            "aad binds the row"
        );
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(sealer.open(&bad, b"openai-main").is_err());
        assert!(Sealer::from_hex("abcd").is_err());
        assert_eq!(format!("{sealer:?}"), "Sealer(<redacted>)");
    }
}
