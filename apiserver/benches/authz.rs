//! Authz load benchmark (`make bench`): the real listener and the test bed's Redis, on loopback.
//!
//! 1. Index `BENCH_AUTHZ_TOKENS` tokens (default 100,000). They are put into the index directly —
//!    the watch path that normally fills it is tested in `tests/authz.rs`; here only the decision
//!    path is measured.
//! 2. Closed loop, 64 keep-alive connections, 10 s: the listener's maximum requests/s.
//! 3. Open loop at 5,000 requests/s for 10 s: p50/p99/max latency, measured from each request's
//!    scheduled send time (no coordinated omission; includes the load generator's own timer and
//!    scheduling delay, since client and server share the 2 cores), and send → response.
//! 4. The bare Redis `ADMIT` call in a loop (64 in flight), the physical reference.
//! 5. Index memory: RSS growth while indexing 1,000,000 tokens.
//!
//! Every token has an RPM limit far above the load and unlimited quota, so every request is
//! admitted and runs the full path: hash, index lookup, host check, one Redis Lua call.

// A benchmark driver: failures abort with their message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aigw_apiserver::authz::{
    index::Index,
    service::{self, Authz, Settings},
};
use aigw_common::{
    ops,
    quota::{ADMIT, TokenKeys},
    shutdown::Shutdown,
};
use aigw_crds::{Tenant, Token};
use aigw_testkit::Testbed;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HOST: &str = "api.bench.example";
/// A typical small chat completion request.
const BODY: &str = r#"{"model":"gpt-4o","max_tokens":512,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Summarise the plot of Hamlet in three sentences."}]}"#;

fn key(i: usize) -> String {
    format!("sk-bench-{i:08}")
}

fn fill(index: &Index, n: usize) {
    let tenant: Tenant = serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "bench"}, "spec": {"type": "reseller", "displayName": "bench"},
        "status": {"tenantId": 1, "domains": [HOST]}}),
    )
    .unwrap();
    index.upsert_tenant(&tenant);
    for i in 0..n {
        let hash = hex::encode(Sha256::digest(key(i).as_bytes()));
        let t: Token = serde_json::from_value(json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": format!("t{i}"), "namespace": "aigw-bench"},
            "spec": {"owner": format!("user{}", i % 1000), "keyHash": hash, "quota": -1, "rateLimit": 1_000_000,
                     "models": ["gpt-4o", "gpt-4o-mini"], "expiresAt": "2030-01-01T00:00:00Z"},
            "status": {"tokenId": i, "phase": "Active", "keyHash": hash}}))
        .unwrap();
        index.upsert_token(&t);
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one authz request and returns its status.
    async fn call(&mut self, key: &str) -> u16 {
        // What ext-auth sends: the path and a typical chat completion body (authz reads both).
        let body = BODY;
        let req = format!(
            "POST /authz HTTP/1.1\r\nhost: authz\r\ncontent-length: {}\r\nx-forwarded-host: {HOST}\r\n\
             x-forwarded-uri: /v1/chat/completions\r\nx-higress-llm-model: gpt-4o\r\n\
             authorization: Bearer {key}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(req.as_bytes()).await.unwrap();
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 2048];
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    return head.split_whitespace().nth(1).unwrap().parse().unwrap();
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tokens = std::env::var("BENCH_AUTHZ_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tb = Testbed::load().expect("test bed env file (scripts/testbed up)");
    let redis = tb.redis().unwrap();

    let index = Index::default();
    let t0 = Instant::now();
    fill(&index, tokens);
    eprintln!(
        "indexed {tokens} tokens in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let manager = redis::aio::ConnectionManager::new(redis.clone())
        .await
        .unwrap();
    // Admitted requests are recorded as pending (nothing bills them here): under keys of this run,
    // deleted at the end.
    let pending =
        aigw_common::quota::PendingKeys::under(&format!("bench:pending:{}", std::process::id()));
    let settings = Settings {
        reserve_estimate: 4096,
        max_in_flight: 0,
        pending: pending.clone(),
        reservation_ttl_ms: 60_000,
        fail_open: false,
    };
    let metrics = service::Metrics::register(&mut prometheus_client::registry::Registry::default());
    let shutdown = Shutdown::new();
    let (addr, _) = ops::serve(
        "127.0.0.1:0".parse().unwrap(),
        service::router(Authz::new(index, manager, settings, metrics)),
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        Conn::open(addr).await.call(&key(0)).await,
        200,
        "warm-up request must be admitted"
    );

    // Closed loop: maximum throughput.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for c in 0..64 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut i = c;
            while Instant::now() < deadline {
                assert_eq!(conn.call(&key(i % tokens)).await, 200);
                done.fetch_add(1, Ordering::Relaxed);
                i += 64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let max_rps = done.load(Ordering::Relaxed) as f64 / 10.0;

    // Open loop at 5,000 req/s: 50 connections × 100 req/s, latency from the scheduled send time.
    let rate = 5_000.0;
    let conns = 50;
    let per_conn = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut lat = Vec::new();
            let offset = per_conn.mul_f64(c as f64 / conns as f64);
            for n in 0u32.. {
                let due = start + offset + per_conn * n;
                if due > start + Duration::from_secs(10) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let sent = Instant::now();
                assert_eq!(
                    conn.call(&key((c + n as usize * conns) % tokens)).await,
                    200
                );
                lat.push((
                    due.elapsed().as_secs_f64() * 1000.0,
                    sent.elapsed().as_secs_f64() * 1000.0,
                ));
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    let mut service_time = Vec::new();
    for t in tasks {
        for (from_due, from_send) in t.await.unwrap() {
            lat.push(from_due);
            service_time.push(from_send);
        }
    }
    lat.sort_by(f64::total_cmp);
    service_time.sort_by(f64::total_cmp);
    let sent = lat.len();

    // Bare Redis: the same Lua call, 64 in flight.
    let script = Arc::new(redis::Script::new(ADMIT));
    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for c in 0..64usize {
        let (script, calls, redis) = (script.clone(), calls.clone(), redis.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
            let mut i = c;
            while Instant::now() < deadline {
                let keys = TokenKeys::new(&format!("bare{}", i % tokens));
                let mut inv = script.prepare_invoke();
                for k in keys.all() {
                    inv.key(k);
                }
                inv.arg(1_000_000).arg(-1).arg(0).arg(60_000).arg("r");
                let _: (i64, i64) = inv.invoke_async(&mut conn).await.unwrap();
                calls.fetch_add(1, Ordering::Relaxed);
                i += 64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let redis_rps = calls.load(Ordering::Relaxed) as f64 / 5.0;
    shutdown.trigger();

    // Index memory with 1,000,000 tokens.
    let before = rss_kib();
    let big = Index::default();
    fill(&big, 1_000_000);
    let index_mib = (rss_kib().saturating_sub(before)) as f64 / 1024.0;
    assert_eq!(big.len(), 1_000_000);

    println!("| measure | value |");
    println!("|---|---|");
    println!("| tokens indexed for the load runs | {tokens} |");
    println!("| max throughput (64 connections, closed loop, 10 s) | {max_rps:.0} req/s |");
    println!(
        "| latency at {rate:.0} req/s (open loop, {sent} requests) p50 | {:.3} ms |",
        pct(&lat, 0.5)
    );
    println!(
        "| latency at {rate:.0} req/s p99 | {:.3} ms |",
        pct(&lat, 0.99)
    );
    println!(
        "| latency at {rate:.0} req/s max | {:.3} ms |",
        pct(&lat, 1.0)
    );
    println!(
        "| send → response at {rate:.0} req/s, p50 / p99 | {:.3} / {:.3} ms |",
        pct(&service_time, 0.5),
        pct(&service_time, 0.99)
    );
    println!("| bare Redis ADMIT Lua call (64 in flight, 5 s) | {redis_rps:.0} calls/s |");
    println!(
        "| authz max throughput / bare Redis call rate | {:.0} % |",
        100.0 * max_rps / redis_rps
    );
    println!("| index memory for 1,000,000 tokens (RSS growth) | {index_mib:.0} MiB |");
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&pending.set)
        .arg(&pending.events)
        .query_async(&mut conn)
        .await
        .unwrap();
}
