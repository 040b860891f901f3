//! A Kafka broker restart while the worker is busy and while events are still being produced loses
//! nothing and charges nothing twice. Its own test binary: it restarts the shared test-bed broker,
//! which no other test may see (cargo runs test binaries one after another).

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{process::Command, time::Duration};

use aigw_billing::pricing::{self, Price, Usage};
use aigw_plugin_core::TokenUsage;
use common::{Bed, clickhouse_sums, dec, event, message};
use rust_decimal::Decimal;

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_mid_run_loses_nothing() {
    const EVENTS: u64 = 60_000;
    let bed = Bed::new("billing_restart").await;
    let mini = Price {
        input: dec("0.15"),
        output: dec("0.60"),
        cached_input: None,
    };
    let mut messages = Vec::new();
    let (mut cost, mut tokens) = (Decimal::ZERO, 0u64);
    for i in 0..EVENTS {
        let u = Usage {
            prompt_tokens: 1_000 + i % 977,
            completion_tokens: 100 + i % 313,
            cached_input_tokens: 0,
        };
        cost += pricing::amount(&u, &mini);
        tokens += u.prompt_tokens + u.completion_tokens;
        let usage = TokenUsage {
            prompt_tokens: Some(u.prompt_tokens),
            completion_tokens: Some(u.completion_tokens),
            ..TokenUsage::default()
        };
        messages.push(message(&event(
            &format!("r-{i}"),
            "2",
            21,
            "gpt-4o-mini",
            usage,
        )));
    }
    let (before, after) = messages.split_at(40_000);
    bed.produce(before).await;

    let worker = bed.start_worker(200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (done, end) = bed.progress();
    assert!(
        done < end,
        "the worker finished before the restart; the test proves nothing"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/testbed");
    let status = Command::new("bash")
        .args([script, "restart-kafka"])
        .status()
        .unwrap();
    assert!(status.success(), "restart-kafka failed");
    // More events after the restart: the producer reconnects and delivers them.
    bed.produce(after).await;
    bed.drained(300).await;

    let got = clickhouse_sums(&bed.ch, 2, true).await;
    assert_eq!(got.events, EVENTS);
    assert_eq!(dec(&got.cost), cost);
    assert_eq!(got.tokens, tokens);
    assert_eq!(bed.redis_used(21).await, i64::try_from(tokens).unwrap());
    let (requests, mysql_cost): (Decimal, Decimal) =
        sqlx::query_as("SELECT SUM(requests), SUM(cost) FROM usage_daily WHERE tenant_id = 2")
            .fetch_one(&bed.db)
            .await
            .unwrap();
    assert_eq!((requests, mysql_cost), (Decimal::from(EVENTS), cost));
    worker.terminate(15).unwrap();
}
