//! The in-memory token and tenant index, fed by watches.
//!
//! Only what a decision needs is kept (a [`TokenRecord`] is a few hundred bytes), so a million
//! tokens fit in well under a gigabyte. Watch events apply within milliseconds, so revocation,
//! expiry changes and new tokens take effect well within a second. A re-list (watch restart)
//! rebuilds the maps and drops what disappeared meanwhile.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use aigw_crds::{
    Branding, Channel, Provider, TENANT_NAMESPACE_PREFIX, Tenant, TenantType, Token, TokenPhase,
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    runtime::watcher::{self, Event},
};

/// What authz needs of a Token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Tenant name (the Tenant CR).
    pub tenant: String,
    /// `namespace/name` of the Token CR, for logs.
    pub cr: String,
    /// MySQL id from the status (a token is indexed only once the operator has mirrored it).
    pub token_id: i64,
    pub owner: String,
    /// Allowed models; empty allows all.
    pub models: Vec<String>,
    /// Total quota in tokens; -1 unlimited.
    pub quota: i64,
    /// Requests per minute; 0 unlimited.
    pub rate_limit: i32,
    /// Expiry as Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub disabled: bool,
    pub exhausted: bool,
    /// What billing last published as used (`status.usedQuota`): the floor authz re-seeds a lost
    /// Redis counter to.
    pub used_floor: i64,
}

/// What authz needs of a Tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// MySQL id from the status (a tenant is indexed only once the operator has mirrored it).
    pub id: i64,
    /// The domains the tenant serves (its status, i.e. without conflicting claims).
    pub domains: Vec<String>,
    pub suspended: bool,
    /// Platform or reseller (which roles its users may hold).
    pub kind: TenantType,
    /// Name shown on the login page.
    pub display_name: String,
    /// Login-page branding.
    pub branding: Option<Branding>,
}

impl TenantRecord {
    /// Whether the tenant serves `host` (lowercase, no port). `*.example.com` matches any name
    /// below `example.com`, as Higress does.
    pub fn serves(&self, host: &str) -> bool {
        self.domains.iter().any(|d| match d.strip_prefix('*') {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            None => d == host,
        })
    }
}

/// Converts a Token CR into its record and key hash; `None` when the token may not be admitted:
///
/// - the operator has not mirrored it yet (no `status.tokenId`), so its usage could not be settled;
/// - it has no `status.keyHash`: the operator writes the hash only once MySQL's unique key has
///   given it to this token, so a Token claiming a hash another token already holds (its
///   `spec.keyHash` alone proves nothing) never reaches the index;
/// - it is being deleted (a finalizer may keep it visible for a while).
pub fn token_record(token: &Token) -> Option<(String, TokenRecord)> {
    if token.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = token.status.as_ref()?;
    let hash = status.key_hash.clone()?;
    let token_id = status.token_id?;
    let ns = token.namespace()?;
    let tenant = ns.strip_prefix(TENANT_NAMESPACE_PREFIX)?.to_owned();
    let expires_at_ms = token
        .spec
        .expires_at
        .as_deref()
        .map(|e| e.parse::<Timestamp>().map_or(0, Timestamp::as_millisecond));
    Some((
        hash,
        TokenRecord {
            tenant,
            cr: format!("{ns}/{}", token.name_any()),
            token_id,
            owner: token.spec.owner.clone(),
            models: token.spec.models.clone(),
            quota: token.spec.quota,
            rate_limit: token.spec.rate_limit,
            expires_at_ms,
            disabled: token.spec.disabled,
            exhausted: status.phase == Some(TokenPhase::Exhausted),
            used_floor: status.used_quota.unwrap_or(0),
        },
    ))
}

/// Converts a Tenant CR into its record; `None` while it is not mirrored (no `status.tenantId`,
/// so its usage could not be billed) or while it is being deleted.
pub fn tenant_record(tenant: &Tenant) -> Option<TenantRecord> {
    if tenant.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = tenant.status.as_ref()?;
    Some(TenantRecord {
        id: status.tenant_id?,
        domains: status.domains.clone(),
        suspended: tenant.spec.suspended,
        kind: tenant.spec.tenant_type,
        display_name: tenant.spec.display_name.clone(),
        branding: tenant.spec.branding.clone(),
    })
}

#[derive(Debug, Default)]
struct Tokens {
    /// Key hash → the tokens whose status claims it, the first MySQL owner (lowest token id)
    /// first. MySQL's unique key gives a hash to one token, so there is one claimant except while
    /// a stale status is being corrected; the lookup then keeps answering for the first owner,
    /// and a later claimant never displaces it, whatever order the watch events come in.
    by_hash: HashMap<String, Vec<Arc<TokenRecord>>>,
    /// `namespace/name` → hash, to drop the old claim when a token changes or goes.
    hash_of: HashMap<String, String>,
}

impl Tokens {
    /// Forgets the token stored under `key` (`namespace/name`), if any; other claimants of its
    /// hash stay.
    fn unlink(&mut self, key: &str) {
        let Some(old) = self.hash_of.remove(key) else {
            return;
        };
        if let Some(claims) = self.by_hash.get_mut(&old) {
            claims.retain(|r| r.cr != key);
            if claims.is_empty() {
                self.by_hash.remove(&old);
            }
        }
    }

    /// Adds a claim of `hash` by the token under `key`.
    fn link(&mut self, key: String, hash: String, record: TokenRecord) {
        self.hash_of.insert(key, hash.clone());
        let claims = self.by_hash.entry(hash).or_default();
        claims.push(Arc::new(record));
        claims.sort_by(|a, b| (a.token_id, &a.cr).cmp(&(b.token_id, &b.cr)));
    }

    fn first(&self, hash: &str) -> Option<Arc<TokenRecord>> {
        self.by_hash.get(hash).and_then(|c| c.first()).cloned()
    }
}

/// The index key of a token: `namespace/name`.
fn token_key(token: &Token) -> String {
    format!(
        "{}/{}",
        token.namespace().unwrap_or_default(),
        token.name_any()
    )
}

/// Channel name → (the models it serves, whether it is a `generic` channel).
type ChannelModels = HashMap<String, (Vec<String>, bool)>;

/// The index. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Index {
    tokens: Arc<RwLock<Tokens>>,
    tenants: Arc<RwLock<HashMap<String, Arc<TenantRecord>>>>,
    /// Models of every serving channel (enabled, Ready), by channel name: what `GET /v1/models`
    /// lists for a token without an allow-list; and whether the channel is `generic`.
    channels: Arc<RwLock<ChannelModels>>,
    tokens_synced: Arc<AtomicBool>,
    tenants_synced: Arc<AtomicBool>,
    channels_synced: Arc<AtomicBool>,
}

/// The models a channel serves, if it serves: enabled and `Ready` (the operator routes it).
pub fn channel_models(channel: &Channel) -> Option<Vec<String>> {
    let ready = channel.status.as_ref().is_some_and(|s| {
        s.common
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    (ready && !channel.spec.disabled).then(|| channel.spec.models.clone())
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-written (each update is one
    // insert/remove), so poisoning is ignored.
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Index {
    /// The token with this key hash.
    pub fn token(&self, hash: &str) -> Option<Arc<TokenRecord>> {
        read(&self.tokens).first(hash)
    }

    /// Whether a serving `generic` channel offers `model`. ai-proxy adds no
    /// `stream_options.include_usage` for a generic provider, so its streams carry usage only if
    /// the client asked for it.
    pub fn generic_serves(&self, model: &str) -> bool {
        read(&self.channels)
            .values()
            .any(|(models, generic)| *generic && models.iter().any(|m| m == model))
    }

    /// Whether some tenant serves `host`.
    pub fn any_tenant_serves(&self, host: &str) -> bool {
        read(&self.tenants).values().any(|t| t.serves(host))
    }

    /// The tenant serving `host` (lowercase, no port) and its name: an exact domain before a
    /// wildcard. The operator gives a domain to one tenant only (`status.domains`).
    pub fn tenant_for_host(&self, host: &str) -> Option<(String, Arc<TenantRecord>)> {
        let tenants = read(&self.tenants);
        tenants
            .iter()
            .find(|(_, t)| t.domains.iter().any(|d| d == host))
            .or_else(|| tenants.iter().find(|(_, t)| t.serves(host)))
            .map(|(name, t)| (name.clone(), t.clone()))
    }

    /// Every served tenant, by name.
    pub fn tenants(&self) -> Vec<(String, Arc<TenantRecord>)> {
        let mut all: Vec<_> = read(&self.tenants)
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The tenant with this name.
    pub fn tenant(&self, name: &str) -> Option<Arc<TenantRecord>> {
        read(&self.tenants).get(name).cloned()
    }

    /// Number of tokens indexed.
    pub fn len(&self) -> usize {
        read(&self.tokens).hash_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every watch has completed its initial list.
    pub fn synced(&self) -> bool {
        self.tokens_synced.load(Ordering::Acquire)
            && self.tenants_synced.load(Ordering::Acquire)
            && self.channels_synced.load(Ordering::Acquire)
    }

    /// The models `token` may call: its allow-list, or every model a serving channel offers;
    /// sorted, without duplicates.
    pub fn models_for(&self, token: &TokenRecord) -> Vec<String> {
        let mut out: Vec<String> = if token.models.is_empty() {
            read(&self.channels)
                .values()
                .flat_map(|(models, _)| models)
                .cloned()
                .collect()
        } else {
            token.models.clone()
        };
        out.sort();
        out.dedup();
        out
    }

    pub fn upsert_channel(&self, channel: &Channel) {
        let mut c = write(&self.channels);
        match channel_models(channel) {
            Some(models) => c.insert(
                channel.name_any(),
                (models, channel.spec.provider == Provider::Generic),
            ),
            None => c.remove(&channel.name_any()),
        };
    }

    pub fn remove_channel(&self, channel: &Channel) {
        write(&self.channels).remove(&channel.name_any());
    }

    fn replace_channels(&self, all: &[Channel]) {
        let fresh = all
            .iter()
            .filter_map(|c| {
                let generic = c.spec.provider == Provider::Generic;
                Some((c.name_any(), (channel_models(c)?, generic)))
            })
            .collect();
        *write(&self.channels) = fresh;
    }

    /// Inserts or replaces a token (in one critical section: a reader never sees it missing).
    pub fn upsert_token(&self, token: &Token) {
        let key = token_key(token);
        let mut t = write(&self.tokens);
        t.unlink(&key);
        if let Some((hash, record)) = token_record(token) {
            t.link(key, hash, record);
        }
    }

    /// Removes a token.
    pub fn remove_token(&self, token: &Token) {
        write(&self.tokens).unlink(&token_key(token));
    }

    fn replace_tokens(&self, all: Vec<Token>) {
        let mut fresh = Tokens::default();
        for token in &all {
            if let Some((hash, record)) = token_record(token) {
                fresh.link(token_key(token), hash, record);
            }
        }
        *write(&self.tokens) = fresh;
    }

    /// Inserts or replaces a tenant; one that may not serve (being deleted, not mirrored) is
    /// removed, so its keys stop at once, not when its finalizer lets go.
    pub fn upsert_tenant(&self, tenant: &Tenant) {
        let mut t = write(&self.tenants);
        match tenant_record(tenant) {
            Some(r) => t.insert(tenant.name_any(), Arc::new(r)),
            None => t.remove(&tenant.name_any()),
        };
    }

    pub fn remove_tenant(&self, tenant: &Tenant) {
        write(&self.tenants).remove(&tenant.name_any());
    }

    fn replace_tenants(&self, all: &[Tenant]) {
        let fresh = all
            .iter()
            .filter_map(|t| Some((t.name_any(), Arc::new(tenant_record(t)?))))
            .collect();
        *write(&self.tenants) = fresh;
    }

    /// Feeds the index from watches until the streams end (they retry with backoff forever).
    /// `selector` restricts both watches (as the operator's `--instance` does).
    pub async fn run(self, client: Client, selector: Option<String>) {
        let cfg = match &selector {
            Some(s) => watcher::Config::default().labels(s),
            None => watcher::Config::default(),
        };
        let (t, n) = (self.clone(), self.clone());
        let tokens = feed(
            watcher::watcher(Api::<Token>::all(client.clone()), cfg.clone()),
            "token",
            Handlers {
                replace: |all: Vec<Token>| self.replace_tokens(all),
                apply: |o: &Token| t.upsert_token(o),
                delete: |o: &Token| t.remove_token(o),
            },
            &self.tokens_synced,
        );
        let c = self.clone();
        let channels = feed(
            watcher::watcher(Api::<Channel>::all(client.clone()), cfg.clone()),
            "channel",
            Handlers {
                replace: |all: Vec<Channel>| self.replace_channels(&all),
                apply: |o: &Channel| c.upsert_channel(o),
                delete: |o: &Channel| c.remove_channel(o),
            },
            &self.channels_synced,
        );
        let tenants = feed(
            watcher::watcher(Api::<Tenant>::all(client), cfg),
            "tenant",
            Handlers {
                replace: |all: Vec<Tenant>| self.replace_tenants(&all),
                apply: |o: &Tenant| n.upsert_tenant(o),
                delete: |o: &Tenant| n.remove_tenant(o),
            },
            &self.tenants_synced,
        );
        tokio::join!(tokens, tenants, channels);
    }
}

/// What to do with each kind of watch event.
struct Handlers<R, A, D> {
    replace: R,
    apply: A,
    delete: D,
}

/// Applies a watch stream to the index: a (re-)list is collected and swapped in whole at its end
/// (so objects deleted while the watch was down disappear), then single events apply one by one.
async fn feed<K, S, R, A, D>(stream: S, kind: &str, h: Handlers<R, A, D>, synced: &AtomicBool)
where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
    R: Fn(Vec<K>),
    A: Fn(&K),
    D: Fn(&K),
{
    let mut staging: Vec<K> = Vec::new();
    let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(stream));
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => staging.clear(),
            Ok(Event::InitApply(o)) => staging.push(o),
            Ok(Event::InitDone) => {
                (h.replace)(std::mem::take(&mut staging));
                synced.store(true, Ordering::Release);
            }
            Ok(Event::Apply(o)) => (h.apply)(&o),
            Ok(Event::Delete(o)) => (h.delete)(&o),
            Err(e) => tracing::warn!(error = %e, kind, "watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A token as the operator leaves it: `status.keyHash` and `status.tokenId` once mirrored.
    fn token(ns: &str, name: &str, hash: Option<&str>, id: Option<i64>) -> Token {
        serde_json::from_value(
            json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"owner": "alice", "keyHash": hash, "expiresAt": "2027-01-01T00:00:00Z"},
            "status": {"keyHash": hash, "tokenId": id}}),
        )
        .unwrap()
    }

    #[test]
    fn wildcard_and_exact_domains() {
        let t = TenantRecord {
            id: 1,
            domains: vec!["api.acme.example".into(), "*.acme.dev".into()],
            suspended: false,
            kind: TenantType::Reseller,
            display_name: "Acme".into(),
            branding: None,
        };
        assert!(t.serves("api.acme.example"));
        assert!(t.serves("eu.acme.dev") && t.serves("a.b.acme.dev"));
        assert!(
            !t.serves("acme.dev") && !t.serves("api.acme.example.evil") && !t.serves("xacme.dev")
        );
    }

    #[test]
    fn a_changed_hash_replaces_the_old_entry_and_delete_removes_it() {
        let index = Index::default();
        index.upsert_token(&token("aigw-acme", "t1", Some("aa"), Some(1)));
        assert_eq!(index.token("aa").unwrap().tenant, "acme");
        assert_eq!(
            index.token("aa").unwrap().expires_at_ms,
            Some(1_798_761_600_000)
        );
        index.upsert_token(&token("aigw-acme", "t1", Some("bb"), Some(1)));
        assert!(index.token("aa").is_none());
        assert!(index.token("bb").is_some());
        index.remove_token(&token("aigw-acme", "t1", None, None));
        assert!(index.is_empty());
        index.upsert_token(&token("aigw-acme", "t2", None, Some(2)));
        assert!(index.is_empty(), "no hash yet: nothing to index");
    }

    #[test]
    fn unmirrored_spec_only_and_deleting_tokens_are_not_admitted() {
        let index = Index::default();
        index.upsert_token(&token("aigw-acme", "new", Some("aa"), None));
        assert!(
            index.token("aa").is_none(),
            "no tokenId: usage could not be settled"
        );
        let mut spec_only = token("aigw-acme", "spec", Some("bb"), Some(3));
        spec_only.status.as_mut().unwrap().key_hash = None;
        index.upsert_token(&spec_only);
        assert!(
            index.token("bb").is_none(),
            "spec.keyHash alone is a claim, not a grant"
        );
        let mut deleting = token("aigw-acme", "gone", Some("cc"), Some(4));
        index.upsert_token(&deleting);
        assert!(index.token("cc").is_some());
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        index.upsert_token(&deleting);
        assert!(
            index.token("cc").is_none(),
            "a deleting token stops at once"
        );
    }

    #[test]
    fn a_second_claim_of_a_hash_never_displaces_the_first_owner() {
        // Whatever order the watch delivers them in, the first MySQL owner answers; removing the
        // intruder leaves the owner in place.
        for intruder_first in [false, true] {
            let index = Index::default();
            let owner = token("aigw-a", "key", Some("aa"), Some(10));
            let intruder = token("aigw-b", "copy", Some("aa"), Some(99));
            if intruder_first {
                index.upsert_token(&intruder);
                index.upsert_token(&owner);
            } else {
                index.upsert_token(&owner);
                index.upsert_token(&intruder);
            }
            assert_eq!(index.token("aa").unwrap().tenant, "a");
            index.remove_token(&intruder);
            assert_eq!(index.token("aa").unwrap().tenant, "a");
            index.replace_tokens(vec![intruder.clone(), owner.clone()]);
            assert_eq!(index.token("aa").unwrap().tenant, "a");
            index.remove_token(&owner);
            assert_eq!(index.token("aa").unwrap().tenant, "b");
        }
    }

    #[test]
    fn deleting_or_unmirrored_tenants_are_not_served() {
        let tenant = |deleting: bool, id: Option<i64>| -> Tenant {
            let mut t: Tenant = serde_json::from_value(json!({
                "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
                "metadata": {"name": "acme"}, "spec": {"type": "reseller", "displayName": "A"},
                "status": {"tenantId": id, "domains": ["api.acme.example"]}}))
            .unwrap();
            if deleting {
                t.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
                );
            }
            t
        };
        let index = Index::default();
        index.upsert_tenant(&tenant(false, Some(1)));
        assert!(index.tenant("acme").is_some());
        index.upsert_tenant(&tenant(true, Some(1)));
        assert!(index.tenant("acme").is_none(), "being deleted");
        index.upsert_tenant(&tenant(false, None));
        assert!(index.tenant("acme").is_none(), "not mirrored");
    }
}
