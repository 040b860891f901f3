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
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};

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
    // Token 11 (tenant 1) gets a quota of 1,000, token 12 one of 50; 21 stays unlimited.
    sqlx::query("UPDATE tokens SET quota = IF(id = 11, 1000, 50) WHERE id IN (11, 12)")
        .execute(&bed.db)
        .await
        .unwrap();
    let worker = bed.start_worker(100);

    // Token 12's very first request uses it up: no Redis counter existed to judge by, so the
    // crossing is judged from MySQL's total.
    bed.produce(&[message(&event("n0", "1", 12, "gpt-4o", usage(60)))])
        .await;
    bed.drained(60).await;

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

    // A channel whose upstream fails every other request (502), among requests a client got
    // wrong itself (400): only the upstream's failures count against the channel.
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
    // A healthy channel that a client floods with its own bad requests: no alert.
    let misused: Vec<_> = (0..30)
        .map(|i| {
            let mut e = event(&format!("m{i}"), "globex", 21, "gpt-4o", usage(1));
            e.channel = "busy-main".into();
            e.outcome = Outcome::UpstreamError;
            e.status = 400;
            e.error = Some("context_length_exceeded".into());
            message(&e)
        })
        .collect();
    bed.produce(&misused).await;
    bed.produce(&flaky).await;
    bed.drained(60).await;

    let records = bed.read(&bed.alerts, "", 5, Duration::from_secs(20));
    let alerts: Vec<(String, AlertEvent)> = records
        .iter()
        .map(|(key, payload)| (key.clone(), serde_json::from_str(payload).unwrap()))
        .collect();
    let kinds: Vec<AlertKind> = alerts.iter().map(|(_, a)| a.kind).collect();
    assert_eq!(
        kinds,
        vec![
            AlertKind::QuotaExhausted,
            AlertKind::QuotaLow,
            AlertKind::QuotaExhausted,
            AlertKind::ChannelDegraded
        ],
        "{records:?}"
    );
    let first = &alerts[0].1;
    assert_eq!(
        (first.token.as_ref().unwrap().name.as_str(), first.used),
        ("tok-12", Some(60))
    );
    let (key, low) = &alerts[1];
    assert_eq!(key, "1", "quota alerts are keyed by the tenant");
    assert_eq!((low.used, low.quota), (Some(900), Some(1000)));
    assert_eq!(low.token.as_ref().unwrap().name, "tok-11");
    assert_eq!(alerts[2].1.used, Some(1000));
    let (key, degraded) = &alerts[3];
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
        "aigw_billing_quota_alerts_total{tenant=\"1\",kind=\"quotaExhausted\"} 2\n",
        "aigw_billing_channel_requests_total{channel=\"unknown\",result=\"failed\"} 15\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(worker.terminate(15).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_found_before_a_failed_step_is_sent_by_the_retry() {
    let bed = Bed::new("alerts_retry").await;
    sqlx::query("UPDATE tokens SET quota = 100 WHERE id = 12")
        .execute(&bed.db)
        .await
        .unwrap();
    let worker = bed.start_worker(100);
    // A first request, so the token has its Redis counter.
    bed.produce(&[message(&event("r0", "1", 12, "gpt-4o", usage(10)))])
        .await;
    bed.drained(60).await;
    // The alert topic is gone until recreated, so sending the alert — the step after all the
    // sinks — fails: the retry settles nothing new (its events are recorded as seen), so only
    // the state kept from the first attempt can still say that the quota was used up.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bed.tb.kafka_brokers().unwrap())
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&[&bed.alerts], &opts).await.unwrap() {
        r.unwrap();
    }
    bed.produce(&[message(&event("r1", "1", 12, "gpt-4o", usage(90)))])
        .await;
    let errors = || {
        let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
            .unwrap()
            .1;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("aigw_billing_worker_batch_errors_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while errors() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sending the alert never failed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        bed.redis_used(12).await,
        100,
        "settled before the failing step"
    );
    for r in admin
        .create_topics(
            &[NewTopic::new(&bed.alerts, 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    bed.drained(90).await;
    let records = bed.read(&bed.alerts, "", 2, Duration::from_secs(15));
    let kinds: Vec<AlertKind> = records
        .iter()
        .map(|(_, p)| serde_json::from_str::<AlertEvent>(p).unwrap().kind)
        .collect();
    assert_eq!(kinds, vec![AlertKind::QuotaExhausted], "{records:?}");
    let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    // The retry resumed after the sinks: both events are counted as billed, none as a copy.
    for line in [
        "aigw_billing_worker_priced_total 2\n",
        "aigw_billing_worker_deduped_total 0\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(worker.terminate(15).unwrap().success());
}
