//! The test bed's ClickHouse is real: the usage table migrates, rows insert, aggregates add up, and
//! a re-delivered event collapses under `FINAL`.
//!
//! The Rust row type is billing's (`aigw_billing::worker::UsageLogRow`); billing's tests pin its
//! mapping to this schema by reading every column back.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_testkit::Testbed;
use serde::Deserialize;

/// Inserts one `usage_logs` row by SQL (the Rust row type and its mapping are billing's,
/// `aigw_billing::worker::UsageLogRow`, pinned by billing's own tests).
async fn insert(ch: &clickhouse::Client, event: &str, tenant: u64, cost: &str) {
    ch.query(
        "INSERT INTO usage_logs (event_id, trace_id, tenant_id, user_id, token_id, channel_id, model, \
         prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost, \
         platform_cost, upstream_cost, latency_ms, status, created_at) \
         VALUES (?, ?, ?, 7, 9, 1, 'gpt-4o', 1000, 500, 200, 0, 1500, toDecimal64(?, 6), \
         toDecimal64(?, 6), toDecimal64('0', 6), 850, 'success', toDateTime(1790000000))",
    )
    .bind(event)
    .bind(format!("trace-{event}"))
    .bind(tenant)
    .bind(cost)
    .bind(cost)
    .execute()
    .await
    .unwrap();
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
    assert_eq!(
        aigw_migrations::run_clickhouse(&ch).await.unwrap(),
        aigw_migrations::CLICKHOUSE.len()
    );
    assert_eq!(
        aigw_migrations::run_clickhouse(&ch).await.unwrap(),
        0,
        "second run is a no-op"
    );

    insert(&ch, "e1", 1, "1.234567").await;
    insert(&ch, "e2", 1, "2.000000").await;
    insert(&ch, "e3", 2, "0.000010").await;
    // The same event delivered again (e.g. after a crash before the offset commit).
    insert(&ch, "e1", 1, "1.234567").await;

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
}
