//! `alert.events` from the worker, read back from Kafka: a token's quota crossing 10 % remaining
//! and 0 % (once each, also when a batch is delivered again), and a channel whose success rate
//! falls below 95 %.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use aigw_common::events::{AlertEvent, AlertKind};
use aigw_plugin_core::{Outcome, TokenUsage};
use common::{Bed, event, message};

fn usage(prompt: u64) -> TokenUsage {
    TokenUsage {
        prompt_tokens: Some(prompt),
        completion_tokens: Some(0),
        ..TokenUsage::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_crossings_and_a_failing_channel_become_alert_events_once() {
    let bed = Bed::new("alerts").await;
    // Token 11 (tenant 1) gets a quota of 1,000; the others stay unlimited.
    sqlx::query("UPDATE tokens SET quota = 1000 WHERE id = 11")
        .execute(&bed.db)
        .await
        .unwrap();
    let worker = bed.start_worker(100);

    // 800 used: nothing yet. Then 100 more: 900 used, 10 % left → quotaLow.
    let first: Vec<_> = (0..8)
        .map(|i| message(&event(&format!("q{i}"), "1", 11, "gpt-4o", usage(100))))
        .collect();
    bed.produce(&first).await;
    bed.drained(60).await;
    bed.produce(&[message(&event("q8", "1", 11, "gpt-4o", usage(100)))])
        .await;
    bed.drained(60).await;
    // A copy of an event already billed (a redelivery) moves nothing.
    bed.produce(&[message(&event("q8", "1", 11, "gpt-4o", usage(100)))])
        .await;
    bed.drained(60).await;
    // 1,000: used up → quotaExhausted; one more past it says nothing new.
    bed.produce(&[message(&event("q9", "1", 11, "gpt-4o", usage(100)))])
        .await;
    bed.drained(60).await;
    bed.produce(&[message(&event("q10", "1", 11, "gpt-4o", usage(50)))])
        .await;
    bed.drained(60).await;

    // A channel failing on every other request (tenant 2's unlimited token).
    let flaky: Vec<_> = (0..30)
        .map(|i| {
            let mut e = event(&format!("f{i}"), "globex", 21, "gpt-4o", usage(1));
            e.channel = "flaky-main".into();
            if i % 2 == 0 {
                e.outcome = Outcome::UpstreamError;
                e.status = 502;
                e.error = Some("upstream 502".into());
            }
            message(&e)
        })
        .collect();
    bed.produce(&flaky).await;
    bed.drained(60).await;

    let records = bed.read(&bed.alerts, "", 4, Duration::from_secs(20));
    let alerts: Vec<(String, AlertEvent)> = records
        .iter()
        .map(|(key, payload)| (key.clone(), serde_json::from_str(payload).unwrap()))
        .collect();
    let kinds: Vec<AlertKind> = alerts.iter().map(|(_, a)| a.kind).collect();
    assert_eq!(
        kinds,
        vec![
            AlertKind::QuotaLow,
            AlertKind::QuotaExhausted,
            AlertKind::ChannelDegraded
        ],
        "{records:?}"
    );
    let (key, low) = &alerts[0];
    assert_eq!(key, "1", "quota alerts are keyed by the tenant");
    assert_eq!((low.used, low.quota), (Some(900), Some(1000)));
    assert_eq!(low.token.as_ref().unwrap().name, "tok-11");
    assert_eq!(alerts[1].1.used, Some(1000));
    let (key, degraded) = &alerts[2];
    assert_eq!(key, "flaky-main", "channel alerts are keyed by the channel");
    // Judged once 20 requests were in its window (the batch boundaries decide which count).
    let (requests, failures) = (degraded.requests.unwrap(), degraded.failures.unwrap());
    assert!(
        (20..=30).contains(&requests) && (requests - failures) * 100 < 95 * requests,
        "{degraded:?}"
    );

    let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    for line in [
        "aigw_billing_quota_alerts_total{tenant=\"1\",kind=\"quotaLow\"} 1\n",
        "aigw_billing_quota_alerts_total{tenant=\"1\",kind=\"quotaExhausted\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(worker.terminate(15).unwrap().success());
}
