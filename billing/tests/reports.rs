//! Reports, settlement and retention on the real ClickHouse and MariaDB of the test bed.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;

use aigw_billing::{
    reports::{self, Filter, GroupBy},
    retention, settlement,
    worker::UsageLogRow,
};
use chrono::NaiveDate;
use common::{Bed, dec};
use rust_decimal::Decimal;

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn row(event: &str, tenant: u64, user: u64, model: &str, on: NaiveDate, cost: i64) -> UsageLogRow {
    UsageLogRow {
        event_id: event.into(),
        trace_id: event.into(),
        tenant_id: tenant,
        user_id: user,
        token_id: 1,
        channel_id: 1,
        model: model.into(),
        prompt_tokens: 100,
        completion_tokens: 10,
        cached_tokens: 0,
        reasoning_tokens: 0,
        total_tokens: 110,
        cost,
        platform_cost: cost / 2,
        upstream_cost: cost / 4,
        latency_ms: 1,
        status: "success".into(),
        error_msg: String::new(),
        created_at: reports::epoch(on) + 3600,
        currency: "USD".into(),
    }
}

async fn insert(ch: &clickhouse::Client, rows: &[UsageLogRow]) {
    let mut i = ch.insert::<UsageLogRow>("usage_logs").await.unwrap();
    for r in rows {
        i.write(r).await.unwrap();
    }
    i.end().await.unwrap();
}

#[tokio::test]
async fn reports_settlement_and_retention() {
    let bed = Bed::new("billing_reports").await;
    let oct1 = day(2026, 10, 1);
    let oct2 = day(2026, 10, 2);
    insert(
        &bed.ch,
        &[
            row("e1", 1, 100, "gpt-4o", oct1, 1_000_001),
            row("e2", 1, 101, "gpt-4o", oct2, 2_000_000),
            row("e3", 1, 102, "gpt-4o-mini", oct2, 333),
            row("e4", 2, 100, "gpt-4o", oct1, 9_000_000),
            row("e0", 1, 100, "gpt-4o", day(2026, 9, 30), 5_000_000),
        ],
    )
    .await;
    // A re-delivered copy (the crash case): reports read FINAL, so it counts once.
    insert(&bed.ch, &[row("e1", 1, 100, "gpt-4o", oct1, 1_000_001)]).await;

    // The worker's row type reads back column for column (the client runs with validation off on
    // ClickHouse 18.16, so a wrong Rust type would otherwise be accepted silently).
    let mut written = row("e3", 1, 102, "gpt-4o-mini", oct2, 333);
    written.reasoning_tokens = 7;
    written.error_msg = "upstream said: no".into();
    insert(&bed.ch, &[written.clone()]).await;
    let back = bed
        .ch
        .query("SELECT ?fields FROM usage_logs FINAL WHERE event_id = 'e3'")
        .fetch_all::<UsageLogRow>()
        .await
        .unwrap();
    assert_eq!(back, vec![written]);

    let october = Filter {
        tenant: Some(1),
        users: None,
        from: oct1,
        to: day(2026, 11, 1),
    };
    let by_model = reports::totals(&bed.ch, &october, GroupBy::Model)
        .await
        .unwrap();
    let summary: Vec<(&str, u64, Decimal)> = by_model
        .iter()
        .map(|l| (l.key.as_str(), l.requests, l.cost))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("gpt-4o", 2, dec("3.000001")),
            ("gpt-4o-mini", 1, dec("0.000333"))
        ]
    );
    let by_day = reports::totals(&bed.ch, &october, GroupBy::Day)
        .await
        .unwrap();
    let days: Vec<(&str, u64)> = by_day
        .iter()
        .map(|l| (l.key.as_str(), l.requests))
        .collect();
    assert_eq!(days, vec![("2026-10-01", 1), ("2026-10-02", 2)]);

    // Sales scope: only bound customers; never another tenant's rows.
    let scoped = Filter {
        users: Some(vec![100]),
        ..october.clone()
    };
    let by_user = reports::totals(&bed.ch, &scoped, GroupBy::User)
        .await
        .unwrap();
    assert_eq!(by_user.len(), 1);
    assert_eq!(
        (by_user[0].key.as_str(), by_user[0].cost),
        ("100", dec("1.000001"))
    );
    let nobody = Filter {
        users: Some(vec![]),
        ..october.clone()
    };
    assert!(
        reports::totals(&bed.ch, &nobody, GroupBy::User)
            .await
            .unwrap()
            .is_empty()
    );
    let all = Filter {
        tenant: None,
        ..october.clone()
    };
    let by_tenant = reports::totals(&bed.ch, &all, GroupBy::Tenant)
        .await
        .unwrap();
    let tenants: Vec<&str> = by_tenant.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(tenants, vec!["1", "2"]);

    // Settlement: revenue, owed to the platform, margin — recorded once, immutable.
    let s = settlement::settle(
        &bed.db,
        &bed.ch,
        1,
        oct1,
        day(2026, 11, 1),
        "finance@platform",
    )
    .await
    .unwrap();
    // platform_cost is cost / 2 in whole millionths per row: 500000 + 1000000 + 166.
    assert_eq!(
        (s.revenue, s.platform_cost, s.margin),
        (dec("3.000334"), dec("1.500166"), dec("1.500168"))
    );
    insert(&bed.ch, &[row("late", 1, 100, "gpt-4o", oct2, 7_000_000)]).await;
    let again = settlement::settle(&bed.db, &bed.ch, 1, oct1, day(2026, 11, 1), "someone else")
        .await
        .unwrap();
    assert_eq!(again, s, "a settled period keeps its first record");
    let now = settlement::statement(&bed.ch, 1, oct1, day(2026, 11, 1))
        .await
        .unwrap();
    assert_eq!(
        now.revenue,
        dec("10.000334"),
        "the statement itself is live"
    );
    assert!(settlement::statement(&bed.ch, 1, oct2, oct1).await.is_err());

    let w = settlement::withdraw(&bed.db, 1, dec("1.5"), "finance@platform", "bank transfer")
        .await
        .unwrap();
    assert_eq!((w.kind.as_str(), w.amount), ("withdrawal", dec("1.5")));
    assert!(
        settlement::withdraw(&bed.db, 1, dec("-1"), "x", "")
            .await
            .is_err()
    );
    // The balance is the settled margin less withdrawals: 1.500168 - 1.5.
    assert_eq!(
        settlement::balance(&bed.db, 1).await.unwrap(),
        dec("0.000168")
    );
    assert!(matches!(
        settlement::withdraw(&bed.db, 1, dec("0.000169"), "x", "").await,
        Err(settlement::SettlementError::Insufficient { .. })
    ));
    let records = settlement::records(&bed.db, 1).await.unwrap();
    assert_eq!(records.len(), 2);
    assert!(settlement::records(&bed.db, 2).await.unwrap().is_empty());

    // Retention on the 18.16 test server: whole months before the kept ones are dropped.
    match retention::apply(&bed.ch, 0, day(2026, 10, 15))
        .await
        .unwrap()
    {
        retention::Applied::Dropped(parts) => assert_eq!(parts, vec!["202609".to_owned()]),
        other @ retention::Applied::Ttl(_) => {
            panic!("the test bed's ClickHouse 18.16 has no TTL; got {other:?}")
        }
    }
    let sept = Filter {
        tenant: Some(1),
        users: None,
        from: day(2026, 9, 1),
        to: oct1,
    };
    assert!(
        reports::totals(&bed.ch, &sept, GroupBy::Tenant)
            .await
            .unwrap()
            .is_empty()
    );
}
