//! What the worker needs to know about tenants, tokens, channels and prices, loaded from the MySQL
//! mirror the operator keeps, and refreshed periodically.

use std::collections::HashMap;

use rust_decimal::Decimal;
use sqlx::MySqlPool;

use crate::pricing::Price;

/// Tenant id of the platform default price list (as the operator mirrors it).
pub const PLATFORM_TENANT: u64 = 0;

/// A token as billing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: u64,
    pub tenant_id: u64,
    pub user_id: u64,
    pub key_hash: String,
    pub quota: i64,
    /// The Token CR this row mirrors.
    pub namespace: String,
    pub cr_name: String,
}

/// A channel as billing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    pub id: u64,
    /// Upstream cost per model.
    pub upstream: HashMap<String, Price>,
}

/// A snapshot of the MySQL mirror.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    tenants_by_slug: HashMap<String, u64>,
    tenant_ids: std::collections::HashSet<u64>,
    tokens: HashMap<u64, TokenRow>,
    channels: HashMap<String, ChannelRow>,
    /// Tenant id → model → price (looked up per event without allocating).
    prices: HashMap<u64, HashMap<String, Price>>,
    /// Currency of each tenant's price list (0: the platform's).
    currencies: HashMap<u64, String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CostEntry {
    model: String,
    input: String,
    output: String,
    #[serde(default)]
    cached_input: Option<String>,
}

/// Why the mirror could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("mysql: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("channel {channel}: upstream cost is not readable: {reason}")]
    Cost { channel: String, reason: String },
}

fn id(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Directory {
    /// Loads the whole mirror (tens of thousands of rows at most; one query per table).
    pub async fn load(db: &MySqlPool) -> Result<Self, LoadError> {
        let mut dir = Self::default();
        let tenants: Vec<(i64, String)> = sqlx::query_as("SELECT id, slug FROM tenants")
            .fetch_all(db)
            .await?;
        for (tid, slug) in tenants {
            dir.tenant_ids.insert(id(tid));
            dir.tenants_by_slug.insert(slug, id(tid));
        }
        let tokens: Vec<(i64, i64, i64, String, i64, String, String)> = sqlx::query_as(
            "SELECT id, tenant_id, user_id, key_hash, quota, namespace, cr_name FROM tokens",
        )
        .fetch_all(db)
        .await?;
        for (tid, tenant, user, key_hash, quota, namespace, cr_name) in tokens {
            dir.tokens.insert(
                id(tid),
                TokenRow {
                    id: id(tid),
                    tenant_id: id(tenant),
                    user_id: id(user),
                    key_hash,
                    quota,
                    namespace,
                    cr_name,
                },
            );
        }
        let channels: Vec<(i64, String, Option<String>)> =
            sqlx::query_as("SELECT id, name, CAST(upstream_cost AS CHAR) FROM channels")
                .fetch_all(db)
                .await?;
        for (cid, name, cost) in channels {
            let entries: Vec<CostEntry> = match cost.as_deref() {
                None | Some("" | "null") => Vec::new(),
                Some(text) => serde_json::from_str(text).map_err(|e| LoadError::Cost {
                    channel: name.clone(),
                    reason: e.to_string(),
                })?,
            };
            let mut upstream = HashMap::new();
            for e in entries {
                let parse = |s: &str| {
                    s.parse::<Decimal>().map_err(|err| LoadError::Cost {
                        channel: name.clone(),
                        reason: format!("{}: {s:?}: {err}", e.model),
                    })
                };
                let price = Price {
                    input: parse(&e.input)?,
                    output: parse(&e.output)?,
                    cached_input: e.cached_input.as_deref().map(parse).transpose()?,
                };
                upstream.insert(e.model.clone(), price);
            }
            dir.channels.insert(
                name,
                ChannelRow {
                    id: id(cid),
                    upstream,
                },
            );
        }
        let prices: Vec<(i64, String, Decimal, Decimal, Option<Decimal>, String)> = sqlx::query_as(
            "SELECT tenant_id, model, input_price, output_price, cached_input_price, currency FROM pricing",
        )
        .fetch_all(db)
        .await?;
        for (tenant, model, input, output, cached_input, currency) in prices {
            dir.currencies.insert(id(tenant), currency);
            dir.prices.entry(id(tenant)).or_default().insert(
                model,
                Price {
                    input,
                    output,
                    cached_input,
                },
            );
        }
        Ok(dir)
    }

    /// The numeric tenant id of an event's tenant field (a numeric id, or a tenant slug when the
    /// tenant had no id yet at admission), if the tenant exists.
    pub fn tenant(&self, tenant: &str) -> Option<u64> {
        match tenant.parse::<u64>() {
            Ok(tid) => self.tenant_ids.contains(&tid).then_some(tid),
            Err(_) => self.tenants_by_slug.get(tenant).copied(),
        }
    }

    pub fn token(&self, token: &str) -> Option<&TokenRow> {
        token.parse::<u64>().ok().and_then(|t| self.tokens.get(&t))
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelRow> {
        self.channels.get(name)
    }

    /// A tenant's own price for `model`.
    pub fn tenant_price(&self, tenant: u64, model: &str) -> Option<&Price> {
        if tenant == PLATFORM_TENANT {
            return None;
        }
        self.prices.get(&tenant)?.get(model)
    }

    /// The platform default price for `model`.
    pub fn platform_price(&self, model: &str) -> Option<&Price> {
        self.prices.get(&PLATFORM_TENANT)?.get(model)
    }

    /// The currency of a tenant's price list (`PLATFORM_TENANT`: the platform's).
    pub fn currency(&self, tenant: u64) -> Option<&str> {
        self.currencies.get(&tenant).map(String::as_str)
    }

    /// Sizes, for logs.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.tenant_ids.len(),
            self.tokens.len(),
            self.channels.len(),
            self.prices.values().map(HashMap::len).sum(),
        )
    }
}
