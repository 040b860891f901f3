//! Usage reports from ClickHouse: totals by tenant, user, model or day, within one tenant (or across
//! tenants for platform staff), optionally narrowed to a set of customer (user) ids — the sales
//! scope "only my bound customers". Reads `usage_logs FINAL`, so re-delivered copies never count.
//!
//! The caller (the REST API) decides the scope from the caller's roles; this module only applies it.

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Deserialize;

/// What to group totals by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    User,
    Model,
    Day,
}

impl GroupBy {
    fn column(self) -> &'static str {
        match self {
            Self::Tenant => "toString(tenant_id)",
            Self::User => "toString(user_id)",
            Self::Model => "model",
            Self::Day => "toString(toDate(created_at, 'UTC'))",
        }
    }
}

/// Which rows a report covers. `from` is inclusive, `to` exclusive (UTC days).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `None` only for platform staff: all tenants.
    pub tenant: Option<u64>,
    /// Sales scope: only these users (customers). `Some(empty)` matches nothing.
    pub users: Option<Vec<u64>>,
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// One line of a report. Money is exact (`Decimal`), summed from the 6-decimal row amounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub key: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Decimal,
    pub platform_cost: Decimal,
    pub upstream_cost: Decimal,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Raw {
    key: String,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: String,
    platform_cost: String,
    upstream_cost: String,
}

/// Why a report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse returned a sum that is not a decimal: {0:?}")]
    Decimal(String),
}

/// Midnight UTC of `d` as Unix seconds (the `DateTime` column's encoding).
pub fn epoch(d: NaiveDate) -> u32 {
    u32::try_from(d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp()).unwrap_or(0)
}

fn decimal(s: &str) -> Result<Decimal, ReportError> {
    s.parse().map_err(|_| ReportError::Decimal(s.to_owned()))
}

/// Totals of `filter`, grouped by `by`, ordered by key.
pub async fn totals(
    ch: &clickhouse::Client,
    filter: &Filter,
    by: GroupBy,
) -> Result<Vec<Line>, ReportError> {
    if filter.users.as_ref().is_some_and(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let mut sql = format!(
        "SELECT {} AS key, count() AS requests, sum(toUInt64(prompt_tokens)) AS prompt_tokens, \
         sum(toUInt64(completion_tokens)) AS completion_tokens, toString(sum(cost)) AS cost, \
         toString(sum(platform_cost)) AS platform_cost, toString(sum(upstream_cost)) AS upstream_cost \
         FROM usage_logs FINAL WHERE created_at >= toDateTime(?) AND created_at < toDateTime(?)",
        by.column()
    );
    if filter.tenant.is_some() {
        sql.push_str(" AND tenant_id = ?");
    }
    if let Some(users) = &filter.users {
        // Ids are integers: formatting them cannot inject anything.
        let list: Vec<String> = users.iter().map(u64::to_string).collect();
        sql.push_str(" AND user_id IN (");
        sql.push_str(&list.join(","));
        sql.push(')');
    }
    sql.push_str(" GROUP BY key ORDER BY key");
    let mut q = ch
        .query(&sql)
        .bind(epoch(filter.from))
        .bind(epoch(filter.to));
    if let Some(t) = filter.tenant {
        q = q.bind(t);
    }
    q.fetch_all::<Raw>()
        .await?
        .into_iter()
        .map(|r| {
            Ok(Line {
                cost: decimal(&r.cost)?,
                platform_cost: decimal(&r.platform_cost)?,
                upstream_cost: decimal(&r.upstream_cost)?,
                key: r.key,
                requests: r.requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            })
        })
        .collect()
}

/// Requests and failures of one channel over a recent window (platform monitoring).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct ChannelHealth {
    pub channel_id: u64,
    pub requests: u64,
    pub errors: u64,
    /// The newest failure's message (empty when none failed).
    pub last_error: String,
}

/// Per channel, requests and failures (status other than `success`) since `since` (Unix
/// seconds), across all tenants, ordered by channel id.
pub async fn channel_health(
    ch: &clickhouse::Client,
    since: u32,
) -> Result<Vec<ChannelHealth>, ReportError> {
    Ok(ch
        .query(
            "SELECT channel_id, count() AS requests, countIf(status != 'success') AS errors, \
             argMaxIf(error_msg, created_at, status != 'success') AS last_error \
             FROM usage_logs FINAL WHERE created_at >= toDateTime(?) GROUP BY channel_id ORDER BY channel_id",
        )
        .bind(since)
        .fetch_all::<ChannelHealth>()
        .await?)
}
