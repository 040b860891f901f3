//! The in-memory token and tenant index, fed by watches.
//!
//! Only what a decision needs is kept, in one allocation per token (a [`TokenRecord`]), so a
//! million tokens take about 215 MB. Watch events apply within milliseconds, so revocation,
//! expiry changes and new tokens take effect well within a second. A re-list (watch restart)
//! rebuilds the maps and drops what disappeared meanwhile.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use aigw_crds::{
    Branding, Channel, Provider, TENANT_NAMESPACE_PREFIX, Tenant, TenantType, Token, TokenPhase,
};
use futures::StreamExt;
use hashbrown::{HashTable, hash_table};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    runtime::watcher::{self, Event},
};

/// What authz needs of a Token, in one allocation: the tenant, owner and allow-list are shared
/// with every other token holding the same (interned by the index), and the Token CR is known by
/// a digest of its `namespace/name`, not by the name itself. About 160 bytes; with the index's two
/// hash tables about 215 bytes a token (`tests/index_memory.rs` counts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// SHA-256 of the key (`status.keyHash`, decoded).
    pub hash: [u8; 32],
    /// The Token CR: the first 16 bytes of SHA-256 of `namespace/name` ([`cr_digest`]).
    pub cr: [u8; 16],
    /// Tenant name (the Tenant CR).
    pub tenant: Arc<str>,
    pub owner: Arc<str>,
    /// Allowed models; empty allows all.
    pub models: Arc<[Box<str>]>,
    /// MySQL id from the status (a token is indexed only once the operator has mirrored it).
    pub token_id: i64,
    /// Total quota in tokens; -1 unlimited.
    pub quota: i64,
    /// What billing last published as used (`status.usedQuota`): the floor authz re-seeds a lost
    /// Redis counter to.
    pub used_floor: i64,
    /// Expiry as Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    /// Requests per minute; 0 unlimited.
    pub rate_limit: i32,
    pub disabled: bool,
    pub exhausted: bool,
}

/// The identity the index keeps of a Token CR: the first 16 bytes of SHA-256 of
/// `namespace/name`. A collision would need 2^64 names; a tenant cannot aim at another's token.
pub fn cr_digest(namespace: &str, name: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let full = Sha256::new()
        .chain_update(namespace.as_bytes())
        .chain_update(b"/")
        .chain_update(name.as_bytes())
        .finalize();
    let mut out = [0; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A `keyHash` (64 hex characters) as its 32 bytes; `None` when it is not one.
pub fn key_hash_bytes(hex_hash: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
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

/// Converts a Token CR into its record, with `interned` values; `None` when the token may not be
/// admitted:
///
/// - the operator has not mirrored it yet (no `status.tokenId`), so its usage could not be settled;
/// - it has no `status.keyHash` (or one that is not 64 hex characters): the operator writes the
///   hash only once MySQL's unique key has given it to this token, so a Token claiming a hash
///   another token already holds (its `spec.keyHash` alone proves nothing) never reaches the index;
/// - it is being deleted (a finalizer may keep it visible for a while).
fn token_record(token: &Token, interned: &mut Interned) -> Option<TokenRecord> {
    if token.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = token.status.as_ref()?;
    let hash = key_hash_bytes(status.key_hash.as_deref()?)?;
    let token_id = status.token_id?;
    let ns = token.namespace()?;
    let tenant = ns.strip_prefix(TENANT_NAMESPACE_PREFIX)?;
    let expires_at_ms = token
        .spec
        .expires_at
        .as_deref()
        .map(|e| e.parse::<Timestamp>().map_or(0, Timestamp::as_millisecond));
    Some(TokenRecord {
        hash,
        cr: token_key(token),
        tenant: interned.string(tenant),
        owner: interned.string(&token.spec.owner),
        models: interned.models(&token.spec.models),
        token_id,
        quota: token.spec.quota,
        used_floor: status.used_quota.unwrap_or(0),
        expires_at_ms,
        rate_limit: token.spec.rate_limit,
        disabled: token.spec.disabled,
        exhausted: status.phase == Some(TokenPhase::Exhausted),
    })
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

/// Interned values: one allocation per distinct value, shared by every record holding it.
#[derive(Debug, Default)]
struct Interned {
    strings: HashSet<Arc<str>>,
    model_lists: HashSet<Arc<[Box<str>]>>,
}

impl Interned {
    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(known) = self.strings.get(s) {
            return known.clone();
        }
        let fresh: Arc<str> = Arc::from(s);
        self.strings.insert(fresh.clone());
        fresh
    }

    fn models(&mut self, models: &[String]) -> Arc<[Box<str>]> {
        let list: Vec<Box<str>> = models.iter().map(|m| Box::from(m.as_str())).collect();
        if let Some(known) = self.model_lists.get(list.as_slice()) {
            return known.clone();
        }
        let fresh: Arc<[Box<str>]> = Arc::from(list);
        self.model_lists.insert(fresh.clone());
        fresh
    }

    /// Forgets the values only `record` (just unlinked) still used. Each value is counted once
    /// per record however many requests hold the record, so a count of two is "the set and this
    /// record" (three when tenant and owner are the same string).
    fn release(&mut self, record: &TokenRecord) {
        let shared = usize::from(Arc::ptr_eq(&record.tenant, &record.owner));
        for s in [&record.tenant, &record.owner] {
            if Arc::strong_count(s) == 2 + shared {
                self.strings.remove(s);
            }
        }
        if Arc::strong_count(&record.models) == 2 {
            self.model_lists.remove(&record.models);
        }
    }
}

/// The order among claimants of one hash: the first MySQL owner (lowest token id) first.
fn rank(a: &Arc<TokenRecord>, b: &Arc<TokenRecord>) -> std::cmp::Ordering {
    (a.token_id, a.cr).cmp(&(b.token_id, b.cr))
}

#[derive(Debug, Default)]
struct Tokens {
    /// Key hash → the first claimant of it. MySQL's unique key gives a hash to one token, so
    /// there is one claimant except while a stale status is being corrected; the lookup then
    /// keeps answering for the first owner, and a later claimant never displaces it, whatever
    /// order the watch events come in.
    by_hash: HashTable<Arc<TokenRecord>>,
    /// Every claimant of a hash claimed more than once, the first first (rare).
    contested: HashMap<[u8; 32], Vec<Arc<TokenRecord>>>,
    /// Token CR ([`TokenRecord::cr`]) → its record, to drop the old claim when a token changes or
    /// goes.
    by_cr: HashTable<Arc<TokenRecord>>,
    /// Keyed hashing for both tables: hashes and names are chosen by tenants, so the table
    /// positions must not be predictable.
    hasher: RandomState,
    interned: Interned,
}

impl Tokens {
    /// Forgets the token `cr`, if any; other claimants of its hash stay.
    fn unlink(&mut self, cr: &[u8; 16]) {
        let hasher = &self.hasher;
        let Ok(entry) = self.by_cr.find_entry(hasher.hash_one(cr), |r| &r.cr == cr) else {
            return;
        };
        let (record, _) = entry.remove();
        let at = hasher.hash_one(record.hash);
        if let Some(claims) = self.contested.get_mut(&record.hash) {
            claims.retain(|r| !Arc::ptr_eq(r, &record));
            let first = claims.first().cloned();
            if claims.len() <= 1 {
                self.contested.remove(&record.hash);
            }
            if let (Some(first), Some(slot)) =
                (first, self.by_hash.find_mut(at, |r| r.hash == record.hash))
            {
                *slot = first;
            }
        } else if let Ok(entry) = self.by_hash.find_entry(at, |r| Arc::ptr_eq(r, &record)) {
            entry.remove();
        }
        self.interned.release(&record);
    }

    /// Adds `token`, unless it may not be admitted (see [`token_record`]).
    fn link(&mut self, token: &Token) {
        let Some(record) = token_record(token, &mut self.interned) else {
            return;
        };
        let record = Arc::new(record);
        let cr = record.cr;
        let hasher = &self.hasher;
        self.by_cr
            .insert_unique(hasher.hash_one(cr), record.clone(), |r| {
                hasher.hash_one(r.cr)
            });
        match self.by_hash.entry(
            hasher.hash_one(record.hash),
            |r| r.hash == record.hash,
            |r| hasher.hash_one(r.hash),
        ) {
            hash_table::Entry::Vacant(slot) => {
                slot.insert(record);
            }
            hash_table::Entry::Occupied(mut slot) => {
                let claims = self
                    .contested
                    .entry(record.hash)
                    .or_insert_with(|| vec![slot.get().clone()]);
                claims.push(record);
                claims.sort_by(rank);
                if let Some(first) = claims.first() {
                    *slot.get_mut() = first.clone();
                }
            }
        }
    }

    fn first(&self, hash: &[u8; 32]) -> Option<Arc<TokenRecord>> {
        self.by_hash
            .find(self.hasher.hash_one(hash), |r| &r.hash == hash)
            .cloned()
    }
}

/// The index key of a token: the digest of `namespace/name`.
fn token_key(token: &Token) -> [u8; 16] {
    cr_digest(&token.namespace().unwrap_or_default(), &token.name_any())
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
    /// The token with this key hash (64 hex characters).
    pub fn token(&self, hash: &str) -> Option<Arc<TokenRecord>> {
        self.token_by_digest(&key_hash_bytes(hash)?)
    }

    /// The token whose key has this SHA-256.
    pub fn token_by_digest(&self, hash: &[u8; 32]) -> Option<Arc<TokenRecord>> {
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
        read(&self.tokens).by_cr.len()
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
            token.models.iter().map(ToString::to_string).collect()
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
        t.link(token);
    }

    /// Removes a token.
    pub fn remove_token(&self, token: &Token) {
        write(&self.tokens).unlink(&token_key(token));
    }

    fn replace_tokens(&self, all: Vec<Token>) {
        let mut fresh = Tokens::default();
        for token in &all {
            fresh.link(token);
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

    /// A 64-hex-character key hash made of `s` repeated.
    fn h(s: &str) -> String {
        s.repeat(32)
    }

    /// A token as the operator leaves it: `status.keyHash` and `status.tokenId` once mirrored.
    fn token(ns: &str, name: &str, hash: Option<&str>, id: Option<i64>) -> Token {
        let hash = hash.map(h);
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
        assert_eq!(index.token(&h("aa")).unwrap().tenant.as_ref(), "acme");
        assert_eq!(
            index.token(&h("aa")).unwrap().expires_at_ms,
            Some(1_798_761_600_000)
        );
        index.upsert_token(&token("aigw-acme", "t1", Some("bb"), Some(1)));
        assert!(index.token(&h("aa")).is_none());
        assert!(index.token(&h("bb")).is_some());
        index.remove_token(&token("aigw-acme", "t1", None, None));
        assert!(index.is_empty());
        index.upsert_token(&token("aigw-acme", "t2", None, Some(2)));
        assert!(index.is_empty(), "no hash yet: nothing to index");
    }

    #[test]
    fn shared_values_are_interned_and_forgotten_with_their_last_token() {
        let index = Index::default();
        let (a, b) = (
            token("aigw-acme", "a", Some("aa"), Some(1)),
            token("aigw-acme", "b", Some("bb"), Some(2)),
        );
        index.upsert_token(&a);
        index.upsert_token(&b);
        let (ra, rb) = (
            index.token(&h("aa")).unwrap(),
            index.token(&h("bb")).unwrap(),
        );
        assert!(Arc::ptr_eq(&ra.owner, &rb.owner) && Arc::ptr_eq(&ra.tenant, &rb.tenant));
        assert!(Arc::ptr_eq(&ra.models, &rb.models));
        drop((ra, rb));
        let interned = |i: &Index| read(&i.tokens).interned.strings.len();
        assert_eq!(interned(&index), 2, "tenant and owner");
        index.remove_token(&a);
        assert_eq!(interned(&index), 2, "b still uses both");
        // A request still holding b's record does not keep its values in the index.
        let held = index.token(&h("bb")).unwrap();
        index.remove_token(&b);
        assert_eq!(interned(&index), 0);
        assert!(read(&index.tokens).interned.model_lists.is_empty());
        assert_eq!(&*held.owner, "alice");
        // An owner named like its tenant shares one interned string, released all the same.
        let mut same = token("aigw-alice", "c", Some("cc"), Some(4));
        same.spec.owner = "alice".into();
        index.upsert_token(&same);
        assert_eq!(interned(&index), 1);
        index.remove_token(&same);
        assert_eq!(interned(&index), 0);
        // A status hash that is not 64 hex characters is not a hash: nothing to index.
        let mut odd = token("aigw-acme", "odd", Some("aa"), Some(3));
        odd.status.as_mut().unwrap().key_hash = Some("not-a-hash".into());
        index.upsert_token(&odd);
        assert!(index.is_empty());
    }

    #[test]
    fn unmirrored_spec_only_and_deleting_tokens_are_not_admitted() {
        let index = Index::default();
        index.upsert_token(&token("aigw-acme", "new", Some("aa"), None));
        assert!(
            index.token(&h("aa")).is_none(),
            "no tokenId: usage could not be settled"
        );
        let mut spec_only = token("aigw-acme", "spec", Some("bb"), Some(3));
        spec_only.status.as_mut().unwrap().key_hash = None;
        index.upsert_token(&spec_only);
        assert!(
            index.token(&h("bb")).is_none(),
            "spec.keyHash alone is a claim, not a grant"
        );
        let mut deleting = token("aigw-acme", "gone", Some("cc"), Some(4));
        index.upsert_token(&deleting);
        assert!(index.token(&h("cc")).is_some());
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        index.upsert_token(&deleting);
        assert!(
            index.token(&h("cc")).is_none(),
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
            assert_eq!(index.token(&h("aa")).unwrap().tenant.as_ref(), "a");
            index.remove_token(&intruder);
            assert_eq!(index.token(&h("aa")).unwrap().tenant.as_ref(), "a");
            index.replace_tokens(vec![intruder.clone(), owner.clone()]);
            assert_eq!(index.token(&h("aa")).unwrap().tenant.as_ref(), "a");
            index.remove_token(&owner);
            assert_eq!(index.token(&h("aa")).unwrap().tenant.as_ref(), "b");
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
