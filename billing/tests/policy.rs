//! The billing policy on the real test bed: a served response is never priced at 0 silently. Usage
//! missing from a 2xx answer is billed at authz's admission estimate (row status `estimated`);
//! without an estimate the event is dead-lettered (`unmetered`); a request admitted but never
//! reported is billed once, at its estimate, by the pending sweep (`estimated_unreported`), and a
//! report arriving after the sweep is a duplicate.
//!
//! Ground truth is computed here from the literal prices with exact decimals, not through the
//! worker's own pricing code. The random mix prints its seed; `AIGW_TEST_SEED=<n>` replays it.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;

use std::time::Duration;

use aigw_common::quota::{ADMIT, PendingKeys, TokenKeys};
use aigw_plugin_core::{Outcome, TokenUsage, UsageEvent};
use common::{Bed, clickhouse_sums, dec, event, message};
use rust_decimal::{Decimal, RoundingStrategy};

/// Acme's own gpt-4o prices per million tokens (the bed's tenant 1): input, output, cached input.
const ACME: (&str, &str, &str) = ("3.00", "12.00", "1.50");

/// The cost of one event at acme's prices, rounded once to 6 decimals, half away from zero.
fn cost(prompt: u64, completion: u64, cached: u64) -> Decimal {
    let (i, o, c) = (dec(ACME.0), dec(ACME.1), dec(ACME.2));
    let raw = (Decimal::from(prompt - cached) * i
        + Decimal::from(cached) * c
        + Decimal::from(completion) * o)
        / Decimal::from(1_000_000u32);
    raw.round_dp_with_strategy(6, RoundingStrategy::MidpointAwayFromZero)
}

/// A small deterministic generator (splitmix64), so a seed replays a run exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn estimate(prompt: u64, completion: u64) -> TokenUsage {
    TokenUsage {
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        ..TokenUsage::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn served_responses_without_usage_are_billed_at_their_estimate() {
    let seed = std::env::var("AIGW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .into()
        });
    println!("AIGW_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let bed = Bed::new("billing_policy").await;

    let (mut want_cost, mut want_tokens, mut want_rows, mut want_unmetered) =
        (Decimal::ZERO, 0u64, 0u64, 0usize);
    let mut events = Vec::new();
    for i in 0..300 {
        let prompt = 1 + rng.below(20_000);
        let completion = rng.below(4_000);
        let cached = rng.below(prompt + 1);
        let est = (1 + rng.below(30_000), rng.below(8_000));
        let has_estimate = rng.below(20) != 0;
        let kind = rng.below(5);
        let mut e = event(&format!("p{i}"), "1", 11, "gpt-4o", TokenUsage::default());
        e.estimate = has_estimate.then(|| estimate(est.0, est.1));
        match kind {
            // Complete, with usage: billed as reported.
            0 | 1 => {
                e.usage = TokenUsage {
                    prompt_tokens: Some(prompt),
                    completion_tokens: Some(completion),
                    cached_input_tokens: Some(cached),
                    ..TokenUsage::default()
                };
                want_cost += cost(prompt, completion, cached);
                want_tokens += prompt + completion;
                want_rows += 1;
            }
            // 2xx without usage (a stream without the usage chunk): the estimate.
            2 => {
                e.outcome = Outcome::NoUsage;
                if has_estimate {
                    want_cost += cost(est.0, est.1, 0);
                    want_tokens += est.0 + est.1;
                    want_rows += 1;
                } else {
                    want_unmetered += 1;
                }
            }
            // A cut stream whose prompt count arrived: that prompt, the estimated output.
            3 => {
                e.outcome = Outcome::Truncated;
                e.stream = true;
                e.usage.prompt_tokens = Some(prompt);
                if has_estimate {
                    want_cost += cost(prompt, est.1, 0);
                    want_tokens += prompt + est.1;
                    want_rows += 1;
                } else {
                    want_unmetered += 1;
                }
            }
            // The upstream failed: nothing is charged, whatever was estimated.
            _ => {
                e.outcome = Outcome::UpstreamError;
                e.status = [429, 500, 503][usize::try_from(rng.below(3)).unwrap()];
                want_rows += 1;
            }
        }
        events.push(e);
    }
    let messages: Vec<_> = events.iter().map(message).collect();
    bed.produce(&messages).await;
    let worker = bed.start_worker(64);
    bed.drained(120).await;

    let sums = clickhouse_sums(&bed.ch, 1, true).await;
    assert_eq!(
        (sums.events, dec(&sums.cost), sums.tokens),
        (want_rows, want_cost, want_tokens),
        "seed {seed}"
    );
    assert_eq!(
        bed.redis_used(11).await,
        i64::try_from(want_tokens).unwrap(),
        "quota settled at what was billed (seed {seed})"
    );
    let estimated: u64 = bed
        .ch
        .query("SELECT count() FROM usage_logs FINAL WHERE status = 'estimated'")
        .fetch_one()
        .await
        .unwrap();
    let zero_served: u64 = bed
        .ch
        .query("SELECT count() FROM usage_logs FINAL WHERE cost = 0 AND status != 'error'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        zero_served, 0,
        "a served response priced at 0 (seed {seed})"
    );
    assert!(estimated > 0, "seed {seed}");
    let letters = bed.dead_letters(want_unmetered);
    assert_eq!(letters.len(), want_unmetered, "seed {seed}");
    assert!(letters.iter().all(|(r, _)| r == "unmetered"), "{letters:?}");
    assert!(worker.terminate(15).unwrap().success());
}

/// What authz records at admission (see the apiserver's authz service): the event to bill if no
/// report arrives, with the estimate.
fn pending_event(id: &str, prompt: u64, completion: u64) -> UsageEvent {
    let mut e = event(id, "1", 11, "gpt-4o", TokenUsage::default());
    e.channel = String::new();
    e.status = 0;
    e.outcome = Outcome::Unreported;
    e.estimated = true;
    e.estimate = Some(estimate(prompt, completion));
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_never_reported_are_billed_once_at_their_estimate() {
    let bed = Bed::new("billing_pending").await;
    let keys = PendingKeys::under(&bed.pending_key);
    let mut conn = bed.redis_conn().await;
    let token = TokenKeys::new(&bed.hashes[&11]);
    let admitted = [
        pending_event("r1", 1_000, 200),
        pending_event("r2", 2_000, 300),
        pending_event("r3", 500, 50),
    ];
    for e in &admitted {
        // Unlimited token, 1 ms reservation: expired at once.
        let (code, _): (i64, i64) = redis::Script::new(ADMIT)
            .key(&token.tat)
            .key(&token.used)
            .key(&token.reserved)
            .key(&token.reservations)
            .key(&token.expiries)
            .key(&keys.set)
            .key(&keys.events)
            .arg(0)
            .arg(-1)
            .arg(0)
            .arg(1)
            .arg(&e.event_id)
            .arg(0)
            .arg(serde_json::to_string(e).unwrap())
            .invoke_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(code, 0);
    }
    // r1's report arrives in time: billed as reported, and no longer pending.
    let mut r1 = admitted[0].clone();
    r1.estimated = false;
    r1.estimate = Some(estimate(1_000, 200));
    r1.status = 200;
    r1.outcome = Outcome::Complete;
    r1.channel = "openai-main".into();
    r1.usage = estimate(100, 10);
    bed.produce(&[message(&r1)]).await;
    let worker = bed.start_worker(64);
    bed.drained(60).await;
    let pending: u64 = redis::cmd("ZCARD")
        .arg(&keys.set)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending, 2, "the billed request was forgotten");

    // The sweep bills the two never reported, at their estimates.
    let mut manager = redis::aio::ConnectionManager::new(bed.tb.redis().unwrap())
        .await
        .unwrap();
    let producer = bed.producer();
    let settings = aigw_billing::pending::Settings {
        keys: keys.clone(),
        topic: bed.topic.clone(),
        grace: Duration::ZERO,
        every: Duration::from_secs(1),
        batch: 100,
    };
    let metrics = aigw_billing::pending::Metrics::default();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let swept = aigw_billing::pending::sweep_once(&mut manager, &producer, &settings, &metrics)
        .await
        .unwrap();
    assert_eq!(swept, 2);
    assert_eq!(
        aigw_billing::pending::sweep_once(&mut manager, &producer, &settings, &metrics)
            .await
            .unwrap(),
        0,
        "swept once"
    );
    // Reports turn up after all. r2 used less than its estimate: already billed, nothing more
    // (never credited). r3 ran longer than its reservation and used more: the excess is billed
    // as a correction, once, however often the report is delivered.
    let mut late = admitted[1].clone();
    late.status = 200;
    late.outcome = Outcome::Complete;
    late.usage = estimate(1_900, 280);
    let mut longer = admitted[2].clone();
    longer.status = 200;
    longer.outcome = Outcome::Complete;
    longer.usage = estimate(900, 80);
    bed.produce(&[message(&late), message(&longer)]).await;
    bed.drained(60).await;
    bed.produce(&[message(&longer)]).await;
    bed.drained(60).await;

    let rows: Vec<(String, String, String)> = bed
        .ch
        .query("SELECT event_id, status, toString(cost) FROM usage_logs FINAL ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    let want = vec![
        (r1.event_id.clone(), "success".to_owned(), cost(100, 10, 0)),
        (
            admitted[1].event_id.clone(),
            "estimated_unreported".to_owned(),
            cost(2_000, 300, 0),
        ),
        (
            admitted[2].event_id.clone(),
            "estimated_unreported".to_owned(),
            cost(500, 50, 0),
        ),
        (
            format!("{}#late", admitted[2].event_id),
            "success".to_owned(),
            cost(400, 30, 0),
        ),
    ];
    let got: Vec<(String, String, Decimal)> =
        rows.into_iter().map(|(i, s, c)| (i, s, dec(&c))).collect();
    assert_eq!(got, want);
    assert_eq!(bed.redis_used(11).await, 110 + 2_300 + 550 + 430);
    assert!(worker.terminate(15).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_quota_counter_is_reseeded_from_mysql() {
    let bed = Bed::new("billing_reseed").await;
    let batch = |from: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + 50)
            .map(|i| {
                message(&event(
                    &format!("f{i}"),
                    "1",
                    11,
                    "gpt-4o",
                    estimate(100, 20),
                ))
            })
            .collect()
    };
    bed.produce(&batch(0)).await;
    let worker = bed.start_worker(16);
    bed.drained(60).await;
    assert_eq!(bed.redis_used(11).await, 50 * 120);
    // Redis loses the counter (this token's keys only: the Redis is shared with other tests).
    let mut conn = bed.redis_conn().await;
    let _: () = redis::cmd("DEL")
        .arg(TokenKeys::new(&bed.hashes[&11]).used)
        .query_async(&mut conn)
        .await
        .unwrap();
    bed.produce(&batch(50)).await;
    bed.drained(60).await;
    let mysql: i64 = sqlx::query_scalar("SELECT used_quota FROM tokens WHERE id = 11")
        .fetch_one(&bed.db)
        .await
        .unwrap();
    assert_eq!(mysql, 100 * 120);
    assert_eq!(
        bed.redis_used(11).await,
        mysql,
        "Redis re-seeded from MySQL, not restarted at 0"
    );
    assert!(worker.terminate(15).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenants_rows_never_mix_currencies() {
    let bed = Bed::new("billing_currency").await;
    // Globex (tenant 2) prices gpt-4o in EUR over a platform list in CNY (the MySQL default the
    // bed's lists have): its events must not be priced; acme's rows carry their currency.
    sqlx::query(
        "INSERT INTO pricing (tenant_id, model, input_price, output_price, currency) VALUES (2, 'gpt-4o', 1, 1, 'EUR')",
    )
    .execute(&bed.db)
    .await
    .unwrap();
    let usage = estimate(1_000, 100);
    let acme = event("c1", "1", 11, "gpt-4o", usage.clone());
    let globex = event("c2", "2", 21, "gpt-4o", usage);
    bed.produce(&[message(&acme), message(&globex)]).await;
    let worker = bed.start_worker(16);
    bed.drained(60).await;
    let rows: Vec<(u64, String)> = bed
        .ch
        .query("SELECT tenant_id, currency FROM usage_logs FINAL ORDER BY tenant_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "CNY".to_owned())]);
    let letters = bed.dead_letters(1);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, "currency_mismatch");
    assert!(worker.terminate(15).unwrap().success());
}
