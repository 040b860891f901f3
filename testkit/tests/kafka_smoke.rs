//! The test bed's Kafka is a real broker: consumer groups commit and resume, and split partitions.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{collections::BTreeSet, time::Duration};

use aigw_testkit::{Testbed, unique_name};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
};

const PARTITIONS: i32 = 4;
/// Group joins take seconds on a single broker; be generous.
const GROUP_WAIT: Duration = Duration::from_mins(1);

async fn topic(brokers: &str) -> String {
    let name = unique_name("smoke");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
    name
}

async fn produce(brokers: &str, topic: &str, range: std::ops::Range<u32>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for i in range {
        let key = format!("key-{i}");
        let payload = format!("event-{i}");
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

fn consumer(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap()
}

/// Polls until `want` messages arrived or `patience` ran out, and returns their payloads.
fn read(consumer: &BaseConsumer, want: usize, patience: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + patience;
    while out.len() < want && std::time::Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.unwrap();
            out.push(String::from_utf8(msg.payload().unwrap().to_vec()).unwrap());
        }
    }
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn expected(range: std::ops::Range<u32>) -> Vec<String> {
    sorted(range.map(|i| format!("event-{i}")).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_after_its_committed_offset() {
    let tb = Testbed::load().unwrap();
    let brokers = tb.kafka_brokers().unwrap().to_owned();
    let topic = topic(&brokers).await;
    let group = unique_name("group");

    produce(&brokers, &topic, 0..10).await;
    let first = consumer(&brokers, &group);
    first.subscribe(&[&topic]).unwrap();
    let got = tokio::task::block_in_place(|| read(&first, 10, GROUP_WAIT));
    assert_eq!(sorted(got), expected(0..10));
    first.commit_consumer_state(CommitMode::Sync).unwrap();
    drop(first);

    produce(&brokers, &topic, 10..15).await;
    let second = consumer(&brokers, &group);
    second.subscribe(&[&topic]).unwrap();
    // Read a little longer than needed: a redelivered old message would show up here.
    let got = tokio::task::block_in_place(|| {
        let mut got = read(&second, 5, GROUP_WAIT);
        got.extend(read(&second, 1, Duration::from_secs(3)));
        got
    });
    assert_eq!(
        sorted(got),
        expected(10..15),
        "resumed consumer must see only uncommitted events"
    );

    // The committed offsets add up to every message produced once the second consumer commits.
    second.commit_consumer_state(CommitMode::Sync).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&topic, p);
    }
    let committed = second
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_in_a_group_split_the_partitions() {
    let tb = Testbed::load().unwrap();
    let brokers = tb.kafka_brokers().unwrap().to_owned();
    let topic = topic(&brokers).await;
    let group = unique_name("group");

    let a = consumer(&brokers, &group);
    let b = consumer(&brokers, &group);
    a.subscribe(&[&topic]).unwrap();
    b.subscribe(&[&topic]).unwrap();

    let assigned = |c: &BaseConsumer| -> BTreeSet<i32> {
        c.assignment()
            .unwrap()
            .elements()
            .iter()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    let (pa, pb) = loop {
        // Polling drives the group protocol (joins and rebalances) for each consumer.
        let _ = a.poll(Duration::from_millis(100));
        let _ = b.poll(Duration::from_millis(100));
        let (pa, pb) = (assigned(&a), assigned(&b));
        if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize {
            break (pa, pb);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no split after 60s: {pa:?} / {pb:?}"
        );
    };
    assert!(pa.is_disjoint(&pb), "{pa:?} / {pb:?}");
    let all: BTreeSet<i32> = pa.union(&pb).copied().collect();
    assert_eq!(all, (0..PARTITIONS).collect());
}
