//! The shared secret between the usage reporter (written into its WasmPlugin config by the operator)
//! and billing ingest, read the same way by both binaries so both ends hold one value.
//!
//! In a cluster both pods mount one Secret (`aigw-ingest`, key `secret`) and point
//! `AIGW_INGEST_SECRET_FILE` at it; for local runs `AIGW_INGEST_SECRET` may carry the value. A missing,
//! empty or short secret stops the process at start: an operator that wrote an empty secret into the
//! plugin config would make every usage report a 401 while traffic kept flowing unbilled.

use std::path::{Path, PathBuf};

use clap::Args;

/// The fewest characters a shared secret may have.
pub const MIN_SECRET_LEN: usize = 16;

/// Flags for the ingest secret: the value, or else the file.
#[derive(Debug, Clone, Args)]
pub struct IngestSecretArgs {
    /// Shared secret between the usage reporter and billing ingest (`x-aigw-ingest-secret`).
    #[arg(long, env = "AIGW_INGEST_SECRET", hide_env_values = true)]
    pub ingest_secret: Option<String>,
    /// File holding that secret (a mounted Secret); surrounding white space is ignored.
    #[arg(long, env = "AIGW_INGEST_SECRET_FILE")]
    pub ingest_secret_file: Option<PathBuf>,
}

/// Why the ingest secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "no ingest secret: set AIGW_INGEST_SECRET_FILE (a mounted Secret) or AIGW_INGEST_SECRET; \
         the operator and billing ingest must share it"
    )]
    Missing,
    #[error("reading the ingest secret from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the ingest secret has {0} characters; it needs at least {MIN_SECRET_LEN} (e.g. `openssl rand -hex 32`)"
    )]
    TooShort(usize),
}

impl IngestSecretArgs {
    /// The secret, or why it cannot be used.
    pub fn load(&self) -> Result<String, SecretError> {
        let value = match (&self.ingest_secret, &self.ingest_secret_file) {
            (Some(v), _) => v.trim().to_owned(),
            (None, Some(path)) => read(path)?,
            (None, None) => return Err(SecretError::Missing),
        };
        match value.chars().count() {
            0 => Err(SecretError::Missing),
            n if n < MIN_SECRET_LEN => Err(SecretError::TooShort(n)),
            _ => Ok(value),
        }
    }
}

fn read(path: &Path) -> Result<String, SecretError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Option<&str>, f: Option<PathBuf>) -> IngestSecretArgs {
        IngestSecretArgs {
            ingest_secret: v.map(str::to_owned),
            ingest_secret_file: f,
        }
    }

    #[test]
    fn empty_short_or_missing_secrets_are_refused() {
        assert!(matches!(args(None, None).load(), Err(SecretError::Missing)));
        assert!(matches!(
            args(Some("  "), None).load(),
            Err(SecretError::Missing)
        ));
        assert!(matches!(
            args(Some("short"), None).load(),
            Err(SecretError::TooShort(5))
        ));
        assert_eq!(
            args(Some("dev-ingest-secret"), None).load().unwrap(),
            "dev-ingest-secret"
        );
        let dir = std::env::temp_dir().join(format!("aigw-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        assert_eq!(
            args(None, Some(file.clone())).load().unwrap(),
            "0123456789abcdef0123"
        );
        assert!(matches!(
            args(None, Some(dir.join("absent"))).load(),
            Err(SecretError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
