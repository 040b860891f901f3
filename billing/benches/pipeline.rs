//! End-to-end billing throughput and latency on the test bed (not a timed test; numbers go to
//! docs/benchmarks.md):
//!
//! 1. produce a backlog of usage events to a fresh topic;
//! 2. read it with a bare rdkafka consumer that only reads — the physical reference;
//! 3. run the release `aigw-billing worker` over the same backlog: sustained events/s from Kafka to
//!    ClickHouse + Redis + MySQL;
//! 4. with the worker caught up, produce waves of events at a steady rate and time each wave from
//!    produce to visible in ClickHouse (p50/p99).
//!
//! `cargo bench -p aigw-billing --bench pipeline` (`make bench` runs it). `BENCH_EVENTS` sets the
//! backlog (default 300,000).

// A measuring harness: casts between counts and floats are the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_wrap,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use aigw_plugin_core::TokenUsage;
use common::{Bed, event, message};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
};

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Wave {
    wave: String,
    n: u64,
}

fn events(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let usage = TokenUsage {
                prompt_tokens: Some(500 + (i as u64 % 1000)),
                completion_tokens: Some(50 + (i as u64 % 200)),
                cached_input_tokens: Some(i as u64 % 100),
                ..TokenUsage::default()
            };
            let (tenant, token) = [("1", 11), ("1", 12), ("2", 21)][i % 3];
            let model = if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
            message(&event(
                &format!("{prefix}-{i}"),
                tenant,
                token,
                model,
                usage,
            ))
        })
        .collect()
}

/// Records when each wave became fully visible in ClickHouse.
async fn poll_visible(ch: &clickhouse::Client, visible_at: &mut [Option<Instant>]) {
    let rows = ch
        .query(
            "SELECT splitByChar('-', event_id)[2] AS wave, count() AS n FROM usage_logs \
             WHERE event_id LIKE '%-w%' GROUP BY wave",
        )
        .fetch_all::<Wave>()
        .await
        .unwrap();
    let now = Instant::now();
    for r in rows {
        let w: usize = r.wave.trim_start_matches('w').parse().unwrap();
        if r.n >= 500 && visible_at[w].is_none() {
            visible_at[w] = Some(now);
        }
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let bed = Bed::new("bench_billing").await;

    let backlog = events("b", n);
    let started = Instant::now();
    bed.produce(&backlog).await;
    let produce_secs = started.elapsed().as_secs_f64();
    println!(
        "produced {n} events in {produce_secs:.1}s ({:.0}/s)",
        n as f64 / produce_secs
    );

    // The physical reference: a consumer that only reads.
    let bare = tokio::task::spawn_blocking({
        let brokers = bed.tb.kafka_brokers().unwrap().to_owned();
        let topic = bed.topic.clone();
        move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", aigw_testkit::unique_ident("bare"))
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            let (mut read, mut first) = (0usize, None);
            while read < n {
                if let Some(Ok(m)) = c.poll(Duration::from_secs(5)) {
                    first.get_or_insert_with(Instant::now);
                    read += usize::from(m.payload().is_some());
                }
            }
            first.unwrap().elapsed().as_secs_f64()
        }
    })
    .await
    .unwrap();
    let bare_rate = n as f64 / bare;
    println!("bare consumer: {n} events in {bare:.2}s = {bare_rate:.0}/s");

    let worker = bed.start_release_worker(5_000);
    // Throughput from the first commit (group join excluded) to the last.
    let mut first_commit = None;
    loop {
        let (done, end) = bed.progress();
        if done > 0 {
            first_commit.get_or_insert((Instant::now(), done));
        }
        if done == end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (t0, done0) = first_commit.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let rate = (n as i64 - done0) as f64 / secs;
    println!(
        "worker: {} events in {secs:.2}s after the first commit = {rate:.0}/s ({:.0}% of bare)",
        n as i64 - done0,
        100.0 * rate / bare_rate
    );

    // Where a batch's time goes (the worker's own step histogram).
    let metrics = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    let mut steps: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("aigw_billing_worker_step_seconds_sum{"))
        .filter_map(|l| {
            let step = l.split('"').nth(1)?.to_owned();
            let secs: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((step, secs))
        })
        .collect();
    let total: f64 = steps.iter().map(|(_, s)| s).sum();
    steps.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shares: Vec<String> = steps
        .iter()
        .map(|(k, v)| format!("{k} {:.0}%", 100.0 * v / total))
        .collect();
    println!("worker time by step: {}", shares.join(", "));

    // Latency: 60 waves of 500 events, one every 250 ms (2,000 events/s), produce → visible.
    let waves = 60usize;
    let mut sent_at = Vec::new();
    let mut visible_at: Vec<Option<Instant>> = vec![None; waves];
    let producer = bed.producer();
    for w in 0..waves {
        let batch = events(&format!("w{w}"), 500);
        let at = Instant::now();
        bed.produce_with(&producer, &batch).await;
        sent_at.push(at);
        let next = at + Duration::from_millis(250);
        loop {
            poll_visible(&bed.ch, &mut visible_at).await;
            if Instant::now() >= next {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while visible_at.iter().any(Option::is_none) && Instant::now() < deadline {
        poll_visible(&bed.ch, &mut visible_at).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat: Vec<f64> = sent_at
        .iter()
        .zip(&visible_at)
        .map(|(s, v)| {
            v.expect("wave never visible")
                .duration_since(*s)
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    println!(
        "produce → visible in ClickHouse (wave of 500 at 2,000 events/s): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );
    println!(
        "worker RSS: {}",
        std::fs::read_to_string(format!("/proc/{}/status", worker.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("?")
    );
    worker.terminate(15).unwrap();
}
