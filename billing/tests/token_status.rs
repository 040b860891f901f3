//! The worker writes a token's usage back to its Token CR on the real kube-apiserver: at once when
//! the quota is used up, otherwise at a bounded rate.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use aigw_crds::Token;
use aigw_plugin_core::TokenUsage;
use common::{Bed, event, message};
use kube::{Api, api::PostParams};

async fn used_quota(api: &Api<Token>, name: &str) -> Option<i64> {
    api.get_status(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.used_quota)
}

#[tokio::test(flavor = "multi_thread")]
async fn used_quota_reaches_the_token_at_once_when_exhausted_and_at_a_bounded_rate_otherwise() {
    let bed = Bed::new("billing_status").await;
    let client = bed.tb.kube_client().await.unwrap();
    let ns = aigw_testkit::scratch_namespace(&client, "billing-status")
        .await
        .unwrap();
    let api: Api<Token> = Api::namespaced(client.clone(), &ns);
    let hash = format!("{:064x}", rand::random::<u128>());
    let token: Token = serde_json::from_value(serde_json::json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
        "metadata": {"name": "quota-1000", "namespace": ns},
        "spec": {"owner": "alice", "keyHash": hash, "quota": 1000}
    }))
    .unwrap();
    api.create(&PostParams::default(), &token).await.unwrap();
    // The mirror row the operator would write for it.
    sqlx::query(
        "INSERT INTO tokens (id, tenant_id, user_id, namespace, cr_name, key_hash, key_prefix, quota) \
         VALUES (31, 1, 100, ?, 'quota-1000', ?, 'sk-x', 1000)",
    )
    .bind(&ns)
    .bind(&hash)
    .execute(&bed.db)
    .await
    .unwrap();

    let usage = |p: u64| TokenUsage {
        prompt_tokens: Some(p),
        completion_tokens: Some(0),
        ..TokenUsage::default()
    };
    let worker = bed.start_worker_with(100, &[("AIGW_STATUS_SYNC_SECS", "4")]);
    // 1. First sight: written.
    bed.produce(&[message(&event("s1", "1", 31, "gpt-4o", usage(100)))])
        .await;
    bed.drained(60).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while used_quota(&api, "quota-1000").await != Some(100) {
        assert!(Instant::now() < deadline, "usedQuota never became 100");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 2. More usage soon after: held back by the rate limit…
    let t = Instant::now();
    bed.produce(&[message(&event("s2", "1", 31, "gpt-4o", usage(200)))])
        .await;
    bed.drained(60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if t.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            used_quota(&api, "quota-1000").await,
            Some(100),
            "written too soon"
        );
    }
    // 3. …but exhaustion is written at once, with the newest total.
    bed.produce(&[message(&event("s3", "1", 31, "gpt-4o", usage(800)))])
        .await;
    bed.drained(60).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while used_quota(&api, "quota-1000").await != Some(1100) {
        assert!(Instant::now() < deadline, "exhaustion not written at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate(15).unwrap().success());
}
