//! Password hashing: argon2id (the `argon2` crate) with OWASP's baseline parameters (19 MiB,
//! 2 passes, 1 lane), stored as a PHC string in `users.password`. Verification of an unknown user
//! runs against a dummy hash of the same parameters, so an answer's timing does not tell whether
//! the user exists. Hashing runs on the blocking pool: it takes tens of milliseconds of CPU.

use tokio::sync::OwnedSemaphorePermit;

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::{SaltString, rand_core::OsRng},
};

/// Memory cost in KiB, passes, lanes.
pub const PARAMS: (u32, u32, u32) = (19 * 1024, 2, 1);

/// The shortest and longest password accepted when one is set.
pub const MIN_LEN: usize = 12;
pub const MAX_LEN: usize = 128;

fn hasher() -> Result<Argon2<'static>, String> {
    let (m, t, p) = PARAMS;
    let params = Params::new(m, t, p, None).map_err(|e| e.to_string())?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The PHC string of `password` with a fresh salt.
pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches `phc`. A malformed stored hash never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    hasher().is_ok_and(|h| h.verify_password(password.as_bytes(), &parsed).is_ok())
}

/// [`hash`] on the blocking pool, holding `slot` until the hash is done — even when the request
/// that asked goes away (dropping the caller does not stop a blocking task).
pub async fn hash_async(password: String, slot: OwnedSemaphorePermit) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let out = hash(&password);
        drop(slot);
        out
    })
    .await
    .map_err(|e| e.to_string())?
}

/// [`verify`] on the blocking pool (`phc`: the user's hash or the dummy one), holding `slot` as
/// [`hash_async`] does.
pub async fn verify_async(password: String, phc: String, slot: OwnedSemaphorePermit) -> bool {
    tokio::task::spawn_blocking(move || {
        let out = verify(&password, &phc);
        drop(slot);
        out
    })
    .await
    .unwrap_or(false)
}

/// Checks a new password's length (NIST 800-63B: length, no composition rules).
pub fn check_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_LEN {
        Err(format!("a password has at least {MIN_LEN} characters"))
    } else if n > MAX_LEN {
        Err(format!("a password has at most {MAX_LEN} characters"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let phc = hash("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify("correct horse battery", &phc));
        assert!(!verify("correct horse battery!", &phc));
        assert!(!verify("x", "not a phc string"));
        assert!(check_policy("short").is_err() && check_policy("twelve chars").is_ok());
    }
}
