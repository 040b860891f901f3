//! One billing test's slice of the real test bed: its own MySQL database, ClickHouse database,
//! Kafka topics, consumer group and Redis keys, so tests run in parallel without seeing each other;
//! and helpers to run the `aigw-billing` processes against it.

// Test code: a failed unwrap is a failed test with its message. Shared by several test binaries,
// each of which uses a subset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use aigw_billing::pricing::Price;
use aigw_common::quota::TokenKeys;
use aigw_plugin_core::{EVENT_VERSION, Outcome, TokenUsage, UsageEvent};
use aigw_testkit::{Testbed, process::Service, unique_ident};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    producer::{FutureProducer, FutureRecord},
};
use rust_decimal::Decimal;

pub const PARTITIONS: i32 = 3;

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aigw-billing"))
}

pub fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Platform price of gpt-4o and acme's own price, per million tokens.
pub fn platform_price() -> Price {
    Price {
        input: dec("2.50"),
        output: dec("10.00"),
        cached_input: Some(dec("1.25")),
    }
}
pub fn tenant_price() -> Price {
    Price {
        input: dec("3.00"),
        output: dec("12.00"),
        cached_input: Some(dec("1.50")),
    }
}

/// One test's slice of the test bed.
pub struct Bed {
    pub tb: Testbed,
    pub db: sqlx::MySqlPool,
    pub db_url: String,
    pub ch: clickhouse::Client,
    pub ch_db: String,
    pub topic: String,
    pub dlq: String,
    /// This test's `alert.events`.
    pub alerts: String,
    pub group: String,
    /// Key hashes of tokens 11 and 12 (tenant 1) and 21 (tenant 2), unique to this test.
    pub hashes: BTreeMap<u64, String>,
    /// This test's pending keys (`aigw_common::quota::PENDING`).
    pub pending_key: String,
}

impl Drop for Bed {
    /// Deletes the test's Kafka topics: a broker that keeps hundreds of stale topics restarts
    /// slowly, and the broker-restart test must pass run after run on one test bed. (Drop cannot
    /// await, and the test's runtime cannot block: a thread with its own runtime does it.)
    fn drop(&mut self) {
        let brokers = self.tb.kafka_brokers().unwrap_or_default().to_owned();
        let topics = [self.topic.clone(), self.dlq.clone(), self.alerts.clone()];
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(admin) = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create::<AdminClient<DefaultClientContext>>()
                else {
                    return;
                };
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                let _ = admin
                    .delete_topics(
                        &names,
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                    )
                    .await;
            });
        })
        .join();
    }
}

impl Bed {
    pub async fn new(purpose: &str) -> Self {
        let tb = Testbed::load().unwrap();
        let (db_name, db) = tb.scratch_mysql(purpose).await.unwrap();
        aigw_migrations::run_mysql(&db).await.unwrap();
        let url = tb.var("DATABASE_URL").unwrap();
        let db_url = format!("{}/{db_name}", url.rsplit_once('/').unwrap().0);

        let ch_db = unique_ident(purpose);
        let server = clickhouse::Client::default()
            .with_url(tb.var("CLICKHOUSE_URL").unwrap())
            .with_validation(false);
        server
            .query(&format!("CREATE DATABASE `{ch_db}`"))
            .execute()
            .await
            .unwrap();
        let ch = server.with_database(&ch_db);
        aigw_migrations::run_clickhouse(&ch).await.unwrap();

        let topic = unique_ident(&format!("{purpose}_usage"));
        let dlq = format!("{topic}_dlq");
        let alerts = format!("{topic}_alerts");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", tb.kafka_brokers().unwrap())
            .create()
            .unwrap();
        for r in admin
            .create_topics(
                &[
                    NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(1)),
                    NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
                    NewTopic::new(&alerts, 1, TopicReplication::Fixed(1)),
                ],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap()
        {
            r.unwrap();
        }

        // The mirror the operator would have written: two tenants, three tokens, a channel with
        // upstream cost, the platform price list (tenant 0) and tenant 1's own price.
        sqlx::query("INSERT INTO tenants (id, slug, name) VALUES (1, 'acme', 'Acme'), (2, 'globex', 'Globex')")
            .execute(&db)
            .await
            .unwrap();
        let mut hashes = BTreeMap::new();
        for (id, tenant) in [(11u64, 1u64), (12, 1), (21, 2)] {
            let hash = unique_ident(&format!("h{id}"));
            sqlx::query(
                "INSERT INTO tokens (id, tenant_id, user_id, namespace, cr_name, key_hash, key_prefix, quota) \
                 VALUES (?, ?, 100, 'ns', ?, ?, 'sk-x', -1)",
            )
            .bind(id)
            .bind(tenant)
            .bind(format!("tok-{id}"))
            .bind(&hash)
            .execute(&db)
            .await
            .unwrap();
            hashes.insert(id, hash);
        }
        sqlx::query(
            "INSERT INTO channels (id, name, provider, api_key_enc, models, upstream_cost) VALUES \
             (5, 'openai-main', 'openai', x'00', '[\"gpt-4o\"]', \
              '[{\"model\":\"gpt-4o\",\"input\":\"1.00\",\"output\":\"4.00\"}]')",
        )
        .execute(&db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pricing (tenant_id, model, input_price, output_price, cached_input_price) VALUES \
             (0, 'gpt-4o', 2.50, 10.00, 1.25), (1, 'gpt-4o', 3.00, 12.00, 1.50), \
             (0, 'gpt-4o-mini', 0.15, 0.60, NULL)",
        )
        .execute(&db)
        .await
        .unwrap();

        let group = unique_ident(&format!("{purpose}_group"));
        Self {
            tb,
            db,
            db_url,
            ch,
            ch_db,
            topic,
            dlq,
            alerts,
            pending_key: format!("test:{group}:pending"),
            group,
            hashes,
        }
    }

    pub fn start_worker(&self, batch_size: usize) -> Service {
        self.start_worker_bin(bin(), batch_size, &[])
    }

    /// With extra environment (e.g. `AIGW_STATUS_SYNC_SECS`).
    pub fn start_worker_with(&self, batch_size: usize, extra: &[(&str, &str)]) -> Service {
        self.start_worker_bin(bin(), batch_size, extra)
    }

    /// The release build of the worker (benchmarks; `cargo build --release` first).
    pub fn start_release_worker(&self, batch_size: usize) -> Service {
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/aigw-billing");
        assert!(
            release.exists(),
            "build it first: cargo build --release -p aigw-billing"
        );
        self.start_worker_bin(&release, batch_size, &[])
    }

    fn start_worker_bin(&self, bin: &Path, batch_size: usize, extra: &[(&str, &str)]) -> Service {
        let mut envs = self.tb.vars();
        let batch = batch_size.to_string();
        envs.retain(|(k, _)| !matches!(*k, "DATABASE_URL" | "CLICKHOUSE_DATABASE"));
        envs.extend([
            ("DATABASE_URL", self.db_url.as_str()),
            ("CLICKHOUSE_DATABASE", self.ch_db.as_str()),
            ("AIGW_USAGE_TOPIC", self.topic.as_str()),
            ("AIGW_DLQ_TOPIC", self.dlq.as_str()),
            ("AIGW_ALERT_TOPIC", self.alerts.as_str()),
            ("AIGW_BILLING_GROUP", self.group.as_str()),
            ("AIGW_CONSUMER_INSTANCE", "worker-0"),
            ("AIGW_BATCH_SIZE", batch.as_str()),
            ("AIGW_BATCH_WAIT_MS", "50"),
            // This test's own pending keys; the sweep itself is off unless a test turns it on.
            ("AIGW_PENDING_KEY", self.pending_key.as_str()),
            ("AIGW_PENDING_GRACE_SECS", "0"),
            // Tests and benchmarks bill hundreds of thousands of events: their dedupe keys and
            // settle markers expire after half an hour (longer than any test) instead of staying
            // a week in the shared test bed's Redis.
            ("AIGW_DEDUPE_TTL_SECS", "1800"),
        ]);
        envs.extend(extra.iter().copied());
        Service::start(bin, &["worker"], &envs).unwrap()
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.tb.kafka_brokers().unwrap())
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    pub async fn produce(&self, messages: &[(String, Vec<u8>)]) {
        self.produce_with(&self.producer(), messages).await;
    }

    /// Produces with a long-lived producer (creating one costs hundreds of milliseconds).
    pub async fn produce_with(&self, producer: &FutureProducer, messages: &[(String, Vec<u8>)]) {
        for chunk in messages.chunks(10_000) {
            let pending: Vec<_> = chunk
                .iter()
                .map(|(key, payload)| {
                    // send_result enqueues now; `send` would only start when awaited.
                    producer
                        .send_result(FutureRecord::to(&self.topic).key(key).payload(payload))
                        .map_err(|(e, _)| e)
                        .unwrap()
                })
                .collect();
            for p in pending {
                p.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }

    /// Committed offsets of the worker's group summed over partitions, and the log end.
    pub fn progress(&self) -> (i64, i64) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.tb.kafka_brokers().unwrap())
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut end = 0;
        for p in 0..PARTITIONS {
            tpl.add_partition(&self.topic, p);
            end += c
                .fetch_watermarks(&self.topic, p, Duration::from_secs(5))
                .unwrap()
                .1;
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
        let done = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        (done, end)
    }

    /// Waits until the worker has committed everything on the topic.
    pub async fn drained(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (done, end) = self.progress();
            if done == end {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker committed {done} of {end} within {secs}s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The dead-letter topic's messages: (reason header, payload).
    pub fn dead_letters(&self, expect: usize) -> Vec<(String, String)> {
        self.read(&self.dlq, "reason", expect, Duration::from_mins(1))
    }

    /// `topic`'s messages from the start: (the `header` header or else the key, payload), until
    /// `expect` are read or `wait` has passed.
    pub fn read(
        &self,
        topic: &str,
        header: &str,
        expect: usize,
        wait: Duration,
    ) -> Vec<(String, String)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.tb.kafka_brokers().unwrap())
            .set("group.id", unique_ident("reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
                let reason = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == header))
                    .and_then(|h| h.value)
                    .or_else(|| m.key())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                out.push((reason, payload));
            }
        }
        out
    }

    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        self.tb
            .redis()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn redis_used(&self, token: u64) -> i64 {
        let mut conn = self.redis_conn().await;
        let keys = TokenKeys::new(&self.hashes[&token]);
        let v: Option<i64> = redis::cmd("GET")
            .arg(&keys.used)
            .query_async(&mut conn)
            .await
            .unwrap();
        v.unwrap_or(0)
    }
}

/// An event whose id is unique to this run (Redis, where dedupe keys live, is shared by all runs).
pub fn event(id: &str, tenant: &str, token: u64, model: &str, usage: TokenUsage) -> UsageEvent {
    static RUN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| unique_ident("run"));
    UsageEvent {
        version: EVENT_VERSION,
        event_id: format!("{}-{id}", *RUN),
        tenant: tenant.to_owned(),
        user: "alice".into(),
        token: token.to_string(),
        channel: "openai-main".into(),
        model: model.to_owned(),
        response_model: None,
        reservation: "none".into(),
        usage,
        estimated: false,
        estimate: None,
        stream: false,
        status: 200,
        outcome: Outcome::Complete,
        error: None,
        started_at_ms: 1_790_000_000_000,
        ended_at_ms: 1_790_000_000_850,
        trace_parent: None,
    }
}

pub fn message(e: &UsageEvent) -> (String, Vec<u8>) {
    (e.dedupe_key(), serde_json::to_vec(e).unwrap())
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
pub struct Sums {
    pub events: u64,
    pub cost: String,
    pub platform_cost: String,
    pub upstream_cost: String,
    pub tokens: u64,
}

pub async fn clickhouse_sums(ch: &clickhouse::Client, tenant: u64, final_: bool) -> Sums {
    ch.query(&format!(
        "SELECT count() AS events, toString(sum(cost)) AS cost, toString(sum(platform_cost)) AS platform_cost, \
         toString(sum(upstream_cost)) AS upstream_cost, sum(total_tokens) AS tokens \
         FROM usage_logs {} WHERE tenant_id = ?",
        if final_ { "FINAL" } else { "" }
    ))
    .bind(tenant)
    .fetch_one::<Sums>()
    .await
    .unwrap()
}

pub const SECRET: &str = "test-ingest-secret";

pub fn start_ingest(bed: &Bed, brokers: Option<&str>) -> (Service, std::net::SocketAddr) {
    start_ingest_with(bed, brokers, &[])
}

/// With extra environment (e.g. an OTLP endpoint).
pub fn start_ingest_with(
    bed: &Bed,
    brokers: Option<&str>,
    extra: &[(&str, &str)],
) -> (Service, std::net::SocketAddr) {
    let listen = aigw_testkit::process::free_addr().unwrap();
    let listen_s = listen.to_string();
    let mut envs = bed.tb.vars();
    if let Some(b) = brokers {
        envs.retain(|(k, _)| *k != "KAFKA_BROKERS");
        envs.push(("KAFKA_BROKERS", b));
    }
    envs.extend([
        ("AIGW_USAGE_TOPIC", bed.topic.as_str()),
        ("AIGW_DLQ_TOPIC", bed.dlq.as_str()),
        ("AIGW_INGEST_SECRET", SECRET),
        ("AIGW_LISTEN_ADDR", listen_s.as_str()),
        ("AIGW_PRODUCE_TIMEOUT_MS", "1500"),
    ]);
    envs.extend(extra.iter().copied());
    let svc = Service::start(bin(), &["ingest"], &envs).unwrap();
    svc.wait_for("/healthz", 30, |s, _| s == 200).unwrap();
    (svc, listen)
}

pub fn post(
    addr: std::net::SocketAddr,
    secret: Option<&str>,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = secret {
        headers.push(("x-aigw-ingest-secret", s));
    }
    let r = aigw_testkit::process::http_send(addr, "POST", "/v1/usage", &headers, body).unwrap();
    let json = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body));
    (r.status, json)
}
