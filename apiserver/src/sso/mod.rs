//! The platform's single sign-on: an OpenID Connect provider serving every tenant domain under
//! `/oauth/*` (routed there by Higress), with the tenant's branding on its login page, users and
//! roles in MySQL, Ed25519-signed JWTs carrying the tenant and the role list, and a Redis
//! deny-list checked on every management request. `docs/architecture.md` §5e describes the model.
//!
//! The tenant of a request is the one serving its `Host` (from the Tenant CRs, as authz sees
//! them); the issuer is `<scheme>://<host>/oauth`, so a token names the domain it was issued on
//! and is refused on any other.

pub mod jwt;
pub mod keys;
pub mod mail;
pub mod pages;
pub mod password;
pub mod roles;
pub mod store;
pub mod throttle;
pub mod web;

use std::{sync::Arc, time::Duration};

use aigw_crds::TenantType;
use sqlx::MySqlPool;

use crate::authz::index::{Index, TenantRecord};

pub use jwt::{AccessClaims, AuthError, TenantClaim};
pub use roles::Role;

/// How the public URLs are written: behind Higress with TLS, `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheme {
    Https,
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// Lifetimes, limits and names.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Scheme of the issuer and of every link (`https` in production).
    pub scheme: Scheme,
    /// Access and ID tokens.
    pub access_ttl: Duration,
    /// Refresh tokens (each rotation starts a new lifetime, bounded by the family's session).
    pub refresh_ttl: Duration,
    /// Authorization codes.
    pub code_ttl: Duration,
    /// The sign-in session behind the `aigw_sso` cookie (a second client signs in without a
    /// password while it lasts).
    pub session_ttl: Duration,
    /// Invitation links.
    pub invite_ttl: Duration,
    /// Prefix of every Redis key (tests isolate themselves with their own).
    pub redis_prefix: String,
    /// Failed sign-ins of one account within `failure_window` before it is throttled.
    pub account_failures: i64,
    /// Failed sign-ins from one source address within `failure_window` before it is throttled.
    pub address_failures: i64,
    pub failure_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            scheme: Scheme::Https,
            access_ttl: Duration::from_mins(10),
            refresh_ttl: Duration::from_hours(30 * 24),
            code_ttl: Duration::from_mins(1),
            session_ttl: Duration::from_hours(12),
            invite_ttl: Duration::from_hours(72),
            redis_prefix: "aigw:sso:".into(),
            account_failures: 5,
            address_failures: 30,
            failure_window: Duration::from_mins(15),
        }
    }
}

/// The identity provider's state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Sso {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    index: Index,
    db: MySqlPool,
    redis: redis::aio::ConnectionManager,
    keys: keys::Keys,
    mailer: mail::Mailer,
    /// An argon2id hash of a random password: what an unknown user's password is checked
    /// against, so the answer takes as long as for a known one.
    dummy_hash: String,
    pages: pages::Pages,
    /// Password hashes running at once: one per core. argon2id takes 19 MiB and ~20 ms of a core
    /// each; unbounded, a burst of sign-ins would take the blocking pool's 512 threads and
    /// gigabytes of memory.
    hashing: Arc<tokio::sync::Semaphore>,
}

/// How long a sign-in waits for a free hashing slot before it is answered 503.
const HASH_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The tenant a request is for, from its `Host`.
#[derive(Debug, Clone)]
pub struct Site {
    /// The `Host` as sent (lowercase, with a port if one was sent): the issuer's authority.
    pub authority: String,
    /// Tenant CR name.
    pub name: String,
    pub tenant: Arc<TenantRecord>,
    pub scheme: Scheme,
}

impl Site {
    /// `<scheme>://<host>/oauth`.
    pub fn issuer(&self) -> String {
        format!("{}://{}/oauth", self.scheme.as_str(), self.authority)
    }

    pub fn claim(&self) -> TenantClaim {
        TenantClaim {
            id: self.tenant.id,
            name: self.name.clone(),
        }
    }

    pub fn kind(&self) -> TenantType {
        self.tenant.kind
    }
}

impl Sso {
    pub fn new(
        settings: Settings,
        index: Index,
        db: MySqlPool,
        redis: redis::aio::ConnectionManager,
        keys: keys::Keys,
        mailer: mail::Mailer,
    ) -> Result<Self, String> {
        let mut random = [0u8; 32];
        rand::fill(&mut random);
        let dummy_hash = password::hash(&hex::encode(random))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                index,
                db,
                redis,
                keys,
                mailer,
                dummy_hash,
                pages: pages::Pages::new()?,
                hashing: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
                )),
            }),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn db(&self) -> &MySqlPool {
        &self.inner.db
    }

    pub fn redis(&self) -> redis::aio::ConnectionManager {
        self.inner.redis.clone()
    }

    pub fn keys(&self) -> &keys::Keys {
        &self.inner.keys
    }

    pub fn mailer(&self) -> &mail::Mailer {
        &self.inner.mailer
    }

    pub fn pages(&self) -> &pages::Pages {
        &self.inner.pages
    }

    pub fn dummy_hash(&self) -> &str {
        &self.inner.dummy_hash
    }

    /// A slot to hash a password in; `None` when every slot stayed busy for 5 s (the caller
    /// answers 503).
    pub async fn hashing_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(HASH_QUEUE_WAIT, self.inner.hashing.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Redis key `<prefix><rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.inner.settings.redis_prefix)
    }

    /// The site of a request whose `Host` is `host`; `None` for a domain no (active) tenant
    /// serves, or a malformed `Host`. The name is compared lowercase without a trailing dot; the
    /// scheme's default port is dropped (`x:443` is `x` on https), any other port is kept in the
    /// issuer, as the client reached it.
    pub fn site(&self, host: &str) -> Option<Site> {
        let raw = host.trim().to_ascii_lowercase();
        if raw.is_empty()
            || raw.len() > 260
            || !raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        {
            return None;
        }
        let (name, port) = match raw.rsplit_once(':') {
            Some((name, port)) => (name, Some(port.parse::<u16>().ok()?)),
            None => (raw.as_str(), None),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let scheme = self.inner.settings.scheme;
        let authority = match (scheme, port) {
            (_, None) | (Scheme::Https, Some(443)) | (Scheme::Http, Some(80)) => name.to_owned(),
            (_, Some(p)) => format!("{name}:{p}"),
        };
        let (tenant_name, tenant) = self.inner.index.tenant_for_host(name)?;
        if tenant.suspended {
            return None;
        }
        Some(Site {
            authority,
            name: tenant_name,
            tenant,
            scheme,
        })
    }
}

impl Sso {
    /// Replaces a user's roles in a tenant of `kind`; tokens issued before take no effect any
    /// more (the next refresh carries the new roles).
    pub async fn assign_roles(
        &self,
        kind: TenantType,
        tenant_id: i64,
        user_id: i64,
        roles: &[Role],
    ) -> Result<(), String> {
        roles::check_available(kind, roles)?;
        store::set_roles(self.db(), tenant_id, user_id, roles)
            .await
            .map_err(|e| e.to_string())?;
        self.not_before_now(tenant_id, user_id)
            .await
            .map_err(|e| e.to_string())
    }

    /// Enables or disables a user; disabling ends every token of theirs at once.
    pub async fn set_active(
        &self,
        tenant_id: i64,
        user_id: i64,
        active: bool,
    ) -> Result<bool, String> {
        let found = store::set_active(self.db(), tenant_id, user_id, active)
            .await
            .map_err(|e| e.to_string())?;
        if found && !active {
            self.not_before_now(tenant_id, user_id)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(found)
    }
}

/// Invites the first owner of the tenant named `tenant` (the `bootstrap-owner` command): refused
/// once the tenant has an owner. Returns the link (also mailed).
pub async fn bootstrap_owner(
    db: &MySqlPool,
    tenant: &str,
    username: &str,
    email: &str,
    domain: Option<&str>,
    scheme: Scheme,
    mailer: &mail::Mailer,
) -> Result<String, String> {
    store::check_username(username)?;
    store::check_email(email)?;
    let tenant_id = store::tenant_id(db, tenant)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no tenant {tenant:?} in MySQL (is its Tenant CR Ready?)"))?;
    if store::has_owner(db, tenant_id)
        .await
        .map_err(|e| e.to_string())?
    {
        return Err(format!(
            "tenant {tenant:?} has an owner already: owners invite further people through the API"
        ));
    }
    let domain = match domain {
        Some(d) => d.to_owned(),
        None => store::first_domain(db, tenant_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("tenant {tenant:?} serves no domain yet; pass --domain"))?,
    };
    let display: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = ?")
        .bind(tenant_id)
        .fetch_one(db)
        .await
        .map_err(|e| e.to_string())?;
    let inv = store::Invitation {
        tenant_id,
        email: email.to_owned(),
        username: username.to_owned(),
        roles: vec![Role::Owner],
        sales_id: None,
    };
    let ttl = Settings::default().invite_ttl;
    let token = store::create_invitation(db, &inv, None, secs(ttl))
        .await
        .map_err(|e| e.to_string())?;
    let issuer = format!("{}://{domain}/oauth", scheme.as_str());
    tracing::info!(tenant, username, action = "bootstrap-owner", "audit");
    mail::send_invitation(mailer, &issuer, &display, &inv, &token, ttl).await
}

/// SHA-256 of `s`, hex: how codes, refresh tokens, sessions and invitations are looked up, so a
/// leaked table or Redis dump holds no usable secret.
pub fn digest(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A fresh random secret of 32 bytes, base64url.
pub fn secret() -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// A fresh random id of 16 bytes, hex (32 characters).
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    hex::encode(b)
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Seconds of a duration, as the JWT and Redis want them.
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
