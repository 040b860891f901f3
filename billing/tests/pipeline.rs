//! The billing pipeline end to end on the real test bed: events on Kafka → the `aigw-billing worker`
//! process → ClickHouse `usage_logs`, Redis quota, MySQL aggregates, and the dead-letter topic.
//!
//! Each test gets its own MySQL database, ClickHouse database, Kafka topics, consumer group and
//! Redis keys, so tests run in parallel without seeing each other.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use aigw_billing::pricing::{self, Price, Usage};
use aigw_common::quota::{ADMIT, TokenKeys};
use aigw_plugin_core::{EVENT_VERSION, Outcome, TokenUsage, UsageEvent};
use aigw_testkit::{Testbed, process::Service, unique_ident};
use rand::Rng;
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    producer::{FutureProducer, FutureRecord},
};
use rust_decimal::Decimal;

const PARTITIONS: i32 = 3;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aigw-billing"))
}

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Platform price of gpt-4o and acme's own price, per million tokens.
fn platform_price() -> Price {
    Price {
        input: dec("2.50"),
        output: dec("10.00"),
        cached_input: Some(dec("1.25")),
    }
}
fn tenant_price() -> Price {
    Price {
        input: dec("3.00"),
        output: dec("12.00"),
        cached_input: Some(dec("1.50")),
    }
}

/// One test's slice of the test bed.
struct Bed {
    tb: Testbed,
    db: sqlx::MySqlPool,
    db_url: String,
    ch: clickhouse::Client,
    ch_db: String,
    topic: String,
    dlq: String,
    group: String,
    /// Key hashes of tokens 11 and 12 (tenant 1) and 21 (tenant 2), unique to this test.
    hashes: BTreeMap<u64, String>,
}

impl Bed {
    async fn new(purpose: &str) -> Self {
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
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", tb.kafka_brokers().unwrap())
            .create()
            .unwrap();
        for r in admin
            .create_topics(
                &[
                    NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(1)),
                    NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
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
            group,
            hashes,
        }
    }

    fn start_worker(&self, batch_size: usize) -> Service {
        let mut envs = self.tb.vars();
        let batch = batch_size.to_string();
        envs.retain(|(k, _)| !matches!(*k, "DATABASE_URL" | "CLICKHOUSE_DATABASE"));
        envs.extend([
            ("DATABASE_URL", self.db_url.as_str()),
            ("CLICKHOUSE_DATABASE", self.ch_db.as_str()),
            ("AIGW_USAGE_TOPIC", self.topic.as_str()),
            ("AIGW_DLQ_TOPIC", self.dlq.as_str()),
            ("AIGW_BILLING_GROUP", self.group.as_str()),
            ("AIGW_CONSUMER_INSTANCE", "worker-0"),
            ("AIGW_BATCH_SIZE", batch.as_str()),
            ("AIGW_BATCH_WAIT_MS", "50"),
        ]);
        Service::start(bin(), &["worker"], &envs).unwrap()
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.tb.kafka_brokers().unwrap())
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .create()
            .unwrap()
    }

    async fn produce(&self, messages: &[(String, Vec<u8>)]) {
        let producer = self.producer();
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
    fn progress(&self) -> (i64, i64) {
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
    async fn drained(&self, secs: u64) {
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
    fn dead_letters(&self, expect: usize) -> Vec<(String, String)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.tb.kafka_brokers().unwrap())
            .set("group.id", unique_ident("dlq_reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[&self.dlq]).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_mins(1);
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
                let reason = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "reason"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                out.push((reason, payload));
            }
        }
        out
    }

    async fn redis_used(&self, token: u64) -> i64 {
        let mut conn = self
            .tb
            .redis()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
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
fn event(id: &str, tenant: &str, token: u64, model: &str, usage: TokenUsage) -> UsageEvent {
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
        stream: false,
        status: 200,
        outcome: Outcome::Complete,
        error: None,
        started_at_ms: 1_790_000_000_000,
        ended_at_ms: 1_790_000_000_850,
    }
}

fn message(e: &UsageEvent) -> (String, Vec<u8>) {
    (e.dedupe_key(), serde_json::to_vec(e).unwrap())
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Sums {
    events: u64,
    cost: String,
    platform_cost: String,
    upstream_cost: String,
    tokens: u64,
}

async fn clickhouse_sums(ch: &clickhouse::Client, tenant: u64, final_: bool) -> Sums {
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

#[tokio::test(flavor = "multi_thread")]
async fn an_event_delivered_three_times_is_counted_once_and_poison_is_dead_lettered() {
    let bed = Bed::new("billing_once").await;

    // Token 11 holds a reservation made at admission; settling must release it.
    let keys = TokenKeys::new(&bed.hashes[&11]);
    let mut conn = bed
        .tb
        .redis()
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (code, reserved): (i64, i64) = redis::Script::new(ADMIT)
        .key(&keys.tat)
        .key(&keys.used)
        .key(&keys.reserved)
        .key(&keys.reservations)
        .key(&keys.expiries)
        .arg(0)
        .arg(1_000_000)
        .arg(4096)
        .arg(600_000)
        .arg("r-a")
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((code, reserved), (0, 4096));

    let mut a = event(
        "req-a",
        "1",
        11,
        "gpt-4o",
        TokenUsage {
            prompt_tokens: Some(1000),
            completion_tokens: Some(500),
            cached_input_tokens: Some(400),
            ..TokenUsage::default()
        },
    );
    a.reservation = "r-a:4096".into();
    let b = event(
        "req-b",
        "globex",
        21,
        "gpt-4o",
        TokenUsage {
            prompt_tokens: Some(10),
            completion_tokens: Some(0),
            ..TokenUsage::default()
        },
    );
    let unpriced = event("req-c", "1", 12, "mystery-model", TokenUsage::default());
    let stranger = event("req-d", "999", 11, "gpt-4o", TokenUsage::default());

    // Delivery 1–3: three copies in one batch, with the others and a poison message.
    let mut first = vec![message(&a), message(&a), message(&b), message(&a)];
    first.push(("poison".into(), b"{not json".to_vec()));
    first.push(message(&unpriced));
    first.push(message(&stranger));
    bed.produce(&first).await;
    let worker = bed.start_worker(100);
    bed.drained(90).await;
    // Another copy in a later batch, then one more after a restart.
    bed.produce(&[message(&a)]).await;
    bed.drained(30).await;
    assert!(worker.terminate(15).unwrap().success());
    bed.produce(&[message(&a)]).await;
    let worker = bed.start_worker(100);
    bed.drained(90).await;

    // Counted once everywhere — even without FINAL, since later copies never reached ClickHouse.
    for final_ in [false, true] {
        let t1 = clickhouse_sums(&bed.ch, 1, final_).await;
        assert_eq!(t1.events, 1, "final={final_}");
        // (600 × 3.00 + 400 × 1.50 + 500 × 12.00) / 1e6; platform at 2.50/1.25/10.00; upstream 1.00/4.00.
        assert_eq!(
            (
                t1.cost.as_str(),
                t1.platform_cost.as_str(),
                t1.upstream_cost.as_str(),
                t1.tokens
            ),
            ("0.008400", "0.007000", "0.003000", 1500)
        );
        let t2 = clickhouse_sums(&bed.ch, 2, final_).await;
        // No own price: the platform's applies. 10 × 2.50 / 1e6.
        assert_eq!(
            (t2.events, t2.cost.as_str(), t2.platform_cost.as_str()),
            (1, "0.000025", "0.000025")
        );
    }
    assert_eq!(bed.redis_used(11).await, 1500);
    assert_eq!(bed.redis_used(21).await, 10);
    let reserved: Option<i64> = redis::cmd("GET")
        .arg(&keys.reserved)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(reserved, Some(0), "the reservation is released");

    let used: Vec<(i64, i64)> = sqlx::query_as("SELECT id, used_quota FROM tokens ORDER BY id")
        .fetch_all(&bed.db)
        .await
        .unwrap();
    assert_eq!(used, vec![(11, 1500), (12, 0), (21, 10)]);
    let daily: Vec<(i64, String, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT tenant_id, model, requests, cost, platform_cost FROM usage_daily ORDER BY tenant_id",
    )
    .fetch_all(&bed.db)
    .await
    .unwrap();
    assert_eq!(
        daily,
        vec![
            (1, "gpt-4o".into(), 1, dec("0.0084"), dec("0.007")),
            (2, "gpt-4o".into(), 1, dec("0.000025"), dec("0.000025")),
        ]
    );

    // Poison, unpriced and unknown-tenant messages are kept with their reasons.
    let mut reasons: Vec<String> = bed.dead_letters(3).into_iter().map(|(r, _)| r).collect();
    reasons.sort();
    assert_eq!(reasons, vec!["malformed", "unknown_tenant", "unpriced"]);

    let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics.contains("aigw_billing_worker_deduped_total"),
        "{metrics}"
    );
    assert!(worker.terminate(15).unwrap().success());
}

/// Ground truth for the crash test, priced independently of the worker's directory.
#[derive(Debug, Default, PartialEq, Eq)]
struct Truth {
    events: u64,
    cost: Decimal,
    platform_cost: Decimal,
    tokens: u64,
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_batch_loses_nothing_and_charges_nothing_twice() {
    const EVENTS: usize = 100_000;
    let bed = Bed::new("billing_crash").await;
    let mut rng = rand::rng();

    // 100,000 distinct events over two tenants, three tokens and two models, plus 1% re-sent
    // copies scattered later in the stream.
    let tokens = [(11u64, "1", 1u64), (12, "1", 1), (21, "2", 2)];
    let mut truth: BTreeMap<u64, Truth> = BTreeMap::new();
    let mut used: BTreeMap<u64, i64> = BTreeMap::new();
    let mut messages = Vec::with_capacity(EVENTS + EVENTS / 100);
    let mut ids = HashSet::new();
    for i in 0..EVENTS {
        let (token, tenant, tenant_id) = tokens[i % 3];
        let model = if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
        let prompt = rng.random_range(0..20_000u64);
        let usage = TokenUsage {
            prompt_tokens: Some(prompt),
            completion_tokens: Some(rng.random_range(0..4_000)),
            cached_input_tokens: Some(rng.random_range(0..=prompt)),
            ..TokenUsage::default()
        };
        let e = event(&format!("ev-{i}"), tenant, token, model, usage.clone());
        let u = Usage {
            prompt_tokens: usage.prompt_tokens.unwrap(),
            completion_tokens: usage.completion_tokens.unwrap(),
            cached_input_tokens: usage.cached_input_tokens.unwrap(),
        };
        let (platform, own) = if model == "gpt-4o" {
            (platform_price(), (tenant_id == 1).then(tenant_price))
        } else {
            let p = Price {
                input: dec("0.15"),
                output: dec("0.60"),
                cached_input: None,
            };
            (p, None)
        };
        let t = truth.entry(tenant_id).or_default();
        t.events += 1;
        t.cost += pricing::amount(&u, own.as_ref().unwrap_or(&platform));
        t.platform_cost += pricing::amount(&u, &platform);
        t.tokens += u.prompt_tokens + u.completion_tokens;
        *used.entry(token).or_default() +=
            i64::try_from(u.prompt_tokens + u.completion_tokens).unwrap();
        ids.insert(e.event_id.clone());
        messages.push(message(&e));
    }
    for _ in 0..EVENTS / 100 {
        let copy = messages[rng.random_range(0..EVENTS)].clone();
        let at = rng.random_range(EVENTS / 2..messages.len());
        messages.insert(at, copy);
    }
    bed.produce(&messages).await;

    // Kill -9 at random points while there is work left; count only kills that hit a live run.
    let mut worker = bed.start_worker(1_000);
    let mut mid_run_kills = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..1_200))).await;
        let (done, end) = bed.progress();
        worker.kill().unwrap();
        worker = bed.start_worker(1_000);
        if done < end {
            mid_run_kills += 1;
        } else {
            break;
        }
    }
    bed.drained(300).await;
    assert!(
        mid_run_kills >= 5,
        "only {mid_run_kills} kills hit a run with work left; the test proves nothing"
    );

    let raw = clickhouse_sums(&bed.ch, 1, false).await.events
        + clickhouse_sums(&bed.ch, 2, false).await.events;
    eprintln!(
        "{mid_run_kills} kill -9 mid-run; ClickHouse holds {raw} raw rows for {EVENTS} events (copies collapse under FINAL)"
    );
    for (tenant, t) in &truth {
        let got = clickhouse_sums(&bed.ch, *tenant, true).await;
        assert_eq!(got.events, t.events, "tenant {tenant}: events");
        assert_eq!(dec(&got.cost), t.cost, "tenant {tenant}: cost");
        assert_eq!(
            dec(&got.platform_cost),
            t.platform_cost,
            "tenant {tenant}: platform cost"
        );
        assert_eq!(got.tokens, t.tokens, "tenant {tenant}: tokens");
        let (requests, cost, platform_cost): (Decimal, Decimal, Decimal) = sqlx::query_as(
            "SELECT SUM(requests), SUM(cost), SUM(platform_cost) FROM usage_daily WHERE tenant_id = ?",
        )
        .bind(tenant)
        .fetch_one(&bed.db)
        .await
        .unwrap();
        assert_eq!(
            (requests, cost, platform_cost),
            (Decimal::from(t.events), t.cost, t.platform_cost),
            "tenant {tenant}: mysql aggregates"
        );
    }
    for (token, want) in &used {
        assert_eq!(
            bed.redis_used(*token).await,
            *want,
            "token {token}: redis used"
        );
        let got: i64 = sqlx::query_scalar("SELECT used_quota FROM tokens WHERE id = ?")
            .bind(token)
            .fetch_one(&bed.db)
            .await
            .unwrap();
        assert_eq!(got, *want, "token {token}: mysql used_quota");
    }
    assert_eq!(ids.len(), EVENTS);
    worker.terminate(15).unwrap();
}
