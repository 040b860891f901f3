//! MySQL aggregates, applied exactly once per Kafka message.
//!
//! One transaction per batch: lock the batch's partitions' rows in `billing_offsets`, add only the
//! events at or after each partition's stored watermark to `usage_daily` and `tokens.used_quota`,
//! and move the watermarks past the batch. A batch replayed after a crash finds its watermarks
//! already moved and adds nothing.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate};
use rust_decimal::Decimal;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::worker::{Billed, Msg, next_offsets};

#[derive(Debug, Default)]
struct Daily {
    requests: i64,
    prompt: i64,
    completion: i64,
    cached: i64,
    cost: Decimal,
    platform_cost: Decimal,
    upstream_cost: Decimal,
}

fn i64_of(v: Option<u64>) -> i64 {
    i64::try_from(v.unwrap_or(0)).unwrap_or(i64::MAX)
}

/// Applies `billed` (the priced subset of `batch`) to the aggregates, once.
pub async fn apply(
    db: &MySqlPool,
    topic: &str,
    batch: &[Msg],
    billed: &[Billed],
) -> Result<(), sqlx::Error> {
    let next = next_offsets(batch);
    if next.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    let mut stored: HashMap<i32, i64> = HashMap::new();
    for &p in next.keys() {
        let o: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM billing_offsets WHERE topic = ? AND part = ? FOR UPDATE",
        )
        .bind(topic)
        .bind(p)
        .fetch_optional(&mut *tx)
        .await?;
        stored.insert(p, o.unwrap_or(0));
    }
    let fresh: Vec<&Billed> = billed
        .iter()
        .filter(|b| b.offset >= stored.get(&b.partition).copied().unwrap_or(0))
        .collect();

    let (daily, used) = aggregate(&fresh);
    for chunk in daily.chunks(500) {
        let mut q: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO usage_daily (tenant_id, day, model, requests, prompt_tokens, completion_tokens, \
             cached_tokens, cost, platform_cost, upstream_cost) ",
        );
        q.push_values(chunk, |mut row, ((tenant, day, model), d)| {
            row.push_bind(*tenant)
                .push_bind(*day)
                .push_bind(*model)
                .push_bind(d.requests)
                .push_bind(d.prompt)
                .push_bind(d.completion)
                .push_bind(d.cached)
                .push_bind(d.cost)
                .push_bind(d.platform_cost)
                .push_bind(d.upstream_cost);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE requests = requests + VALUES(requests), \
             prompt_tokens = prompt_tokens + VALUES(prompt_tokens), \
             completion_tokens = completion_tokens + VALUES(completion_tokens), \
             cached_tokens = cached_tokens + VALUES(cached_tokens), cost = cost + VALUES(cost), \
             platform_cost = platform_cost + VALUES(platform_cost), \
             upstream_cost = upstream_cost + VALUES(upstream_cost)",
        );
        q.build().execute(&mut *tx).await?;
    }
    let used: Vec<_> = used.into_iter().collect();
    for chunk in used.chunks(500) {
        let mut q: QueryBuilder<MySql> = QueryBuilder::new("UPDATE tokens JOIN (");
        let mut first = true;
        for (id, n) in chunk {
            if !first {
                q.push(" UNION ALL ");
            }
            first = false;
            q.push("SELECT ")
                .push_bind(*id)
                .push(" AS id, ")
                .push_bind(*n)
                .push(" AS n");
        }
        q.push(") d ON tokens.id = d.id SET tokens.used_quota = tokens.used_quota + d.n");
        q.build().execute(&mut *tx).await?;
    }
    let mut q: QueryBuilder<MySql> =
        QueryBuilder::new("INSERT INTO billing_offsets (topic, part, next_offset) ");
    q.push_values(&next, |mut row, (p, o)| {
        row.push_bind(topic).push_bind(*p).push_bind(*o);
    });
    q.push(" ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))");
    q.build().execute(&mut *tx).await?;
    tx.commit().await
}

type Totals<'a> = (Vec<((u64, NaiveDate, &'a str), Daily)>, BTreeMap<u64, i64>);

/// Sums events per (tenant, day, model) and per token.
fn aggregate<'a>(fresh: &[&'a Billed]) -> Totals<'a> {
    let mut daily: BTreeMap<(u64, NaiveDate, &str), Daily> = BTreeMap::new();
    let mut used: BTreeMap<u64, i64> = BTreeMap::new();
    for b in fresh {
        let day = DateTime::from_timestamp_millis(b.event.ended_at_ms)
            .unwrap_or_default()
            .date_naive();
        let d = daily
            .entry((b.row.tenant_id, day, b.event.model.as_str()))
            .or_default();
        let u = &b.event.usage;
        d.requests += 1;
        d.prompt += i64_of(u.prompt_tokens);
        d.completion += i64_of(u.completion_tokens);
        d.cached += i64_of(u.cached_input_tokens);
        d.cost += b.priced.cost;
        d.platform_cost += b.priced.platform_cost;
        d.upstream_cost += b.priced.upstream_cost.unwrap_or_default();
        if let Some(t) = &b.token {
            *used.entry(t.id).or_default() += i64_of(Some(u.billable_tokens()));
        }
    }
    (daily.into_iter().collect(), used)
}
