//! The test bed's ClickHouse is real: the usage table migrates, rows insert, aggregates add up, and
//! a re-delivered event collapses under `FINAL`.
//!
//! The client runs with validation off (ClickHouse 18.16), so a wrong Rust type would be accepted
//! silently: this test pins the struct ↔ schema mapping by reading values back as text.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_testkit::Testbed;
use serde::{Deserialize, Serialize};

/// One `usage_logs` row. `Decimal(12,6)` travels as an `i64` count of millionths.
#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct UsageRow {
    event_id: String,
    trace_id: String,
    tenant_id: u64,
    user_id: u64,
    token_id: u64,
    channel_id: u64,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
    reasoning_tokens: u32,
    total_tokens: u32,
    cost: i64,
    platform_cost: i64,
    upstream_cost: i64,
    latency_ms: u32,
    status: String,
    error_msg: String,
    created_at: u32,
}

fn row(event: &str, tenant: u64, cost_micros: i64) -> UsageRow {
    UsageRow {
        event_id: event.into(),
        trace_id: format!("trace-{event}"),
        tenant_id: tenant,
        user_id: 7,
        token_id: 9,
        channel_id: 1,
        model: "gpt-4o".into(),
        prompt_tokens: 1000,
        completion_tokens: 500,
        cached_tokens: 200,
        reasoning_tokens: 0,
        total_tokens: 1500,
        cost: cost_micros,
        platform_cost: cost_micros / 2,
        upstream_cost: cost_micros / 4,
        latency_ms: 850,
        status: "success".into(),
        error_msg: String::new(),
        created_at: 1_790_000_000,
    }
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Totals {
    tenant_id: u64,
    events: u64,
    tokens: u64,
    cost: String,
}

#[tokio::test]
async fn usage_rows_insert_aggregate_and_deduplicate() {
    let ch = Testbed::load()
        .unwrap()
        .scratch_clickhouse("usage")
        .await
        .unwrap();
    assert_eq!(aigw_migrations::run_clickhouse(&ch).await.unwrap(), 1);
    assert_eq!(
        aigw_migrations::run_clickhouse(&ch).await.unwrap(),
        0,
        "second run is a no-op"
    );

    let mut insert = ch.insert::<UsageRow>("usage_logs").await.unwrap();
    insert.write(&row("e1", 1, 1_234_567)).await.unwrap();
    insert.write(&row("e2", 1, 2_000_000)).await.unwrap();
    insert.write(&row("e3", 2, 10)).await.unwrap();
    insert.end().await.unwrap();
    // The same event delivered again (e.g. after a crash before the offset commit).
    let mut again = ch.insert::<UsageRow>("usage_logs").await.unwrap();
    again.write(&row("e1", 1, 1_234_567)).await.unwrap();
    again.end().await.unwrap();

    let totals = ch
        .query(
            "SELECT tenant_id, count() AS events, sum(total_tokens) AS tokens, toString(sum(cost)) AS cost \
             FROM usage_logs FINAL GROUP BY tenant_id ORDER BY tenant_id",
        )
        .fetch_all::<Totals>()
        .await
        .unwrap();
    assert_eq!(totals.len(), 2, "{totals:?}");
    assert_eq!(
        (totals[0].tenant_id, totals[0].events, totals[0].tokens),
        (1, 2, 3000)
    );
    assert_eq!(totals[0].cost, "3.234567");
    assert_eq!(
        (totals[1].tenant_id, totals[1].cost.as_str()),
        (2, "0.000010")
    );

    // Every column reads back as written: the mapping is right, not just accepted.
    let back = ch
        .query("SELECT ?fields FROM usage_logs FINAL WHERE event_id = 'e1'")
        .fetch_all::<UsageRow>()
        .await
        .unwrap();
    assert_eq!(back.len(), 1);
    let r = &back[0];
    assert_eq!(
        (r.cost, r.platform_cost, r.upstream_cost),
        (1_234_567, 617_283, 308_641)
    );
    assert_eq!(
        (r.prompt_tokens, r.cached_tokens, r.created_at),
        (1000, 200, 1_790_000_000)
    );
    assert_eq!(r.trace_id, "trace-e1");
}
