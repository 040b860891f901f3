//! The shared admission and settlement scripts (`aigw_common::quota`) on the real Redis:
//! concurrent requests never reserve beyond the quota, RPM limits hold, expired reservations come
//! back, and settling is idempotent.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_common::quota::{ADMIT, SETTLE, TokenKeys};
use aigw_testkit::{Testbed, unique_name};
use redis::{Script, aio::MultiplexedConnection};

async fn conn() -> (redis::Client, MultiplexedConnection) {
    let client = Testbed::load().unwrap().redis().unwrap();
    let c = client.get_multiplexed_async_connection().await.unwrap();
    (client, c)
}

async fn admit(
    c: &mut MultiplexedConnection,
    k: &TokenKeys,
    rpm: i64,
    quota: i64,
    est: i64,
    ttl_ms: i64,
    id: &str,
) -> (i64, i64) {
    let script = Script::new(ADMIT);
    let mut inv = script.prepare_invoke();
    for key in k.all() {
        inv.key(key);
    }
    inv.arg(rpm).arg(quota).arg(est).arg(ttl_ms).arg(id);
    let v: Vec<i64> = inv.invoke_async(c).await.unwrap();
    (v[0], v[1])
}

async fn settle(c: &mut MultiplexedConnection, k: &TokenKeys, id: &str, actual: i64) -> (i64, i64) {
    let script = Script::new(SETTLE);
    let mut inv = script.prepare_invoke();
    for key in k.all() {
        inv.key(key);
    }
    inv.key(k.settled(id)).arg(86_400).arg(id).arg(actual);
    let v: Vec<i64> = inv.invoke_async(c).await.unwrap();
    (v[0], v[1])
}

async fn get(c: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("GET")
        .arg(key)
        .query_async::<Option<i64>>(c)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_never_overspend() {
    let (client, mut c) = conn().await;
    let k = TokenKeys::new(&unique_name("tok"));
    let est = 1000;
    let quota = 100 * est;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (client, k) = (client.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            admit(&mut c, &k, 0, quota, est, 60_000, &format!("r{i}"))
                .await
                .0
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap() == 0);
    }
    assert_eq!(admitted, 100);
    assert_eq!(
        get(&mut c, &k.reserved).await,
        quota,
        "reserved total equals, never exceeds, the quota"
    );
}

#[tokio::test]
async fn rpm_limit_refuses_with_retry_after() {
    let (_, mut c) = conn().await;
    let k = TokenKeys::new(&unique_name("tok"));
    for i in 0..5 {
        assert_eq!(
            admit(&mut c, &k, 5, -1, 0, 60_000, &format!("r{i}"))
                .await
                .0,
            0,
            "request {i}"
        );
    }
    let (code, retry) = admit(&mut c, &k, 5, -1, 0, 60_000, "r5").await;
    assert_eq!(code, 1);
    assert!(
        (1..=12_000).contains(&retry),
        "retry after {retry} ms (one slot is 12 s at 5 RPM)"
    );
}

#[tokio::test]
async fn a_refused_request_reserves_nothing_and_expired_reservations_return() {
    let (_, mut c) = conn().await;
    let k = TokenKeys::new(&unique_name("tok"));
    assert_eq!(admit(&mut c, &k, 0, 100, 80, 300, "a").await, (0, 80));
    assert_eq!(
        admit(&mut c, &k, 0, 100, 80, 300, "b").await,
        (2, 20),
        "20 left, 80 wanted"
    );
    assert_eq!(get(&mut c, &k.reserved).await, 80);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        admit(&mut c, &k, 0, 100, 80, 300, "c").await,
        (0, 80),
        "a expired and was reclaimed"
    );
    assert_eq!(get(&mut c, &k.reserved).await, 80);
}

#[tokio::test]
async fn settling_replaces_the_reservation_once() {
    let (_, mut c) = conn().await;
    let k = TokenKeys::new(&unique_name("tok"));
    assert_eq!(
        admit(&mut c, &k, 0, 10_000, 4000, 60_000, "r1").await,
        (0, 4000)
    );
    assert_eq!(settle(&mut c, &k, "r1", 1234).await, (1, 4000));
    assert_eq!(
        (get(&mut c, &k.used).await, get(&mut c, &k.reserved).await),
        (1234, 0)
    );
    assert_eq!(
        settle(&mut c, &k, "r1", 1234).await,
        (0, 0),
        "a redelivered event is not charged twice"
    );
    assert_eq!(get(&mut c, &k.used).await, 1234);
    // Usage without a reservation (unlimited tokens, or one that expired) still counts.
    assert_eq!(settle(&mut c, &k, "none-evt-7", 10).await.0, 1);
    assert_eq!(get(&mut c, &k.used).await, 1244);
}

/// Settles `(marker id, reservation, actual)` events of one token in one call.
async fn settle_many(
    c: &mut MultiplexedConnection,
    k: &TokenKeys,
    events: &[(&str, &str, i64)],
) -> (i64, i64, i64, i64) {
    let script = Script::new(SETTLE);
    let mut inv = script.prepare_invoke();
    for key in k.all() {
        inv.key(key);
    }
    inv.arg(86_400);
    for (marker, reservation, actual) in events {
        inv.key(k.settled(marker)).arg(*reservation).arg(*actual);
    }
    let v: Vec<i64> = inv.invoke_async(c).await.unwrap();
    // settled, released, added, used after (index 2 is `existed`).
    (v[0], v[1], v[3], v[4])
}

#[tokio::test]
async fn a_batch_of_events_settles_each_event_once() {
    let (_, mut c) = conn().await;
    let k = TokenKeys::new(&unique_name("tok"));
    assert_eq!(
        admit(&mut c, &k, 0, 10_000, 100, 60_000, "r1").await,
        (0, 100)
    );
    assert_eq!(
        admit(&mut c, &k, 0, 10_000, 200, 60_000, "r2").await,
        (0, 200)
    );
    assert_eq!(
        settle_many(
            &mut c,
            &k,
            &[("e1", "r1", 10), ("e2", "r2", 20), ("e3", "none", 30)]
        )
        .await,
        (3, 300, 60, 60)
    );
    assert_eq!(
        (get(&mut c, &k.used).await, get(&mut c, &k.reserved).await),
        (60, 0)
    );
    // A replayed batch with one new event: only the new one counts.
    assert_eq!(
        settle_many(&mut c, &k, &[("e2", "r2", 20), ("e4", "none", 5)]).await,
        (1, 0, 5, 65)
    );
    assert_eq!(get(&mut c, &k.used).await, 65);
}
