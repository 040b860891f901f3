//! The billing pipeline end to end on the real test bed: events on Kafka → the `aigw-billing worker`
//! process → ClickHouse `usage_logs`, Redis quota, MySQL aggregates, and the dead-letter topic; and
//! the ingest process in front of it.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use aigw_billing::pricing::{self, Price, Usage};
use aigw_common::quota::{ADMIT, TokenKeys};
use aigw_plugin_core::TokenUsage;
use common::{
    Bed, SECRET, clickhouse_sums, dec, event, message, platform_price, post, start_ingest,
    tenant_price,
};
use rand::Rng;
use rust_decimal::Decimal;

#[tokio::test(flavor = "multi_thread")]
async fn an_event_delivered_three_times_is_counted_once_and_poison_is_dead_lettered() {
    let bed = Bed::new("billing_once").await;

    // Token 11 holds a reservation made at admission; settling must release it.
    let keys = TokenKeys::new(&bed.hashes[&11]);
    let mut conn = bed.redis_conn().await;
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
    let unpriced = event(
        "req-c",
        "1",
        12,
        "mystery-model",
        TokenUsage {
            prompt_tokens: Some(5),
            completion_tokens: Some(1),
            ..TokenUsage::default()
        },
    );
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
    // Per tenant and per channel, counted once per billed event (copies are not requests).
    let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    for line in [
        "aigw_billing_requests_total{tenant=\"1\",status=\"success\"} 1\n",
        "aigw_billing_requests_total{tenant=\"globex\",status=\"success\"} 1\n",
        "aigw_billing_tokens_total{tenant=\"1\",kind=\"prompt\"} 1000\n",
        "aigw_billing_tokens_total{tenant=\"globex\",kind=\"prompt\"} 10\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let by_channel: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("aigw_billing_channel_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(by_channel, 2, "{metrics}");
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

#[tokio::test(flavor = "multi_thread")]
async fn ingest_acknowledges_what_kafka_holds_and_the_worker_bills_it() {
    let bed = Bed::new("billing_ingest").await;
    let (ingest, addr) = start_ingest(&bed, None);
    let e = event(
        "req-i",
        "1",
        12,
        "gpt-4o-mini",
        TokenUsage {
            prompt_tokens: Some(2_000_000),
            completion_tokens: Some(1_000_000),
            ..TokenUsage::default()
        },
    );
    let body = serde_json::to_vec(&e).unwrap();

    let (status, json) = post(addr, None, &body);
    assert_eq!(status, 401, "{json}");
    assert_eq!(json["error"]["code"], "unauthorized");
    let (status, json) = post(addr, Some("wrong"), &body);
    assert_eq!(status, 401, "{json}");

    let (status, json) = post(addr, Some(SECRET), br#"{"version":1,"eventId":"x"}"#);
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field"),
        "{json}"
    );

    let (status, json) = post(addr, Some(SECRET), &vec![b' '; 70 * 1024]);
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "invalid_body");

    let (status, json) = post(addr, Some(SECRET), &body);
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["accepted"], e.dedupe_key());

    // The refused body is on the dead-letter topic with its reason, not lost.
    let letters = bed.dead_letters(1);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, "malformed");
    assert!(letters[0].1.contains("\"eventId\":\"x\""), "{letters:?}");

    // Ingest → Kafka → worker → ClickHouse: 2M × 0.15 + 1M × 0.60 per million (platform price).
    let worker = bed.start_worker(100);
    bed.drained(90).await;
    let t1 = clickhouse_sums(&bed.ch, 1, true).await;
    assert_eq!((t1.events, t1.cost.as_str()), (1, "0.900000"));
    assert!(worker.terminate(15).unwrap().success());
    assert!(ingest.terminate(15).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_answers_503_when_kafka_cannot_take_the_event() {
    let bed = Bed::new("billing_ingest_down").await;
    // A port nothing listens on: the producer can never deliver.
    let dead = aigw_testkit::process::free_addr().unwrap().to_string();
    let (ingest, addr) = start_ingest(&bed, Some(&dead));
    let e = event("req-x", "1", 11, "gpt-4o", TokenUsage::default());
    let (status, json) = post(addr, Some(SECRET), &serde_json::to_vec(&e).unwrap());
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"]["code"], "unavailable");
    assert!(ingest.terminate(15).unwrap().success());
}

/// A token whose owner has no account yet is billed to user 0; once the owner accepts an
/// invitation (the identity provider's own transaction sets the id on the tokens naming them),
/// the worker's next directory refresh bills their usage to them.
#[tokio::test(flavor = "multi_thread")]
async fn usage_is_billed_to_the_tokens_owner_once_they_have_an_account() {
    let bed = Bed::new("billing_owner").await;
    // The mirror as the operator writes it for a Token with `spec.owner: nina` and no user nina.
    sqlx::query("UPDATE tokens SET user_id = 0, owner = 'nina' WHERE id = 11")
        .execute(&bed.db)
        .await
        .unwrap();
    let worker = bed.start_worker_with(100, &[("AIGW_REFRESH_SECS", "1")]);
    let usage = TokenUsage {
        prompt_tokens: Some(10),
        completion_tokens: Some(1),
        ..TokenUsage::default()
    };
    let user_of = |id: String| {
        let ch = bed.ch.clone();
        async move {
            ch.query("SELECT user_id FROM usage_logs FINAL WHERE event_id = ?")
                .bind(id)
                .fetch_one::<u64>()
                .await
                .unwrap()
        }
    };
    let first = event("own-1", "1", 11, "gpt-4o", usage.clone());
    bed.produce(&[message(&first)]).await;
    bed.drained(60).await;
    assert_eq!(user_of(first.event_id).await, 0);

    let invitation = aigw_apiserver::sso::store::Invitation {
        tenant_id: 1,
        email: "nina@example.com".into(),
        username: "nina".into(),
        roles: vec![aigw_apiserver::sso::Role::User],
        sales_id: None,
    };
    let secret = aigw_apiserver::sso::store::create_invitation(&bed.db, &invitation, None, 60)
        .await
        .unwrap();
    let (nina, _) =
        aigw_apiserver::sso::store::accept_invitation(&bed.db, 1, &secret, "$argon2id$unused")
            .await
            .unwrap();
    // Past the worker's 1 s directory refresh.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = event("own-2", "1", 11, "gpt-4o", usage);
    bed.produce(&[message(&second)]).await;
    bed.drained(60).await;
    assert_eq!(user_of(second.event_id).await, u64::try_from(nina).unwrap());
    assert!(worker.terminate(15).unwrap().success());
}
