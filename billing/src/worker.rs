//! The billing worker: Kafka `usage.events` → price → ClickHouse `usage_logs` → Redis settle →
//! MySQL aggregates → dedupe keys → offset commit.
//!
//! Every step is idempotent, so a batch replayed after a crash anywhere changes nothing twice:
//!
//! | step | what makes a replay harmless |
//! |---|---|
//! | dedupe | copies inside a batch dropped; keys already in Redis (recorded once an earlier batch was fully applied, alerts included, just before its commit) dropped |
//! | ClickHouse insert (at once with the Redis settle) | `ReplacingMergeTree` keyed by tenant and event id; exact queries use `FINAL` |
//! | Redis settle | per-event marker set in the same Lua call as the deduction ([`aigw_common::quota::SETTLE`]) |
//! | MySQL aggregates | per-partition offset watermark updated in the same transaction ([`crate::ledger`]) |
//! | dedupe keys | recorded only after all of the above succeeded, never before |
//! | offset commit | last; a crash before it replays the batch through the rows above |
//!
//! Redis settles before MySQL so that MySQL's `tokens.used_quota` never counts an event Redis has
//! not: a counter Redis lost is re-seeded from it as a lower bound, whatever other workers have in
//! flight. A batch whose step fails is retried; once all the sinks (dedupe keys included) are done,
//! the retry resumes after them.
//!
//! Redis round trips per batch: one `MGET` (dedupe lookup), one pipeline (every token's settle and
//! the billed events' pending records forgotten, the scripts loaded at its head) and one pipeline
//! of dedupe keys; plus, per token whose counter was missing, a MySQL read and one `RAISE_USED`.
//!
//! A message that cannot be billed (malformed, unknown tenant, no platform price, counts out of
//! range) goes to the dead-letter topic with the reason before its offset is committed.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use aigw_common::{
    events::{AlertEvent, AlertKind, TokenRef},
    quota::{Reservation, SETTLE, TokenKeys},
    shutdown::Shutdown,
};
use aigw_plugin_core::{Outcome, TokenUsage, UsageEvent};
use anyhow::Context as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};
use rust_decimal::{Decimal, prelude::ToPrimitive};
use serde::{Deserialize, Serialize};

use crate::{
    directory::{Directory, TokenRow},
    ledger,
    pricing::{self, Priced, Usage},
};

/// Largest amount a `Decimal(12,6)` column holds, in millionths.
const MAX_MICROS: i64 = 999_999_999_999;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub brokers: String,
    pub group: String,
    pub topic: String,
    pub dlq_topic: String,
    /// Where quota and channel alerts go (`alert.events`, [`crate::alerts`]).
    pub alert_topic: String,
    /// Most messages per batch.
    pub batch_size: usize,
    /// Longest wait for a batch to fill once its first message arrived.
    pub batch_wait: Duration,
    /// How long a dedupe key (and a settle marker) lives in Redis.
    pub dedupe_ttl: Duration,
    /// How often the MySQL mirror (tenants, tokens, channels, prices) is reloaded.
    pub refresh: Duration,
    /// Kafka static group membership id (e.g. the pod name): a restarted worker takes its
    /// partitions back at once instead of waiting for the old session to time out.
    pub instance: Option<String>,
    /// Where authz records admitted requests; billed ones are forgotten there.
    pub pending: aigw_common::quota::PendingKeys,
}

/// Where token usage goes after each batch (the Token CR status writer, [`crate::status`]).
pub type StatusSink = tokio::sync::mpsc::Sender<crate::status::Used>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Step {
    step: &'static str,
}

/// Labels of the per-tenant request counter: bounded (tenants are), never by token or user.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
    /// `usage_logs.status`: `success`, `error`, `no_usage`, `truncated`, `unreported`, `estimated`, …
    status: String,
}

/// Labels of the per-channel request counter (a channel the mirror does not know is `unknown`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
    /// `ok`, or `failed` when the upstream failed it ([`crate::alerts::channel_failed`]).
    result: &'static str,
}

/// Labels of the quota alerts sent: by tenant (bounded), never by token.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaAlert {
    tenant: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenKind {
    tenant: String,
    /// prompt or completion.
    kind: &'static str,
}

fn step_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
}

/// Worker metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    consumed: Counter,
    priced: Counter,
    deduped: Counter,
    dead_lettered: Family<Reason, Counter>,
    unknown_token: Counter,
    upstream_cost_missing: Counter,
    batch_errors: Counter,
    consumer_restarts: Counter,
    reseeded: Counter,
    batch_seconds: Histogram,
    step_seconds: Family<Step, Histogram, fn() -> Histogram>,
    lag: Gauge,
    requests: Family<TenantLabels, Counter>,
    channel_requests: Family<ChannelLabels, Counter>,
    tokens: Family<TokenKind, Counter>,
    quota_alerts: Family<QuotaAlert, Counter>,
}

impl Metrics {
    /// The bounded usage families: per tenant, per channel, quota alerts.
    fn register_usage(&self, registry: &mut Registry) {
        registry.register(
            "quota_alerts",
            "Quota alerts sent to alert.events, by tenant and kind (quotaLow, quotaExhausted)",
            self.quota_alerts.clone(),
        );
        registry.register(
                "requests",
                "Billed requests by tenant and usage_logs status (the dashboards' and alerts' error rate)",
                self.requests.clone(),
            );
        registry.register(
            "channel_requests",
            "Billed requests by upstream channel and result (ok, or failed by the upstream: no answer, 5xx, 429)",
            self.channel_requests.clone(),
        );
        registry.register(
            "tokens",
            "Billed tokens by tenant and kind (prompt, completion)",
            self.tokens.clone(),
        );
    }

    /// Counts one billed event by tenant, channel and tokens.
    fn count(&self, b: &Billed, channel_known: bool) {
        let status = b.row.status.clone();
        self.requests
            .get_or_create(&TenantLabels {
                tenant: b.event.tenant.clone(),
                status: status.clone(),
            })
            .inc();
        self.channel_requests
            .get_or_create(&ChannelLabels {
                channel: if channel_known {
                    b.event.channel.clone()
                } else {
                    "unknown".to_owned()
                },
                result: if crate::alerts::channel_failed(b.event.outcome, b.event.status) {
                    "failed"
                } else {
                    "ok"
                },
            })
            .inc();
        for (kind, n) in [
            ("prompt", b.row.prompt_tokens),
            ("completion", b.row.completion_tokens),
        ] {
            self.tokens
                .get_or_create(&TokenKind {
                    tenant: b.event.tenant.clone(),
                    kind,
                })
                .inc_by(u64::from(n));
        }
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            consumed: Counter::default(),
            priced: Counter::default(),
            deduped: Counter::default(),
            dead_lettered: Family::default(),
            unknown_token: Counter::default(),
            upstream_cost_missing: Counter::default(),
            batch_errors: Counter::default(),
            consumer_restarts: Counter::default(),
            reseeded: Counter::default(),
            batch_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            step_seconds: Family::new_with_constructor(step_histogram),
            lag: Gauge::default(),
            requests: Family::default(),
            channel_requests: Family::default(),
            tokens: Family::default(),
            quota_alerts: Family::default(),
        };
        m.register_usage(registry);
        registry.register(
            "worker_consumed",
            "Messages read from usage.events",
            m.consumed.clone(),
        );
        registry.register(
            "worker_priced",
            "Events priced and written",
            m.priced.clone(),
        );
        registry.register(
            "worker_deduped",
            "Copies of already-billed events dropped",
            m.deduped.clone(),
        );
        registry.register(
            "worker_dead_lettered",
            "Messages sent to the dead-letter topic, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "worker_unknown_token",
            "Events billed whose token is not in the mirror (no quota settled)",
            m.unknown_token.clone(),
        );
        registry.register(
            "worker_upstream_cost_missing",
            "Events whose channel has no upstream cost for the model (upstream_cost recorded as 0)",
            m.upstream_cost_missing.clone(),
        );
        registry.register(
            "worker_batch_errors",
            "Batches that failed a step and were retried",
            m.batch_errors.clone(),
        );
        registry.register(
            "worker_quota_reseeded",
            "Quota counters found missing in Redis and re-seeded from MySQL",
            m.reseeded.clone(),
        );
        registry.register(
            "worker_consumer_restarts",
            "Kafka consumers replaced after a fatal error (e.g. a fenced static member)",
            m.consumer_restarts.clone(),
        );
        registry.register(
            "worker_batch_seconds",
            "Time to apply one batch",
            m.batch_seconds.clone(),
        );
        registry.register(
            "worker_step_seconds",
            "Time of each step of a batch (parse, dedupe, price, dead_letter, clickhouse_redis (the two run at once), mysql, seen, alerts, commit)",
            m.step_seconds.clone(),
        );
        registry.register(
            "worker_consumer_lag",
            "Messages behind the end of the assigned partitions",
            m.lag.clone(),
        );
        m
    }
}

/// One `usage_logs` row. `Decimal(12,6)` travels as an `i64` count of millionths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct UsageLogRow {
    pub event_id: String,
    pub trace_id: String,
    pub tenant_id: u64,
    pub user_id: u64,
    pub token_id: u64,
    pub channel_id: u64,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    pub reasoning_tokens: u32,
    pub total_tokens: u32,
    pub cost: i64,
    pub platform_cost: i64,
    pub upstream_cost: i64,
    pub latency_ms: u32,
    pub status: String,
    pub error_msg: String,
    pub created_at: u32,
    /// ISO 4217 code of the prices the row was priced at (migration 0002).
    pub currency: String,
}

/// A message read from Kafka.
#[derive(Debug, Clone)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

impl Msg {
    fn from_owned(m: &OwnedMessage) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }
}

/// Per partition, the offset after the last message of `batch`: what to commit, and how far the
/// MySQL watermark moves.
pub fn next_offsets(batch: &[Msg]) -> std::collections::BTreeMap<i32, i64> {
    let mut next = std::collections::BTreeMap::new();
    for m in batch {
        let e = next.entry(m.partition).or_insert(0);
        *e = (*e).max(m.offset + 1);
    }
    next
}

/// An event ready to be written.
#[derive(Debug, Clone)]
pub struct Billed {
    pub partition: i32,
    pub offset: i64,
    pub dedupe: String,
    pub event: UsageEvent,
    pub token: Option<TokenRow>,
    pub priced: Priced,
    pub row: UsageLogRow,
    pub upstream_known: bool,
}

/// Why a message goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: &'static str,
    pub detail: String,
}

fn dead(reason: &'static str, detail: impl Into<String>) -> DeadLetter {
    DeadLetter {
        reason,
        detail: detail.into(),
    }
}

fn micros(d: Decimal) -> Option<i64> {
    let m = (d.round_dp(pricing::SCALE) * Decimal::from(1_000_000u32)).to_i64()?;
    (0..=MAX_MICROS).contains(&m).then_some(m)
}

fn count(name: &'static str, v: Option<u64>) -> Result<u32, DeadLetter> {
    u32::try_from(v.unwrap_or(0)).map_err(|_| {
        dead(
            "out_of_range",
            format!("{name} {v:?} exceeds the UInt32 column"),
        )
    })
}

fn status(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Complete => "success",
        Outcome::NoUsage => "no_usage",
        Outcome::Truncated => "truncated",
        Outcome::UpstreamError => "error",
        Outcome::Unreported => "unreported",
    }
}

/// One event priced: its token (if known), the amounts and the ClickHouse row.
#[derive(Debug, Clone)]
pub struct Bill {
    pub token: Option<TokenRow>,
    pub priced: Priced,
    pub row: UsageLogRow,
    /// The channel had an upstream cost for the model (else `upstream_cost` is recorded as 0).
    pub upstream_known: bool,
    /// The usage billed in place of the reported one (an estimate; see [`charged_usage`]).
    pub charged: Option<TokenUsage>,
}

/// A `bill` span per event that carries a trace context, child of ingest's span (when traces
/// are exported; none otherwise).
fn trace_spans(billed: &[Billed]) -> Vec<tracing::Span> {
    if !aigw_common::telemetry::enabled() {
        return Vec::new();
    }
    billed
        .iter()
        .filter_map(|b| {
            let parent = b.event.trace_parent.as_deref()?;
            let span = tracing::info_span!(
                "bill",
                trace_id = b.row.trace_id.as_str(),
                tenant_id = b.event.tenant.as_str(),
                user_id = b.event.user.as_str(),
                event_id = b.event.event_id.as_str(),
                model = b.event.model.as_str(),
                tokens = b.row.total_tokens,
                status = b.row.status.as_str(),
            );
            aigw_common::telemetry::set_parent(
                &span,
                aigw_common::telemetry::from_traceparent(Some(parent)),
            );
            Some(span)
        })
        .collect()
}

/// The result of pricing one event.
pub type Billing = Result<Bill, DeadLetter>;

/// Prices one event against the directory. Pure: no I/O.
pub fn bill(dir: &Directory, event: &UsageEvent) -> Billing {
    let tenant_id = dir.tenant(&event.tenant).ok_or_else(|| {
        dead(
            "unknown_tenant",
            format!("tenant {:?} is unknown", event.tenant),
        )
    })?;
    let token = dir.token(&event.token).cloned();
    if let Some(t) = &token
        && t.tenant_id != tenant_id
    {
        return Err(dead(
            "tenant_mismatch",
            format!(
                "token {} belongs to tenant {}, not {tenant_id}",
                t.id, t.tenant_id
            ),
        ));
    }
    // A served response without usage is billed at authz's admission estimate, never at 0
    // (docs/architecture.md §5b, "Billing policy"); with no estimate either, it is dead-lettered
    // for a person to price.
    let charged = charged_usage(event)?;
    let u = charged.as_ref().unwrap_or(&event.usage);
    let usage = Usage {
        prompt_tokens: u.prompt_tokens.unwrap_or(0),
        completion_tokens: u.completion_tokens.unwrap_or(0),
        cached_input_tokens: u.cached_input_tokens.unwrap_or(0),
    };
    // One tenant's rows never mix currencies: its own list must be in the platform's currency
    // (the operator refuses a Pricing that is not; this catches a platform list that changed).
    let platform_currency = dir
        .currency(crate::directory::PLATFORM_TENANT)
        .unwrap_or_default();
    if dir.tenant_price(tenant_id, &event.model).is_some()
        && let Some(own) = dir.currency(tenant_id)
        && own != platform_currency
    {
        return Err(dead(
            "currency_mismatch",
            format!("tenant {tenant_id} prices in {own}, the platform in {platform_currency}"),
        ));
    }
    let channel = dir.channel(&event.channel);
    let upstream = channel.and_then(|c| c.upstream.get(&event.model));
    let priced = pricing::price(
        &event.model,
        &usage,
        dir.tenant_price(tenant_id, &event.model),
        dir.platform_price(&event.model),
        upstream,
    )
    .map_err(|e| dead("unpriced", e.to_string()))?;
    let money = |name: &'static str, d: Decimal| {
        micros(d).ok_or_else(|| dead("out_of_range", format!("{name} {d} exceeds Decimal(12,6)")))
    };
    let total = u
        .total_tokens
        .unwrap_or(usage.prompt_tokens + usage.completion_tokens);
    let row = UsageLogRow {
        event_id: event.event_id.clone(),
        // The request's trace (authz → reporter → ingest → here), else its event id.
        trace_id: event
            .trace_parent
            .as_deref()
            .and_then(aigw_common::telemetry::trace_id)
            .unwrap_or_else(|| event.event_id.clone()),
        tenant_id,
        user_id: token.as_ref().map_or(0, |t| t.user_id),
        token_id: token
            .as_ref()
            .map_or_else(|| event.token.parse().unwrap_or(0), |t| t.id),
        channel_id: channel.map_or(0, |c| c.id),
        model: event.model.clone(),
        prompt_tokens: count("promptTokens", u.prompt_tokens)?,
        completion_tokens: count("completionTokens", u.completion_tokens)?,
        cached_tokens: count("cachedInputTokens", u.cached_input_tokens)?,
        reasoning_tokens: count("reasoningTokens", u.reasoning_tokens)?,
        total_tokens: count("totalTokens", Some(total))?,
        cost: money("cost", priced.cost)?,
        platform_cost: money("platform_cost", priced.platform_cost)?,
        upstream_cost: money("upstream_cost", priced.upstream_cost.unwrap_or_default())?,
        latency_ms: u32::try_from(event.latency_ms()).unwrap_or(u32::MAX),
        status: match (&charged, event.outcome) {
            (Some(_), Outcome::Unreported) => "estimated_unreported".to_owned(),
            (Some(_), _) => "estimated".to_owned(),
            (None, outcome) => status(outcome).to_owned(),
        },
        error_msg: event.error.clone().unwrap_or_default(),
        created_at: u32::try_from(event.ended_at_ms / 1000)
            .map_err(|_| dead("out_of_range", format!("endedAtMs {}", event.ended_at_ms)))?,
        currency: platform_currency.to_owned(),
    };
    Ok(Bill {
        token,
        priced,
        row,
        upstream_known: upstream.is_some(),
        charged,
    })
}

/// The usage to bill instead of the reported one, if any: for a served response (2xx, or status 0
/// when the report never arrived and the pending sweep sent authz's estimate) whose usage is
/// missing or cut short, authz's estimate — the reported prompt count where there is one, and the
/// estimated output limit. Errors when there is nothing to bill from.
pub fn charged_usage(event: &UsageEvent) -> Result<Option<TokenUsage>, DeadLetter> {
    // Status 0 from the plugin: the stream ended before any response header (the client went
    // away while the upstream worked): billed like a served response, at the estimate.
    let served = event.status == 0 || (200..300).contains(&event.status);
    let missing = match event.outcome {
        Outcome::NoUsage | Outcome::Truncated | Outcome::Unreported => true,
        Outcome::Complete => event.usage.is_empty(),
        Outcome::UpstreamError => false,
    };
    if !(served && missing) {
        return Ok(None);
    }
    let Some(estimate) = &event.estimate else {
        return Err(dead(
            "unmetered",
            format!(
                "a served response ({}, {:?}) without usage and without an admission estimate",
                event.status, event.outcome
            ),
        ));
    };
    Ok(Some(TokenUsage {
        prompt_tokens: event.usage.prompt_tokens.or(estimate.prompt_tokens),
        completion_tokens: estimate.completion_tokens,
        cached_input_tokens: event.usage.cached_input_tokens,
        ..TokenUsage::default()
    }))
}

/// The Redis key that marks an event as fully applied (shared with authz, which marks a first
/// pass retired by a fallback).
pub use aigw_common::quota::seen_key;

/// A consumer of the usage topic in the worker's group, with manual commits.
fn subscribe(settings: &Settings) -> anyhow::Result<StreamConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000");
    if let Some(id) = &settings.instance {
        config.set("group.instance.id", id);
    }
    let consumer: StreamConsumer = config.create().context("kafka consumer")?;
    consumer
        .subscribe(&[&settings.topic])
        .context("subscribe")?;
    Ok(consumer)
}

/// What one batch has done so far, kept across its retries.
#[derive(Debug, Default)]
pub struct BatchState {
    /// Its dead letters are on Kafka.
    pub dead_lettered: bool,
    /// Its events are counted in the channel windows.
    pub health_counted: bool,
    /// The alerts it found (quota crossings are found only by the attempt that settled them).
    pub alerts: Vec<AlertEvent>,
    /// Tokens whose counter Redis did not have (a new token, or a lost counter): judged from
    /// MySQL's total once the batch is in it.
    pub deferred: Vec<Deferred>,
    /// They are on Kafka.
    pub alerts_sent: bool,
    /// What the sinks did, once all of them have (a retry then resumes after them).
    applied: Option<Applied>,
    /// Tokens whose `used` counter Redis did not have when settled, to re-seed from MySQL; kept
    /// until re-seeded (a retry's settle finds the counter its first attempt created).
    reseed: Vec<TokenRow>,
}

/// A batch after its sinks: its billed events, how many copies were dropped, and the settle.
#[derive(Debug)]
struct Applied {
    billed: Vec<Billed>,
    deduped: u64,
    settled: Settled,
}

/// A token settled without a Redis counter to judge its crossing by.
#[derive(Debug, Clone)]
pub struct Deferred {
    token: TokenRow,
    tenant: String,
    added: i64,
    at_ms: i64,
}

/// What a batch's settle found: token id → the token and its `used` after the batch.
type Settled = HashMap<u64, (TokenRow, i64)>;

/// The value an event's seen key takes: `1`, or for an event the sweep billed at its estimate,
/// what was billed (so a late report adds only what it used beyond it).
fn seen_value(event: &UsageEvent) -> String {
    if event.outcome == Outcome::Unreported {
        seen_estimated(&event.usage)
    } else {
        "1".to_owned()
    }
}

/// A quota alert record.
fn quota_alert(
    kind: AlertKind,
    token: &TokenRow,
    tenant: &str,
    used: i64,
    at_ms: i64,
) -> AlertEvent {
    AlertEvent {
        id: format!("{}:{}:{}", kind.as_str(), token.id, token.quota),
        kind,
        tenant: Some(tenant.to_owned()),
        token: Some(TokenRef {
            namespace: token.namespace.clone(),
            name: token.cr_name.clone(),
        }),
        used: Some(used),
        quota: Some(token.quota),
        channel: None,
        requests: None,
        failures: None,
        at_ms,
    }
}

/// The worker's connections and state.
pub struct Worker {
    settings: Settings,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    ch: clickhouse::Client,
    redis: redis::aio::ConnectionManager,
    /// The digest `SETTLE` is called by.
    settle_sha: String,
    db: sqlx::MySqlPool,
    dir: Directory,
    dir_loaded: Instant,
    metrics: Metrics,
    status: Option<StatusSink>,
    health: crate::alerts::ChannelHealth,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Worker {
    pub async fn connect(
        settings: Settings,
        ch: clickhouse::Client,
        redis: redis::Client,
        db: sqlx::MySqlPool,
        metrics: Metrics,
        status: Option<StatusSink>,
    ) -> anyhow::Result<Self> {
        let consumer = subscribe(&settings)?;
        let producer = crate::ingest::producer(&settings.brokers, Duration::from_secs(10))
            .context("kafka producer")?;
        // One batch is one settle pipeline of up to `batch_size` events: the client's default
        // response timeout (500 ms) could expire while Redis is still applying it, and the retry
        // would then settle nothing and so lose what the settle found (counters to re-seed,
        // quota crossings).
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut redis = redis::aio::ConnectionManager::new_with_config(redis, config)
            .await
            .context("redis")?;
        aigw_common::quota::check_redis(&mut redis)
            .await
            .map_err(anyhow::Error::msg)?;
        let dir = Directory::load(&db)
            .await
            .context("load the MySQL mirror")?;
        Ok(Self {
            settings,
            consumer: Arc::new(consumer),
            producer,
            ch,
            redis,
            settle_sha: redis::Script::new(SETTLE).get_hash().to_owned(),
            db,
            dir,
            dir_loaded: Instant::now(),
            metrics,
            status,
            health: crate::alerts::ChannelHealth::default(),
        })
    }

    /// Consumes until `shutdown`. A batch that fails a step is retried as a whole (every step is
    /// idempotent) until it succeeds or the worker stops; on stop, uncommitted work is replayed by
    /// whoever consumes next.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut lag_task = spawn_lag(
            self.consumer.clone(),
            self.metrics.lag.clone(),
            shutdown.clone(),
        );
        let mut backoff = Duration::from_millis(200);
        'outer: loop {
            if let Some(fatal) = self.fatal_error() {
                // A fatal consumer error (e.g. `FencedInstanceId` after a broker restart with
                // static membership) leaves this consumer unable to commit, ever: retrying the
                // batch would spin forever. A new consumer rejoins the group; what was not
                // committed is delivered again and applied once (every step is idempotent).
                tracing::error!(error = %fatal, "fatal kafka consumer error; rejoining with a new consumer");
                self.metrics.consumer_restarts.inc();
                lag_task.abort();
                self.consumer = Arc::new(subscribe(&self.settings)?);
                lag_task = spawn_lag(
                    self.consumer.clone(),
                    self.metrics.lag.clone(),
                    shutdown.clone(),
                );
            }
            let batch = tokio::select! {
                () = shutdown.wait() => break,
                b = self.collect() => b?,
            };
            if batch.is_empty() {
                continue;
            }
            // Dead letters are sent once per batch even when a later step fails and the batch is
            // retried (after a crash they may repeat; they carry their source offset); alerts
            // found on the first attempt are kept for the retries.
            let mut state = BatchState::default();
            loop {
                let started = Instant::now();
                match self.apply(&batch, &mut state).await {
                    Ok(()) => {
                        self.metrics
                            .batch_seconds
                            .observe(started.elapsed().as_secs_f64());
                        backoff = Duration::from_millis(200);
                        break;
                    }
                    Err(e) => {
                        self.metrics.batch_errors.inc();
                        tracing::warn!(
                            error = format!("{e:#}"),
                            messages = batch.len(),
                            "batch failed; retrying"
                        );
                        if self.fatal_error().is_some() {
                            // This consumer can never commit again: drop the batch (it is
                            // redelivered to the new consumer) and rejoin above.
                            continue 'outer;
                        }
                        tokio::select! {
                            () = shutdown.wait() => break 'outer,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        lag_task.abort();
        Ok(())
    }

    /// The consumer's fatal error, if it has had one (it is then unusable).
    fn fatal_error(&self) -> Option<String> {
        self.consumer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    async fn collect(&self) -> anyhow::Result<Vec<Msg>> {
        let first = match self.consumer.recv().await {
            Ok(m) => m.detach(),
            Err(e) => {
                // Transient (broker down, rebalance): librdkafka reconnects by itself.
                tracing::warn!(error = %e, "kafka receive error");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok(Vec::new());
            }
        };
        let mut batch = vec![Msg::from_owned(&first)];
        let deadline = tokio::time::Instant::now() + self.settings.batch_wait;
        while batch.len() < self.settings.batch_size {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(Msg::from_owned(&m.detach())),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive error");
                    break;
                }
                Err(_) => break,
            }
        }
        self.metrics.consumed.inc_by(batch.len() as u64);
        Ok(batch)
    }

    async fn refresh(&mut self, force: bool) -> anyhow::Result<()> {
        let age = self.dir_loaded.elapsed();
        if age >= self.settings.refresh || (force && age >= Duration::from_secs(1)) {
            self.dir = Directory::load(&self.db)
                .await
                .context("reload the MySQL mirror")?;
            self.dir_loaded = Instant::now();
        }
        Ok(())
    }

    /// Applies one batch; see the module docs for the order and why it is safe to repeat.
    pub async fn apply(&mut self, batch: &[Msg], state: &mut BatchState) -> anyhow::Result<()> {
        let mut clock = Instant::now();
        // Once the sinks are done, a retry resumes after them: a fresh pass would settle nothing
        // (its events are marked) and so could not find again what the settle found.
        let mut applied = match state.applied.take() {
            Some(done) => done,
            None => self.sinks(batch, state, &mut clock).await?,
        };
        let finished = self.finish(batch, state, &mut applied, &mut clock).await;
        if finished.is_err() {
            state.applied = Some(applied);
        }
        finished
    }

    /// Steps 1–7: parse, dedupe, price, dead letters, ClickHouse and Redis settle (at once), MySQL.
    async fn sinks(
        &mut self,
        batch: &[Msg],
        state: &mut BatchState,
        clock: &mut Instant,
    ) -> anyhow::Result<Applied> {
        self.refresh(false).await?;
        // 1. Parse and dedupe inside the batch. 2. Drop events already fully applied.
        // (Duplicates are counted once the batch is committed, so a retry does not count twice.)
        let (mut parsed, mut dead_letters, mut deduped) = parse_batch(batch);
        self.lap(clock, "parse");
        deduped += self.drop_seen(&mut parsed).await?;
        self.lap(clock, "dedupe");
        // 3. Price. An unknown name may be a stale mirror: reload once and try again.
        let mut attempt = self.price_all(&parsed);
        if attempt
            .iter()
            .any(|r| matches!(r, Err(d) if matches!(d.reason, "unknown_tenant" | "unpriced")))
        {
            self.refresh(true).await?;
            attempt = self.price_all(&parsed);
        }
        let mut billed = Vec::with_capacity(parsed.len());
        for ((m, event, dedupe), result) in parsed.into_iter().zip(attempt) {
            match result {
                Ok(bill) => {
                    // From here on the event is what was billed: the estimate replaces missing
                    // usage for the quota settle and the MySQL aggregates alike.
                    let mut event = event;
                    if let Some(u) = bill.charged {
                        event.usage = u;
                        event.estimated = true;
                    }
                    billed.push(Billed {
                        partition: m.partition,
                        offset: m.offset,
                        dedupe,
                        event,
                        token: bill.token,
                        priced: bill.priced,
                        row: bill.row,
                        upstream_known: bill.upstream_known,
                    });
                }
                Err(d) => dead_letters.push((m, d)),
            }
        }
        self.lap(clock, "price");
        // Each billed request's span, in its own trace, open until the batch is done.
        let _spans = trace_spans(&billed);
        // 4. Dead letters are on Kafka before anything is committed.
        if !state.dead_lettered {
            self.dead_letter(&dead_letters).await?;
            state.dead_lettered = true;
        }
        self.lap(clock, "dead_letter");
        // 5. ClickHouse and 6. Redis at once (neither needs the other; both are replayable):
        // ClickHouse rows, and in Redis the reservations settled and quota deducted once per
        // event, the events no longer pending (the sweep would otherwise bill their estimate).
        let (inserted, settled) =
            tokio::join!(self.insert_rows(&billed), self.settle(&billed, state));
        inserted?;
        let settled = settled?;
        self.lap(clock, "clickhouse_redis");
        // 7. MySQL aggregates, guarded by the offset watermark.
        ledger::apply(&self.db, &self.settings.topic, batch, &billed)
            .await
            .context("mysql aggregates")?;
        self.lap(clock, "mysql");
        Ok(Applied {
            billed,
            deduped,
            settled,
        })
    }

    /// Steps 8–11, after the sinks: re-seeds, alerts, the dedupe keys, the offset commit, metrics
    /// and status.
    async fn finish(
        &mut self,
        batch: &[Msg],
        state: &mut BatchState,
        applied: &mut Applied,
        clock: &mut Instant,
    ) -> anyhow::Result<()> {
        let Applied {
            billed,
            deduped,
            settled,
        } = applied;
        self.reseed(state, settled).await?;
        self.deferred_alerts(state).await?;
        if !state.health_counted {
            let changes = self.channel_alerts(billed);
            state.alerts.extend(changes);
            state.health_counted = true;
        }
        if !state.alerts_sent {
            self.send_alerts(&state.alerts).await?;
            state.alerts_sent = true;
        }
        self.lap(clock, "alerts");
        // 9. Only now: the events count as seen.
        self.record_seen(billed).await?;
        self.lap(clock, "seen");
        // 10. Commit offsets.
        self.commit(batch)?;
        self.lap(clock, "commit");
        self.metrics.deduped.inc_by(*deduped);
        self.metrics.priced.inc_by(billed.len() as u64);
        let unknown = billed.iter().filter(|b| b.token.is_none()).count();
        self.metrics.unknown_token.inc_by(unknown as u64);
        let no_cost = billed.iter().filter(|b| !b.upstream_known).count();
        self.metrics.upstream_cost_missing.inc_by(no_cost as u64);
        for b in billed.iter() {
            self.metrics
                .count(b, self.dir.channel(&b.event.channel).is_some());
        }
        // 11. Token CR status, off the hot path and rate-limited by the writer.
        self.report_status(settled);
        Ok(())
    }

    /// Inserts the billed events' rows into ClickHouse, in one insert.
    async fn insert_rows(&self, billed: &[Billed]) -> anyhow::Result<()> {
        if billed.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .ch
            .insert::<UsageLogRow>("usage_logs")
            .await
            .context("clickhouse insert")?;
        for b in billed {
            insert.write(&b.row).await.context("clickhouse write")?;
        }
        insert.end().await.context("clickhouse insert end")
    }

    /// Records the billed events' dedupe keys (a swept estimate is marked as such, so a late
    /// report can still add its excess).
    async fn record_seen(&self, billed: &[Billed]) -> anyhow::Result<()> {
        if !billed.is_empty() {
            let mut pipe = redis::pipe();
            let ttl = self.settings.dedupe_ttl.as_secs().max(1);
            for b in billed {
                pipe.cmd("SET")
                    .arg(seen_key(&b.dedupe))
                    .arg(seen_value(&b.event))
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            let mut conn = self.redis.clone();
            pipe.query_async::<()>(&mut conn)
                .await
                .context("redis dedupe record")?;
        }
        Ok(())
    }

    /// Hands each settled token's `used` to the Token CR status writer.
    fn report_status(&self, used: &HashMap<u64, (TokenRow, i64)>) {
        let Some(sink) = &self.status else {
            return;
        };
        for (t, used) in used.values() {
            let update = crate::status::Used {
                token_id: t.id,
                namespace: t.namespace.clone(),
                name: t.cr_name.clone(),
                quota: t.quota,
                used: *used,
            };
            if sink.try_send(update).is_err() {
                tracing::debug!("token status writer busy; a later batch carries the total");
            }
        }
    }

    fn lap(&self, clock: &mut Instant, step: &'static str) {
        self.metrics
            .step_seconds
            .get_or_create(&Step { step })
            .observe(clock.elapsed().as_secs_f64());
        *clock = Instant::now();
    }

    fn price_all(&self, parsed: &[Parsed<'_>]) -> Vec<Billing> {
        parsed.iter().map(|(_, e, _)| bill(&self.dir, e)).collect()
    }

    async fn dead_letter(&self, letters: &[(&Msg, DeadLetter)]) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(letters.len());
        for (m, d) in letters {
            let offset = m.offset.to_string();
            let partition = m.partition.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(d.reason),
                })
                .insert(Header {
                    key: "detail",
                    value: Some(d.detail.as_str()),
                })
                .insert(Header {
                    key: "source-partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "source-offset",
                    value: Some(offset.as_str()),
                });
            let mut record = FutureRecord::to(&self.settings.dlq_topic)
                .payload(m.payload.as_deref().unwrap_or_default())
                .headers(headers);
            if let Some(k) = &m.key {
                record = record.key(k);
            }
            // send_result enqueues at once (awaiting `send` one by one would wait per message).
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .context("dead-letter enqueue")?,
            );
            tracing::warn!(reason = d.reason, detail = %d.detail, partition = m.partition, offset = m.offset, "dead-lettered");
            self.metrics
                .dead_lettered
                .get_or_create(&Reason { reason: d.reason })
                .inc();
        }
        for p in pending {
            p.await
                .context("dead-letter producer gone")?
                .map_err(|(e, _)| e)
                .context("dead-letter produce")?;
        }
        Ok(())
    }

    /// Settles the batch in Redis, in one pipelined round trip: one `SETTLE` call per token (all of
    /// its events, each guarded by its own marker) and the events forgotten as pending. The scripts
    /// are loaded at the head of the same pipeline (Redis runs a pipeline's commands in order, so a
    /// flushed script cache costs nothing more). What the calls that succeeded found is kept even
    /// when others failed: the retry settles nothing twice, so it could not find it again.
    async fn settle(&self, billed: &[Billed], state: &mut BatchState) -> anyhow::Result<Settled> {
        let mut out = Settled::default();
        if billed.is_empty() {
            return Ok(out);
        }
        let mut per_token: HashMap<u64, (&TokenRow, Vec<&Billed>)> = HashMap::new();
        for b in billed {
            if let Some(t) = &b.token {
                per_token
                    .entry(t.id)
                    .or_insert_with(|| (t, Vec::new()))
                    .1
                    .push(b);
            }
        }
        let calls: Vec<(&TokenRow, Vec<&Billed>)> = per_token.into_values().collect();
        let pipe = self.settle_pipeline(&calls, billed);
        let mut conn = self.redis.clone();
        let replies: Vec<redis::Value> =
            pipe.query_async(&mut conn).await.context("redis settle")?;
        let mut failed = None;
        let mut replies = replies.into_iter();
        for (token, events) in &calls {
            let reply = replies
                .next()
                .context("redis settle: fewer replies than calls")?;
            let (_, _, existed, added, used) = match reply
                .extract_error()
                .map_err(anyhow::Error::from)
                .and_then(|v| {
                    redis::from_redis_value::<(i64, i64, i64, i64, i64)>(v)
                        .map_err(anyhow::Error::from)
                }) {
                Ok(r) => r,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            let tenant = events
                .first()
                .map(|b| b.event.tenant.clone())
                .unwrap_or_default();
            let at_ms = events
                .iter()
                .map(|b| b.event.ended_at_ms)
                .max()
                .unwrap_or(0);
            if existed == 0 {
                // No counter (a new token, or Redis lost it): `used` is this batch alone
                // until the re-seed, so the crossing is judged from MySQL's total.
                state.reseed.push((*token).clone());
                if added > 0 {
                    state.deferred.push(Deferred {
                        token: (*token).clone(),
                        tenant,
                        added,
                        at_ms,
                    });
                }
                continue;
            }
            out.insert(token.id, ((*token).clone(), used));
            // Kept in the batch's state as soon as found: a later step that fails makes the
            // retry settle nothing here (its events are marked), but the alert found now is
            // still sent.
            for kind in crate::alerts::quota_crossings(token.quota, added, used) {
                state
                    .alerts
                    .push(quota_alert(kind, token, &tenant, used, at_ms));
            }
        }
        for reply in replies {
            if let Err(e) = reply.extract_error() {
                failed.get_or_insert(anyhow::Error::from(e).context("redis pending"));
            }
        }
        match failed {
            Some(e) => Err(e.context("redis settle")),
            None => Ok(out),
        }
    }

    /// The settle round trip's commands: the scripts loaded, one `SETTLE` per token, the events
    /// forgotten as pending (500 per call). Errors are answered in place, per command.
    fn settle_pipeline(
        &self,
        calls: &[(&TokenRow, Vec<&Billed>)],
        billed: &[Billed],
    ) -> redis::Pipeline {
        let ttl = self.settings.dedupe_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(SETTLE).ignore();
        crate::pending::load_forget(&mut pipe);
        for (token, events) in calls {
            let keys = TokenKeys::new(&token.key_hash);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&self.settle_sha)
                .arg(5 + events.len())
                .arg(&keys.all()[..]);
            for b in events {
                cmd.arg(keys.settled(&format!("event:{}", b.event.event_id)));
            }
            cmd.arg(ttl);
            for b in events {
                let reservation = match b.event.reservation.parse::<Reservation>() {
                    Ok(Reservation::Held { id, .. }) => id,
                    _ => "none".to_owned(),
                };
                cmd.arg(reservation).arg(b.event.usage.billable_tokens());
            }
            pipe.add_command(cmd);
        }
        let ids: Vec<&str> = billed.iter().map(|b| b.event.event_id.as_str()).collect();
        crate::pending::forget_into(&mut pipe, &self.settings.pending, &ids);
        pipe
    }

    /// Judges the tokens settled without a counter, from MySQL's total (which the ledger step has
    /// just brought up to date, this batch included).
    async fn deferred_alerts(&self, state: &mut BatchState) -> anyhow::Result<()> {
        // Cleared only once all are judged: a failure here leaves them for the retry.
        for d in state.deferred.clone() {
            let total: Option<i64> =
                sqlx::query_scalar("SELECT used_quota FROM tokens WHERE id = ?")
                    .bind(i64::try_from(d.token.id).unwrap_or(i64::MAX))
                    .fetch_optional(&self.db)
                    .await
                    .context("mysql used_quota")?;
            let used = total.unwrap_or(d.added).max(d.added);
            for kind in crate::alerts::quota_crossings(d.token.quota, d.added, used) {
                state
                    .alerts
                    .push(quota_alert(kind, &d.token, &d.tenant, used, d.at_ms));
            }
        }
        state.deferred.clear();
        Ok(())
    }

    /// Counts the batch into the channels' windows and returns the channels whose state changed.
    fn channel_alerts(&mut self, billed: &[Billed]) -> Vec<AlertEvent> {
        for b in billed {
            let failed = crate::alerts::channel_failed(b.event.outcome, b.event.status);
            self.health
                .record(&b.event.channel, b.event.ended_at_ms, failed);
        }
        self.health
            .evaluate()
            .into_iter()
            .map(|c| AlertEvent {
                id: format!("{}:{}:{}", c.kind.as_str(), c.channel, c.minute),
                kind: c.kind,
                tenant: None,
                token: None,
                used: None,
                quota: None,
                channel: Some(c.channel),
                requests: Some(c.requests),
                failures: Some(c.failures),
                at_ms: c.minute.saturating_mul(60_000),
            })
            .collect()
    }

    /// Sends `alerts` to the alert topic and waits for Kafka's acknowledgements.
    async fn send_alerts(&self, alerts: &[AlertEvent]) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(alerts.len());
        for a in alerts {
            let payload = a.to_json();
            let record = FutureRecord::to(&self.settings.alert_topic)
                .key(a.key())
                .payload(&payload);
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .context("alert enqueue")?,
            );
            tracing::warn!(kind = a.kind.as_str(), id = %a.id, tenant = a.tenant.as_deref().unwrap_or(""), channel = a.channel.as_deref().unwrap_or(""), "alert");
            if let Some(tenant) = &a.tenant {
                self.metrics
                    .quota_alerts
                    .get_or_create(&QuotaAlert {
                        tenant: tenant.clone(),
                        kind: a.kind.as_str(),
                    })
                    .inc();
            }
        }
        for p in pending {
            p.await
                .context("alert producer gone")?
                .map_err(|(e, _)| e)
                .context("alert produce")?;
        }
        Ok(())
    }

    /// Re-seeds the `used` counters a settle found missing (Redis lost them) from MySQL's
    /// `tokens.used_quota`, which the ledger step has just brought up to date: quota is never
    /// restarted at 0 by a flushed Redis. MySQL's total is a lower bound of what Redis should
    /// hold, since every worker settles in Redis before it writes MySQL. The re-seeded totals join
    /// `settled`.
    async fn reseed(&self, state: &mut BatchState, settled: &mut Settled) -> anyhow::Result<()> {
        let mut conn = self.redis.clone();
        // Each is removed once re-seeded: a failure leaves the rest for the retry.
        while let Some(t) = state.reseed.last().cloned() {
            let total: Option<i64> =
                sqlx::query_scalar("SELECT used_quota FROM tokens WHERE id = ?")
                    .bind(i64::try_from(t.id).unwrap_or(i64::MAX))
                    .fetch_optional(&self.db)
                    .await
                    .context("mysql used_quota")?;
            if let Some(total) = total {
                let raised: i64 = redis::Script::new(aigw_common::quota::RAISE_USED)
                    .key(TokenKeys::new(&t.key_hash).used)
                    .arg(total)
                    .invoke_async(&mut conn)
                    .await
                    .context("redis re-seed")?;
                // A token's first settle also finds no counter; only a lower one was lost.
                if raised == 1 {
                    self.metrics.reseeded.inc();
                    tracing::warn!(
                        token = t.id,
                        used = total,
                        "quota counter was missing in Redis; re-seeded from MySQL"
                    );
                }
                // A lower bound when another worker's batch settled since; the status writer
                // only ever raises `usedQuota`, so a later batch's total corrects it.
                settled.insert(t.id, (t, total));
            }
            state.reseed.pop();
        }
        Ok(())
    }

    fn commit(&self, batch: &[Msg]) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next_offsets(batch) {
            tpl.add_partition_offset(&self.settings.topic, p, Offset::Offset(o))
                .context("offset list")?;
        }
        // A synchronous commit blocks this thread briefly; keep the runtime's other tasks moving.
        tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync))
            .context("kafka commit")?;
        Ok(())
    }
}

/// A parsed event with its message and dedupe key.
type Parsed<'a> = (&'a Msg, UsageEvent, String);

/// Parses a batch: events (first copy of each dedupe key), dead letters, and copies dropped.
fn parse_batch(batch: &[Msg]) -> (Vec<Parsed<'_>>, Vec<(&Msg, DeadLetter)>, u64) {
    let mut parsed = Vec::with_capacity(batch.len());
    let mut dead_letters = Vec::new();
    // Dedupe key → for a swept (estimated) copy, the estimate it bills.
    let mut in_batch: HashMap<String, Option<TokenUsage>> = HashMap::new();
    let mut copies = 0u64;
    for m in batch {
        match UsageEvent::parse(m.payload.as_deref().unwrap_or_default()) {
            Ok(e) => {
                let key = e.dedupe_key();
                match in_batch.get(&key) {
                    None => {
                        let swept = (e.outcome == Outcome::Unreported)
                            .then(|| e.estimate.clone().unwrap_or_default());
                        in_batch.insert(key.clone(), swept);
                        parsed.push((m, e, key));
                    }
                    // The sweep's estimate and the late real report in one batch: the report's
                    // excess is billed as its correction (see `late_correction`; `drop_seen`
                    // drops it if the request had been billed in full before).
                    Some(Some(billed)) if e.outcome != Outcome::Unreported => {
                        match late_correction(&e, &billed.clone()) {
                            Some(late) if !in_batch.contains_key(&late.dedupe_key()) => {
                                let late_key = late.dedupe_key();
                                in_batch.insert(late_key.clone(), None);
                                parsed.push((m, late, late_key));
                            }
                            _ => copies += 1,
                        }
                    }
                    Some(_) => copies += 1,
                }
            }
            Err(e) => dead_letters.push((m, dead("malformed", e.to_string()))),
        }
    }
    (parsed, dead_letters, copies)
}

impl Worker {
    /// Drops events whose dedupe key says they were fully applied before; returns how many. A
    /// real report arriving after the sweep billed its request at the estimate is not simply a
    /// duplicate: what it used beyond the estimate becomes a correction event (`<id>#late`), so a
    /// request longer than its reservation is billed in full (never credited below the estimate).
    async fn drop_seen(&self, parsed: &mut Vec<Parsed<'_>>) -> anyhow::Result<u64> {
        if parsed.is_empty() {
            return Ok(0);
        }
        let mut conn = self.redis.clone();
        let before = parsed.len();
        let keys: Vec<String> = parsed.iter().map(|(_, _, k)| seen_key(k)).collect();
        let seen: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .context("redis dedupe lookup")?;
        let mut kept = Vec::with_capacity(parsed.len());
        for ((m, event, key), seen) in parsed.drain(..).zip(seen) {
            match seen.as_deref().map(billed_estimate) {
                None => kept.push((m, event, key)),
                Some(Some(billed)) if event.outcome != Outcome::Unreported => {
                    let billed = billed
                        .or_else(|| event.estimate.clone())
                        .unwrap_or_default();
                    if let Some(late) = late_correction(&event, &billed) {
                        let key = late.dedupe_key();
                        kept.push((m, late, key));
                    }
                }
                Some(_) => {}
            }
        }
        // A correction is a duplicate when it was applied before (the late report delivered
        // twice), or when its request turns out to have been billed in full (a report, not the
        // sweep's estimate, was applied first).
        let late: Vec<(String, String)> = kept
            .iter()
            .filter_map(|(_, _, k)| {
                let original = k.strip_suffix(LATE_SUFFIX)?;
                Some((seen_key(k), seen_key(original)))
            })
            .collect();
        if !late.is_empty() {
            let keys: Vec<&String> = late.iter().flat_map(|(own, orig)| [own, orig]).collect();
            let seen: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .context("redis dedupe lookup")?;
            let duplicate: HashSet<String> = late
                .iter()
                .zip(seen.chunks(2))
                .filter(|(_, v)| {
                    v[0].is_some()
                        || v[1]
                            .as_deref()
                            .is_some_and(|o| billed_estimate(o).is_none())
                })
                .map(|((own, _), _)| own.clone())
                .collect();
            kept.retain(|(_, _, k)| !duplicate.contains(&seen_key(k)));
        }
        *parsed = kept;
        Ok((before - parsed.len()) as u64)
    }
}

/// The `aigw:seen:` value of an event billed at its admission estimate by the pending sweep:
/// `estimated:<prompt>:<completion>`, what was billed.
pub const SEEN_ESTIMATED: &str = "estimated";

/// The seen value recording `billed` as a swept estimate.
pub fn seen_estimated(billed: &TokenUsage) -> String {
    format!(
        "{SEEN_ESTIMATED}:{}:{}",
        billed.prompt_tokens.unwrap_or(0),
        billed.completion_tokens.unwrap_or(0)
    )
}

/// For a seen value of a swept estimate, what was billed (`Some(None)` when the value does not
/// say); `None` for an event billed as reported.
pub fn billed_estimate(seen: &str) -> Option<Option<TokenUsage>> {
    let rest = seen.strip_prefix(SEEN_ESTIMATED)?;
    Some(
        rest.strip_prefix(':')
            .and_then(aigw_plugin_core::estimate::parse),
    )
}
/// The event-id suffix of a late report's correction.
pub const LATE_SUFFIX: &str = "#late";

/// The correction for a report that arrived after its request was billed at `billed` (the sweep's
/// estimate): the usage beyond it, per kind; `None` when there is none.
pub fn late_correction(event: &UsageEvent, billed: &TokenUsage) -> Option<UsageEvent> {
    let estimate = billed;
    let beyond = |actual: Option<u64>, est: Option<u64>| {
        actual.unwrap_or(0).saturating_sub(est.unwrap_or(0))
    };
    let prompt = beyond(event.usage.prompt_tokens, estimate.prompt_tokens);
    let completion = beyond(event.usage.completion_tokens, estimate.completion_tokens);
    if prompt == 0 && completion == 0 {
        return None;
    }
    let mut late = event.clone();
    late.event_id = format!("{}{LATE_SUFFIX}", event.event_id);
    late.usage = TokenUsage {
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        ..TokenUsage::default()
    };
    late.estimate = None;
    late.outcome = Outcome::Complete;
    "none".clone_into(&mut late.reservation);
    Some(late)
}

/// Samples consumer lag every 10 s (librdkafka's watermark query blocks, so off the workers).
fn spawn_lag(
    consumer: Arc<StreamConsumer>,
    gauge: Gauge,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            let c = consumer.clone();
            let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
                let positions = c.position().ok()?;
                let mut lag = 0;
                for e in positions.elements() {
                    let (_, high) = c
                        .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                        .ok()?;
                    if let Offset::Offset(pos) = e.offset() {
                        lag += (high - pos).max(0);
                    }
                }
                Some(lag)
            })
            .await;
            if let Ok(Some(l)) = lag {
                gauge.set(l);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_report_adds_what_it_used_beyond_what_the_sweep_billed() {
        let billed = TokenUsage {
            prompt_tokens: Some(500),
            completion_tokens: Some(50),
            ..TokenUsage::default()
        };
        let seen = seen_estimated(&billed);
        assert_eq!(billed_estimate(&seen), Some(Some(billed.clone())));
        assert_eq!(billed_estimate("estimated"), Some(None), "an older value");
        assert_eq!(billed_estimate("1"), None, "billed as reported");
        let mut report: UsageEvent = serde_json::from_value(serde_json::json!({
            "version": 1, "eventId": "e", "tenant": "1", "user": "u", "token": "2", "model": "m",
            "usage": {"promptTokens": 900, "completionTokens": 40}, "status": 200,
            "startedAtMs": 1, "endedAtMs": 2}))
        .unwrap();
        // The plugin's header said otherwise: what the sweep billed counts.
        report.estimate = Some(TokenUsage::default());
        let late = late_correction(&report, &billed).unwrap();
        assert_eq!(late.event_id, "e#late");
        assert_eq!(
            (late.usage.prompt_tokens, late.usage.completion_tokens),
            (Some(400), Some(0))
        );
        report.usage.prompt_tokens = Some(100);
        assert!(
            late_correction(&report, &billed).is_none(),
            "never a credit"
        );
    }

    #[test]
    fn micros_rounds_once_and_refuses_overflow() {
        assert_eq!(micros("1.2345675".parse().unwrap()), Some(1_234_568));
        assert_eq!(micros(Decimal::ZERO), Some(0));
        assert_eq!(micros("999999.999999".parse().unwrap()), Some(MAX_MICROS));
        assert_eq!(micros("1000000".parse().unwrap()), None);
        assert_eq!(micros("-1".parse().unwrap()), None);
    }

    #[test]
    fn counts_must_fit_their_columns() {
        assert_eq!(count("x", None), Ok(0));
        assert_eq!(count("x", Some(7)), Ok(7));
        assert!(count("x", Some(u64::from(u32::MAX) + 1)).is_err());
    }
}
