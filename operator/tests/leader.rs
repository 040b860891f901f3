//! Leader election against the real apiserver: one holder at a time, hand-over on release and on
//! expiry, and exactly one winner when candidates race.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aigw_operator::leader::Elector;
use aigw_testkit::{Testbed, scratch_namespace, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

async fn setup() -> (Client, String, String) {
    let client = Testbed::load().unwrap().kube_client().await.unwrap();
    let ns = scratch_namespace(&client, "lease").await.unwrap();
    (client, ns, unique_name("op"))
}

#[tokio::test]
async fn one_holder_at_a_time_and_hand_over_on_release() {
    let (client, ns, lease) = setup().await;
    let a = Elector::new(client.clone(), &ns, &lease, "a", Duration::from_secs(30));
    let b = Elector::new(client.clone(), &ns, &lease, "b", Duration::from_secs(30));
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap(), "a holds a fresh lease");
    assert!(a.try_acquire().await.unwrap(), "the holder renews");
    a.release().await.unwrap();
    assert!(
        b.try_acquire().await.unwrap(),
        "released: b takes over at once"
    );
    assert!(!a.try_acquire().await.unwrap());
    let l = Api::<Lease>::namespaced(client, &ns)
        .get(&lease)
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(l.holder_identity.as_deref(), Some("b"));
    assert_eq!(l.lease_transitions, Some(1));
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let (client, ns, lease) = setup().await;
    let a = Elector::new(client.clone(), &ns, &lease, "a", Duration::from_secs(1));
    let b = Elector::new(client.clone(), &ns, &lease, "b", Duration::from_secs(1));
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(b.try_acquire().await.unwrap(), "a stopped renewing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_candidates_elect_exactly_one() {
    let (client, ns, lease) = setup().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let e = Elector::new(
            client.clone(),
            &ns,
            &lease,
            &format!("c{i}"),
            Duration::from_secs(30),
        );
        tasks.push(tokio::spawn(async move { e.try_acquire().await.unwrap() }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn a_holder_with_a_slow_clock_keeps_its_lease_while_it_renews() {
    // The holder's clock is an hour behind: every renew time it writes looks long expired to the
    // candidate's clock. Expiry is judged by how long the lease stays unchanged on the candidate's
    // own clock, so the candidate must wait while the holder keeps renewing.
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec,
        apimachinery::pkg::apis::meta::v1::MicroTime,
        jiff::{SignedDuration, Timestamp},
    };
    let (client, ns, lease) = setup().await;
    let api = Api::<Lease>::namespaced(client.clone(), &ns);
    let behind = |n: i64| {
        Some(MicroTime(
            Timestamp::now() - SignedDuration::from_hours(1) + SignedDuration::from_millis(n),
        ))
    };
    let mut l = Lease::default();
    l.metadata.name = Some(lease.clone());
    l.spec = Some(LeaseSpec {
        holder_identity: Some("slow".into()),
        lease_duration_seconds: Some(1),
        renew_time: behind(0),
        ..LeaseSpec::default()
    });
    api.create(&kube::api::PostParams::default(), &l)
        .await
        .unwrap();
    let b = Elector::new(client.clone(), &ns, &lease, "b", Duration::from_secs(1));
    for i in 1..=6 {
        assert!(
            !b.try_acquire().await.unwrap(),
            "took a lease being renewed (round {i})"
        );
        let mut cur = api.get(&lease).await.unwrap();
        cur.spec.as_mut().unwrap().renew_time = behind(i * 500);
        api.replace(&lease, &kube::api::PostParams::default(), &cur)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The holder stops renewing: after one lease duration unchanged, the candidate takes over.
    assert!(!b.try_acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(b.try_acquire().await.unwrap());
}
