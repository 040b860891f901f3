//! End-to-end billing throughput and latency on the test bed (not a timed test; numbers go to
//! docs/benchmarks.md):
//!
//! 1. produce a backlog of usage events to a fresh topic;
//! 2. read it with a bare rdkafka consumer that only reads — the physical reference;
//! 3. run the release `aigw-billing worker` over the same backlog: sustained events/s from Kafka to
//!    ClickHouse + Redis + MySQL;
//! 4. with the worker caught up, produce waves of events at a steady rate and time each wave from
//!    produce to visible in ClickHouse (p50/p99);
//! 5. the sinks' own rates, each measured bare in the same run with the batch size the worker
//!    used: ClickHouse inserting the same rows (same format, into a copy of `usage_logs`), Redis
//!    doing the calls a batch needs (look up its dedupe keys; settle its events per token, marking
//!    each, and forget them as pending; record their dedupe keys), MySQL committing the aggregates
//!    transaction; the worker is reported as a fraction of the slowest.
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

use aigw_billing::worker::UsageLogRow;
use aigw_common::quota::{FORGET_PENDING, SETTLE, TokenKeys, seen_key};
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

    let before_waves = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    // Latency: 60 waves of 500 events, one every 250 ms (2,000 events/s), produce → visible.
    let waves = 60usize;
    let mut sent_at = Vec::new();
    let mut produce_ms = Vec::new();
    let mut visible_at: Vec<Option<Instant>> = vec![None; waves];
    // The producer's own start (metadata, and the idempotent producer's id from the broker) took
    // ~500 ms of the first wave in every run: one event ahead of the waves pays it, as a running
    // ingest's long-lived producer has. Its id (`…-ahead-0`) has no "-w", so the waves' query skips it.
    let producer = bed.producer();
    bed.produce_with(&producer, &events("ahead", 1)).await;
    for w in 0..waves {
        let batch = events(&format!("w{w}"), 500);
        let at = Instant::now();
        bed.produce_with(&producer, &batch).await;
        produce_ms.push(at.elapsed().as_secs_f64() * 1000.0);
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
    let lat: Vec<f64> = sent_at
        .iter()
        .zip(&visible_at)
        .map(|(s, v)| {
            v.expect("wave never visible")
                .duration_since(*s)
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    // The slow waves, in order: which one, and what the worker logged around it (its stderr is
    // this bench's) is what tells a cause apart from noise.
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let pct =
        |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
    let median = pct(0.5);
    let slow: Vec<String> = lat
        .iter()
        .enumerate()
        .filter(|(_, ms)| **ms > 2.0 * median)
        .map(|(w, ms)| format!("w{w} {ms:.0} ms (produce {:.0} ms)", produce_ms[w]))
        .collect();
    println!(
        "waves slower than twice the median ({median:.0} ms): {}",
        if slow.is_empty() {
            "none".to_owned()
        } else {
            slow.join(", ")
        }
    );
    let after = aigw_testkit::process::http_get(worker.ops_addr, "/metrics")
        .unwrap()
        .1;
    // Per step, during the waves only: batches, and how many of them took over 100 ms.
    let slow_steps = |text: &str| -> std::collections::BTreeMap<String, (f64, f64)> {
        let mut out = std::collections::BTreeMap::new();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("aigw_billing_worker_step_seconds_bucket{") else {
                continue;
            };
            let step = rest
                .split("step=\"")
                .nth(1)
                .and_then(|t| t.split('"').next())
                .unwrap_or("?")
                .to_owned();
            let n: f64 = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let e: &mut (f64, f64) = out.entry(step).or_default();
            if l.contains("le=\"+Inf\"") {
                e.0 = n;
            } else if l.contains("le=\"0.1\"") {
                e.1 = n;
            }
        }
        out
    };
    let (b, a) = (slow_steps(&before_waves), slow_steps(&after));
    let lines: Vec<String> = a
        .iter()
        .map(|(step, (all, fast))| {
            let (all0, fast0) = b.get(step).copied().unwrap_or_default();
            format!(
                "{step} {} ({} > 100 ms)",
                all - all0,
                (all - fast) - (all0 - fast0)
            )
        })
        .collect();
    println!("during the waves, batches by step: {}", lines.join(", "));
    for line in after
        .lines()
        .filter(|l| l.starts_with("aigw_billing_worker_batch_errors_total"))
    {
        println!("  {line}");
    }
    println!(
        "produce → visible in ClickHouse (wave of 500 at 2,000 events/s): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5),
        pct(0.99),
        sorted[sorted.len() - 1]
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

    // The sinks bare, with the worker's batch size.
    let batch = 5_000;
    let refs = [
        (
            "ClickHouse insert",
            bare_clickhouse(&bed, n.min(100_000), batch).await,
        ),
        ("Redis calls", bare_redis(&bed, n.min(100_000), batch).await),
        ("MySQL aggregates", bare_mysql(&bed, 200, batch).await),
    ];
    println!("| measure | events/s | worker as a fraction of it |");
    println!("|---|---:|---:|");
    println!("| worker, Kafka → all sinks | {rate:.0} | 1.00 |");
    println!(
        "| bare Kafka consumer | {bare_rate:.0} | {:.2} |",
        rate / bare_rate
    );
    for (name, r) in &refs {
        println!("| bare {name} | {r:.0} | {:.2} |", rate / r);
    }
    let (slowest, slow) = refs
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .copied()
        .unwrap();
    println!(
        "ratio: | billing worker, events/s | {rate:.0} | slowest sink bare ({slowest}) {slow:.0} | {:.2} | ≥ 0.30 |",
        rate / slow
    );
    println!(
        "ratio: | billing produce → visible in ClickHouse at 2,000 events/s, p99 | {:.0} ms | | | ≤ 500 ms |",
        pct(0.99)
    );
}

/// `n` rows like the worker's, inserted `batch` at a time into a copy of `usage_logs`: events/s.
async fn bare_clickhouse(bed: &Bed, n: usize, batch: usize) -> f64 {
    bed.ch
        .query("CREATE TABLE usage_ref AS usage_logs")
        .execute()
        .await
        .unwrap();
    let rows: Vec<UsageLogRow> = (0..n)
        .map(|i| UsageLogRow {
            event_id: format!("ref-{i}"),
            trace_id: String::new(),
            tenant_id: 1 + (i % 2) as u64,
            user_id: 100,
            token_id: [11, 12, 21][i % 3],
            channel_id: 5,
            model: if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.to_owned(),
            prompt_tokens: 500 + (i % 1000) as u32,
            completion_tokens: 50 + (i % 200) as u32,
            cached_tokens: (i % 100) as u32,
            reasoning_tokens: 0,
            total_tokens: 550 + (i % 1200) as u32,
            cost: 1_234 + i as i64,
            platform_cost: 1_000 + i as i64,
            upstream_cost: 500,
            latency_ms: 850,
            status: "success".to_owned(),
            error_msg: String::new(),
            created_at: 1_790_000_000,
            currency: "USD".to_owned(),
        })
        .collect();
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut insert = bed.ch.insert::<UsageLogRow>("usage_ref").await.unwrap();
        for r in chunk {
            insert.write(r).await.unwrap();
        }
        insert.end().await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    bed.ch
        .query("DROP TABLE usage_ref")
        .execute()
        .await
        .unwrap();
    rate
}

/// What Redis must do for `n` events, `batch` at a time, in three round trips per batch: read the
/// dedupe keys; settle the events of each of three tokens in one call (marking each event) and
/// forget the events as pending; record the dedupe keys. Events/s.
async fn bare_redis(bed: &Bed, n: usize, batch: usize) -> f64 {
    let mut conn = bed.redis_conn().await;
    let run = aigw_testkit::unique_ident("ref");
    let tokens: Vec<TokenKeys> = (0..3)
        .map(|t| TokenKeys::new(&format!("{run}-{t}")))
        .collect();
    let (settle, forget) = (
        redis::Script::new(SETTLE).get_hash().to_owned(),
        redis::Script::new(FORGET_PENDING).get_hash().to_owned(),
    );
    let pending = [
        format!("{}:ref", bed.pending_key),
        format!("{}:ref:events", bed.pending_key),
        format!("{}:ref:grants", bed.pending_key),
    ];
    let started = Instant::now();
    for first in (0..n).step_by(batch) {
        let ids: Vec<String> = (first..(first + batch).min(n))
            .map(|i| format!("{run}/{i}"))
            .collect();
        let seen: Vec<String> = ids.iter().map(|id| seen_key(id)).collect();
        let _: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&seen)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(SETTLE).ignore();
        pipe.cmd("SCRIPT").arg("LOAD").arg(FORGET_PENDING).ignore();
        for (t, keys) in tokens.iter().enumerate() {
            let mine: Vec<usize> = (0..ids.len()).filter(|i| i % 3 == t).collect();
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&settle).arg(5 + mine.len()).arg(&keys.all()[..]);
            for &i in &mine {
                cmd.arg(keys.settled(&format!("event:{}", ids[i])));
            }
            cmd.arg(60);
            for &i in &mine {
                cmd.arg("none").arg(600 + i % 1000);
            }
            pipe.add_command(cmd).ignore();
        }
        for chunk in ids.chunks(500) {
            pipe.cmd("EVALSHA")
                .arg(&forget)
                .arg(3)
                .arg(&pending[..])
                .arg(chunk)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
        let mut record = redis::pipe();
        for key in &seen {
            record
                .cmd("SET")
                .arg(key)
                .arg("1")
                .arg("EX")
                .arg(60)
                .ignore();
        }
        record.query_async::<()>(&mut conn).await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let mut del = redis::cmd("DEL");
    for keys in &tokens {
        del.arg(&keys.all()[..]);
    }
    del.arg(&pending[..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    rate
}

/// The worker's MySQL transaction for a batch of the bench's events (lock three partitions'
/// watermarks; add to four `usage_daily` rows and three tokens' `used_quota`; move the
/// watermarks), `txs` times: events/s at `batch` events per transaction.
async fn bare_mysql(bed: &Bed, txs: usize, batch: usize) -> f64 {
    let started = Instant::now();
    for i in 0..txs {
        let mut tx = bed.db.begin().await.unwrap();
        for p in 0..3 {
            sqlx::query(
                "SELECT next_offset FROM billing_offsets WHERE topic = 'ref' AND part = ? FOR UPDATE",
            )
            .bind(p)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO usage_daily (tenant_id, day, model, requests, prompt_tokens, completion_tokens, \
             cached_tokens, cost, platform_cost, upstream_cost) VALUES \
             (1, '2000-01-01', 'gpt-4o', 1667, 1700000, 200000, 80000, 12.5, 10.1, 3.2), \
             (1, '2000-01-01', 'gpt-4o-mini', 1666, 1700000, 200000, 80000, 1.5, 1.1, 0), \
             (2, '2000-01-01', 'gpt-4o', 834, 850000, 100000, 40000, 6.5, 6.5, 1.6), \
             (2, '2000-01-01', 'gpt-4o-mini', 833, 850000, 100000, 40000, 0.7, 0.7, 0) \
             ON DUPLICATE KEY UPDATE requests = requests + VALUES(requests), \
             prompt_tokens = prompt_tokens + VALUES(prompt_tokens), \
             completion_tokens = completion_tokens + VALUES(completion_tokens), \
             cached_tokens = cached_tokens + VALUES(cached_tokens), cost = cost + VALUES(cost), \
             platform_cost = platform_cost + VALUES(platform_cost), \
             upstream_cost = upstream_cost + VALUES(upstream_cost)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE tokens JOIN (SELECT 11 AS id, 0 AS n UNION ALL SELECT 12, 0 UNION ALL SELECT 21, 0) d \
             ON tokens.id = d.id SET tokens.used_quota = tokens.used_quota + d.n",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        let next = (i as i64 + 1) * 1_667;
        sqlx::query(
            "INSERT INTO billing_offsets (topic, part, next_offset) VALUES ('ref', 0, ?), ('ref', 1, ?), ('ref', 2, ?) \
             ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))",
        )
        .bind(next)
        .bind(next)
        .bind(next)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    (txs * batch) as f64 / started.elapsed().as_secs_f64()
}
