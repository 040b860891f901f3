//! Per-token rate limits and quota reservations in Redis — the one definition that the authz gate
//! (admit) and the billing worker (settle) share.
//!
//! Keys of one token (`{h}` is the token's key hash, a Redis Cluster hash tag so all of a token's
//! keys live on one shard):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `aigw:{h}:tat` | string | GCRA theoretical arrival time (ms) of the RPM limit |
//! | `aigw:{h}:used` | string | quota used, in LLM tokens, settled by billing |
//! | `aigw:{h}:reserved` | string | sum of open reservations |
//! | `aigw:{h}:resv` | hash | reservation id → reserved amount |
//! | `aigw:{h}:resv:exp` | sorted set | reservation id, scored by its expiry (ms) |
//! | `aigw:{h}:settled:<id>` | string | marks a settled reservation (idempotent settle) |
//!
//! [`ADMIT`] decides a request in one atomic call: it reclaims expired reservations, checks the
//! RPM limit (GCRA, burst = one minute of requests) and the remaining quota, and only if both pass
//! records the arrival and reserves the estimate. Concurrent requests therefore can never reserve
//! more than the quota. [`SETTLE`] replaces reservations by the actual amounts, once per event, for
//! a whole batch of one token's events in one call.

use std::fmt;

/// Keys of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKeys {
    pub tat: String,
    pub used: String,
    pub reserved: String,
    pub reservations: String,
    pub expiries: String,
}

impl TokenKeys {
    pub fn new(key_hash: &str) -> Self {
        let p = format!("aigw:{{{key_hash}}}");
        Self {
            tat: format!("{p}:tat"),
            used: format!("{p}:used"),
            reserved: format!("{p}:reserved"),
            reservations: format!("{p}:resv"),
            expiries: format!("{p}:resv:exp"),
        }
    }

    /// The marker that makes settling reservation `id` idempotent.
    pub fn settled(&self, id: &str) -> String {
        format!("{}:settled:{id}", self.used.trim_end_matches(":used"))
    }

    /// The keys in the order [`ADMIT`] and [`SETTLE`] expect.
    pub fn all(&self) -> [&str; 5] {
        [
            &self.tat,
            &self.used,
            &self.reserved,
            &self.reservations,
            &self.expiries,
        ]
    }
}

/// A reservation made at admission, as passed to billing in `x-aigw-reservation`:
/// `<id>:<amount>`, or `none` when the token has no quota to reserve against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    None,
    Held { id: String, amount: i64 },
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Held { id, amount } => write!(f, "{id}:{amount}"),
        }
    }
}

impl std::str::FromStr for Reservation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(Self::None);
        }
        let (id, amount) = s
            .split_once(':')
            .ok_or_else(|| format!("reservation {s:?} is not <id>:<amount>"))?;
        let amount = amount
            .parse()
            .map_err(|e| format!("reservation amount {amount:?}: {e}"))?;
        if id.is_empty() || id.contains(':') {
            return Err(format!("reservation id {id:?} is empty or has ':'"));
        }
        Ok(Self::Held {
            id: id.to_owned(),
            amount,
        })
    }
}

/// Requests admitted whose usage has not been settled yet, across all tokens: a sorted set of
/// event ids scored by when their reservation expires ([`PENDING`]) and a hash of event id → the
/// usage event to bill if no report arrives by then ([`PENDING_EVENTS`]). Written by [`ADMIT`];
/// cleared by the billing worker when the event is billed; swept by the worker when expired, so a
/// served request whose report was lost is still charged (at its admission estimate).
pub const PENDING: &str = "aigw:pending";
/// See [`PENDING`].
pub const PENDING_EVENTS: &str = "aigw:pending:events";
/// Event id → the fallback grant authz issued with it (see [`RETIRE`]); kept and forgotten with
/// the pending event.
pub const PENDING_GRANTS: &str = "aigw:pending:grants";

/// The two pending keys; [`PendingKeys::default`] is [`PENDING`] and [`PENDING_EVENTS`]. Tests use
/// their own so that they never see (or sweep) each other's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKeys {
    pub set: String,
    pub events: String,
    pub grants: String,
}

impl Default for PendingKeys {
    fn default() -> Self {
        Self {
            set: PENDING.to_owned(),
            events: PENDING_EVENTS.to_owned(),
            grants: PENDING_GRANTS.to_owned(),
        }
    }
}

impl PendingKeys {
    /// Keys under `prefix` instead of `aigw:pending`.
    pub fn under(prefix: &str) -> Self {
        Self {
            set: prefix.to_owned(),
            events: format!("{prefix}:events"),
            grants: format!("{prefix}:grants"),
        }
    }
}

/// KEYS: tat, used, reserved, resv, resv:exp, and optionally [`PENDING`], [`PENDING_EVENTS`],
/// [`PENDING_GRANTS`].
/// ARGV: rpm (0 = none), quota (-1 = unlimited), estimate, reservation ttl (ms), reservation id,
/// and optionally the most reservations the token may hold at once (0 = no cap), the pending
/// usage event to record under the reservation id (empty = none), the least `used` may be
/// (billing's last published total: a lower or missing counter is re-seeded to it), and the
/// fallback grant to record with the pending event (`<grant>:<key hash>`).
/// Returns `{0, reserved}` admitted (0 reserved when unlimited), `{1, retry_after_ms}` over the
/// RPM limit, `{2, remaining}` quota does not cover the estimate, `{3, in_flight}` the token holds
/// as many reservations as it may.
pub const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local est = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local id = ARGV[5]
local cap = tonumber(ARGV[6] or '0')
local pending = ARGV[7] or ''
local floor = tonumber(ARGV[8] or '0')

local new_tat = nil
if rpm > 0 then
  local interval = 60000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  new_tat = tat + interval
  if new_tat - now > 60000 then
    return {1, math.ceil(new_tat - now - 60000)}
  end
end

if quota >= 0 then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
  if #expired > 0 then
    local freed = 0
    for _, rid in ipairs(expired) do
      freed = freed + tonumber(redis.call('HGET', KEYS[4], rid) or '0')
      redis.call('HDEL', KEYS[4], rid)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    redis.call('DECRBY', KEYS[3], freed)
  end
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used < floor then
    -- Redis lost the counter (flush, failover without persistence): re-seed it from what billing
    -- last published (the Token's status.usedQuota), never below.
    redis.call('SET', KEYS[2], floor)
    used = floor
  end
  local reserved = tonumber(redis.call('GET', KEYS[3]) or '0')
  local remaining = quota - used - reserved
  if est > remaining then
    return {2, remaining}
  end
  if cap > 0 then
    local in_flight = redis.call('HLEN', KEYS[4])
    if in_flight >= cap then
      return {3, in_flight}
    end
  end
end

if new_tat then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
end
if pending ~= '' and KEYS[7] then
  redis.call('ZADD', KEYS[6], now + ttl, id)
  redis.call('HSET', KEYS[7], id, pending)
  if KEYS[8] and ARGV[9] then
    redis.call('HSET', KEYS[8], id, ARGV[9])
  end
end
if quota >= 0 then
  redis.call('HSET', KEYS[4], id, est)
  redis.call('ZADD', KEYS[5], now + ttl, id)
  redis.call('INCRBY', KEYS[3], est)
  return {0, est}
end
return {0, 0}
";

/// Takes up to ARGV[2] pending events whose reservation expired before now (KEYS: [`PENDING`],
/// [`PENDING_EVENTS`]; ARGV[1]: grace in ms beyond the expiry). Returns their ids and events as a
/// flat list; they stay recorded until [`FORGET_PENDING`] removes them once billed or handed on.
pub const EXPIRED_PENDING: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local ev = redis.call('HGET', KEYS[2], id)
  if ev then
    table.insert(out, id)
    table.insert(out, ev)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
";

/// Forgets pending events (KEYS: [`PENDING`], [`PENDING_EVENTS`], [`PENDING_GRANTS`]; ARGV: event
/// ids): their usage has been billed, or handed to the usage topic to be.
pub const FORGET_PENDING: &str = r"
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  if KEYS[3] then
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
return #ARGV
";

/// The Redis key that marks an event as fully applied by the billing worker (`dedupe` is the
/// event's dedupe key, `<tenant>/<event id>`): a report of it is dropped.
pub fn seen_key(dedupe: &str) -> String {
    format!("aigw:seen:{dedupe}")
}

/// Retires the first pass of a request that Envoy's fallback redirect sends to another tier,
/// when authz admits the second pass on the first pass's grant: the first pass is forgotten as
/// pending (the sweep never bills it), its reservation is released, and its event is marked as
/// applied (its report — the top tier's 5xx/429, or none — is dropped), so the request is billed
/// once, as the second pass. The grant is a random value authz issued with the event and
/// recorded in [`PENDING_GRANTS`]; it appears in no event, row or answer.
/// KEYS: [`PENDING`], [`PENDING_EVENTS`], reserved, resv, resv:exp (of the first pass's token),
/// the event's [`seen_key`], [`PENDING_GRANTS`]. ARGV: event id, seen-marker ttl (s), the grant
/// record (`<grant>:<key hash>`) as read.
/// Returns 1 when retired now, 0 when the event is not pending with that grant (unknown, billed,
/// or retired by an earlier second pass): the grant is used up.
pub const RETIRE: &str = r"
local id = ARGV[1]
if not redis.call('HGET', KEYS[2], id) or redis.call('HGET', KEYS[7], id) ~= ARGV[3] then
  return 0
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[7], id)
local held = redis.call('HGET', KEYS[4], id)
if held then
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('DECRBY', KEYS[3], tonumber(held))
end
redis.call('SET', KEYS[6], '1', 'EX', tonumber(ARGV[2]))
return 1
";

/// Settles any number of events of one token in one atomic call.
/// KEYS: tat, used, reserved, resv, resv:exp, then one settle marker per event.
/// ARGV: marker ttl (s), then per event (in KEYS order) its reservation id (or `none`) and its
/// actual amount.
/// Returns `{settled, released, existed, added, used}`: how many events were settled now (an event
/// whose marker exists was settled before and changes nothing), the sum of the reservations they
/// released (0 for an expired reservation or none), whether `used` existed before the call, how
/// much the call added to `used`, and `used` after it (so `used - added` is the value before: the
/// quota alerts' crossings are exact).
pub const SETTLE: &str = r"
local ttl = tonumber(ARGV[1])
local settled = 0
local released = 0
local added = 0
local existed = redis.call('EXISTS', KEYS[2])
for i = 6, #KEYS do
  local id = ARGV[2 + (i - 6) * 2]
  local actual = tonumber(ARGV[3 + (i - 6) * 2])
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    settled = settled + 1
    if id ~= 'none' then
      local amt = redis.call('HGET', KEYS[4], id)
      if amt then
        released = released + tonumber(amt)
        redis.call('HDEL', KEYS[4], id)
        redis.call('ZREM', KEYS[5], id)
        redis.call('DECRBY', KEYS[3], tonumber(amt))
      end
    end
    redis.call('INCRBY', KEYS[2], actual)
    added = added + actual
  end
end
return {settled, released, existed, added, tonumber(redis.call('GET', KEYS[2]) or '0')}
";

/// Raises a token's `used` counter to at least ARGV[1] (KEYS[1]: `used`). Billing calls it with the
/// MySQL total after a settle found the counter missing, so a Redis that lost its keys is re-seeded
/// from the exact record instead of restarting every quota at 0. Returns 1 when it raised it.
pub const RAISE_USED: &str = r"
local floor = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used < floor then
  redis.call('SET', KEYS[1], floor)
  return 1
end
return 0
";

/// Why a Redis server's configuration would lose billing state, if it would: with a memory limit,
/// any policy but `noeviction` evicts keys — `allkeys-*` the quota counters, `volatile-*` the dedupe
/// keys and settle markers (which have a TTL), and a lost dedupe key bills a late duplicate twice.
/// Pure; `policy` is `CONFIG GET maxmemory-policy`, `maxmemory` is `CONFIG GET maxmemory`.
pub fn eviction_risk(policy: &str, maxmemory: u64) -> Option<String> {
    (maxmemory > 0 && policy != "noeviction").then(|| {
        format!(
            "Redis maxmemory-policy is {policy} with maxmemory {maxmemory}: quota counters or dedupe \
             keys could be evicted. Use maxmemory-policy noeviction (or no memory limit)"
        )
    })
}

/// Checks a live Redis with [`eviction_risk`]; `Ok` when it is safe or the server does not allow
/// `CONFIG GET` (managed services), with a warning for no persistence at all.
#[cfg(feature = "redis")]
pub async fn check_redis<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> Result<(), String> {
    let get = |name: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        cmd
    };
    let Ok(policy) = get("maxmemory-policy")
        .query_async::<Vec<String>>(conn)
        .await
    else {
        tracing::warn!(
            "cannot read the Redis configuration (CONFIG GET refused); assuming it never evicts quota counters"
        );
        return Ok(());
    };
    let maxmemory: Vec<String> = get("maxmemory").query_async(conn).await.unwrap_or_default();
    let policy = policy.get(1).cloned().unwrap_or_default();
    let maxmemory = maxmemory.get(1).and_then(|m| m.parse().ok()).unwrap_or(0);
    if let Some(risk) = eviction_risk(&policy, maxmemory) {
        return Err(risk);
    }
    let aof: Vec<String> = get("appendonly")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let save: Vec<String> = get("save").query_async(conn).await.unwrap_or_default();
    if aof.get(1).is_some_and(|v| v == "no") && save.get(1).is_some_and(String::is_empty) {
        tracing::warn!(
            "Redis has no persistence (appendonly no, no save points): after a restart, quota counters are re-seeded from billing's totals, and reservations in flight are lost"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_header_round_trips() {
        let r = Reservation::Held {
            id: "01J".into(),
            amount: 4096,
        };
        assert_eq!(r.to_string(), "01J:4096");
        assert_eq!("01J:4096".parse::<Reservation>().unwrap(), r);
        assert_eq!("none".parse::<Reservation>().unwrap(), Reservation::None);
        assert!("x".parse::<Reservation>().is_err());
        assert!(":5".parse::<Reservation>().is_err());
        assert!("a:b".parse::<Reservation>().is_err());
    }

    #[test]
    fn eviction_policies_that_lose_counters_are_named() {
        assert!(eviction_risk("allkeys-lru", 1 << 30).is_some());
        assert!(eviction_risk("allkeys-random", 1).is_some());
        assert!(
            eviction_risk("allkeys-lru", 0).is_none(),
            "no memory limit: never evicts"
        );
        assert!(eviction_risk("noeviction", 1 << 30).is_none());
        assert!(
            eviction_risk("volatile-lru", 1 << 30).is_some(),
            "dedupe keys have a TTL"
        );
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let k = TokenKeys::new("abc");
        assert_eq!(
            k.all(),
            [
                "aigw:{abc}:tat",
                "aigw:{abc}:used",
                "aigw:{abc}:reserved",
                "aigw:{abc}:resv",
                "aigw:{abc}:resv:exp"
            ]
        );
        assert_eq!(k.settled("r1"), "aigw:{abc}:settled:r1");
    }
}
