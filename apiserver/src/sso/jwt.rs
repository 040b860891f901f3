//! The tokens: access tokens (RFC 9068 `at+jwt`) and ID tokens, both EdDSA JWTs signed and
//! verified with `jsonwebtoken`; and the Redis deny-list every verification consults.
//!
//! Deny-list keys (each expires when no token it names can still be valid):
//! - `deny:jti:<jti>`: one revoked access token;
//! - `deny:fam:<family>`: every token of one refresh family (revoked, or a used refresh token
//!   presented again);
//! - `deny:sid:<sid>`: every token of one sign-in session (logout);
//! - `nbf:<tenant id>:<user id>`: tokens issued before this second (a role change, a disabled
//!   account).

use jsonwebtoken::{Algorithm, Header, Validation, decode, decode_header, encode};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::{Role, Site, Sso, now_secs, random_id, secs};

/// The tenant a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantClaim {
    pub id: i64,
    pub name: String,
}

/// Claims of an access token: what every management request is authorised on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The user id (`users.id`), as a string.
    pub sub: String,
    /// The client the token was issued to.
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    /// The sign-in session.
    pub sid: String,
    /// The refresh family (one authorization and its rotations).
    pub fam: String,
    pub client_id: String,
    pub scope: String,
    pub tenant: TenantClaim,
    /// The user's roles in the tenant; permissions are their union.
    pub roles: Vec<Role>,
}

impl AccessClaims {
    /// The user id.
    pub fn user_id(&self) -> Option<i64> {
        self.sub.parse().ok()
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split(' ').any(|s| s == scope)
    }
}

/// Claims of an ID token (OpenID Connect Core §2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub auth_time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    pub sid: String,
    pub tenant: TenantClaim,
    pub roles: Vec<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Why a bearer token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token has been revoked")]
    Revoked,
    #[error("the token store is unavailable")]
    Unavailable,
}

/// Everything a new access token needs.
#[derive(Debug, Clone)]
pub struct Grant {
    pub user_id: i64,
    pub client_id: String,
    pub scope: String,
    pub sid: String,
    pub family: String,
    pub roles: Vec<Role>,
}

const ACCESS_TYP: &str = "at+jwt";
const LEEWAY_SECS: u64 = 5;

impl Sso {
    fn header(&self, typ: &str) -> (Header, std::sync::Arc<super::keys::SigningKey>) {
        let key = self.keys().signer();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.to_owned());
        (header, key)
    }

    /// A new access token for `grant` on `site`, issued at `iat`.
    pub fn mint_access_at(
        &self,
        site: &Site,
        grant: &Grant,
        iat: i64,
    ) -> Result<(String, AccessClaims), String> {
        let claims = AccessClaims {
            iss: site.issuer(),
            sub: grant.user_id.to_string(),
            aud: grant.client_id.clone(),
            exp: iat + secs(self.settings().access_ttl),
            iat,
            jti: random_id(),
            sid: grant.sid.clone(),
            fam: grant.family.clone(),
            client_id: grant.client_id.clone(),
            scope: grant.scope.clone(),
            tenant: site.claim(),
            roles: grant.roles.clone(),
        };
        let (header, key) = self.header(ACCESS_TYP);
        let token = encode(&header, &claims, &key.encoding).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    pub fn mint_access(
        &self,
        site: &Site,
        grant: &Grant,
    ) -> Result<(String, AccessClaims), String> {
        self.mint_access_at(site, grant, now_secs())
    }

    pub fn mint_id(&self, claims: &IdClaims) -> Result<String, String> {
        let (header, key) = self.header("JWT");
        encode(&header, claims, &key.encoding).map_err(|e| e.to_string())
    }

    /// Checks a JWT's signature (by `kid` among the published keys), algorithm, issuer (`site`'s)
    /// and `typ`; `expired_ok` skips the expiry (an `id_token_hint`).
    fn decode<C: serde::de::DeserializeOwned>(
        &self,
        site: &Site,
        token: &str,
        typ: Option<&str>,
        expired_ok: bool,
    ) -> Result<C, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Invalid("algorithm is not EdDSA".into()));
        }
        if let Some(typ) = typ
            && !header
                .typ
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(typ))
        {
            return Err(AuthError::Invalid(format!("not an {typ} token")));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("no key id".into()))?;
        let key = self
            .keys()
            .get(&kid)
            .ok_or_else(|| AuthError::Invalid(format!("unknown signing key {kid:?}")))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[site.issuer()]);
        validation.validate_aud = false;
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = !expired_ok;
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        decode::<C>(token, &key.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verifies an access token presented on `site`: signature, issuer, expiry, tenant, and
    /// the deny-list (one Redis round trip).
    pub async fn verify_access(&self, site: &Site, token: &str) -> Result<AccessClaims, AuthError> {
        let claims: AccessClaims = self.decode(site, token, Some(ACCESS_TYP), false)?;
        if claims.tenant.id != site.tenant.id {
            return Err(AuthError::Invalid("issued for another tenant".into()));
        }
        let keys = [
            self.key(&format!("deny:jti:{}", claims.jti)),
            self.key(&format!("deny:fam:{}", claims.fam)),
            self.key(&format!("deny:sid:{}", claims.sid)),
            self.key(&format!("nbf:{}:{}", claims.tenant.id, claims.sub)),
        ];
        let found: Vec<Option<i64>> = self
            .redis()
            .mget(&keys)
            .await
            .map_err(|_| AuthError::Unavailable)?;
        if found.iter().take(3).any(Option::is_some) {
            return Err(AuthError::Revoked);
        }
        if found
            .get(3)
            .copied()
            .flatten()
            .is_some_and(|nbf| claims.iat < nbf)
        {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }

    /// An ID token of `site` with a valid signature, expired or not (`id_token_hint`).
    pub fn verify_id_hint(&self, site: &Site, token: &str) -> Result<IdClaims, AuthError> {
        let claims: IdClaims = self.decode(site, token, None, true)?;
        if claims.tenant.id != site.tenant.id {
            return Err(AuthError::Invalid("issued for another tenant".into()));
        }
        Ok(claims)
    }

    /// An access token of `site` with a valid signature, expired or not (revocation).
    pub fn decode_access_ignoring_expiry(
        &self,
        site: &Site,
        token: &str,
    ) -> Result<AccessClaims, AuthError> {
        self.decode(site, token, Some(ACCESS_TYP), true)
    }

    /// How long a deny-list entry must live: past the last moment a token it names could be
    /// accepted — an access token for `jti` and `nbf`; for a family or a session, also any
    /// refresh token of it (the refresh lifetime), so the deny-list alone refuses them even if a
    /// MySQL revocation raced with their issue.
    fn deny_ttl(&self, kind: &str) -> u64 {
        let s = self.settings();
        let span = match kind {
            "fam" | "sid" => s.access_ttl.max(s.session_ttl).max(s.refresh_ttl),
            _ => s.access_ttl,
        };
        span.as_secs() + LEEWAY_SECS + 1
    }

    /// Deny-lists one kind of id (`jti`, `fam`, `sid`).
    pub async fn deny(&self, kind: &str, id: &str) -> Result<(), redis::RedisError> {
        let ttl = self.deny_ttl(kind);
        self.redis()
            .set_ex::<_, _, ()>(self.key(&format!("deny:{kind}:{id}")), 1, ttl)
            .await
    }

    /// Whether `sid` is deny-listed (a signed-out session).
    pub async fn denied(&self, kind: &str, id: &str) -> Result<bool, redis::RedisError> {
        self.redis()
            .exists(self.key(&format!("deny:{kind}:{id}")))
            .await
    }

    /// Refuses the user's tokens issued before now (roles changed, account disabled). Tokens
    /// issued in this same second are refused too: the client refreshes once more.
    pub async fn not_before_now(
        &self,
        tenant_id: i64,
        user_id: i64,
    ) -> Result<(), redis::RedisError> {
        let ttl = self.deny_ttl("nbf");
        self.redis()
            .set_ex::<_, _, ()>(
                self.key(&format!("nbf:{tenant_id}:{user_id}")),
                now_secs() + 1,
                ttl,
            )
            .await
    }
}
