//! Authz load benchmark (`make bench`): the real listener and the test bed's Redis, on loopback.
//!
//! The load comes from a second process — this binary again, in generator mode — pinned to CPU 1
//! with `taskset`, while the server process is pinned to CPU 0 (Redis is left to the scheduler):
//! the generator's own timers and tasks no longer share a core with the server.
//!
//! 1. Index `BENCH_AUTHZ_TOKENS` tokens (default 100,000). They are put into the index directly —
//!    the watch path that normally fills it is tested in `tests/authz.rs`; here only the decision
//!    path is measured.
//! 2. Closed loop, 64 keep-alive connections, 5 s: the listener's maximum requests/s.
//! 3. Right after it, the physical reference from the same pinned generator: the bare Redis
//!    `ADMIT` call authz makes — the same eight keys and arguments, a pending record of the same
//!    size — 64 in flight, 5 s. Steps 2 and 3 alternate four times; the ratio of each pair is
//!    taken, and the median reported. Each process's CPU time (server, Redis, generator) over
//!    these runs is reported per request: on two cores, their sum is what bounds the closed loop.
//! 4. Open loop at 5,000 requests/s for 10 s: p50/p99/max latency, measured from each request's
//!    scheduled send time (no coordinated omission) and from send to response.
//! 5. The latency reference: the same bare call at 5,000 calls/s, open loop, over one multiplexed
//!    connection as authz uses: send → response p50/p99.
//! 6. Index memory: RSS growth while indexing 1,000,000 tokens.
//!
//! Every token has an RPM limit far above the load and unlimited quota, so every request is
//! admitted and runs the full path: body parse, hash, index lookup, host check, one Redis Lua call
//! that also records the request as pending.

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
    quota::{ADMIT, PendingKeys, TokenKeys},
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

#[global_allocator]
static GLOBAL: aigw_apiserver::Allocator = aigw_apiserver::Allocator;

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

/// The bare `ADMIT` call authz makes for an admitted request: the same eight keys and arguments,
/// a pending record of the same size (~500 bytes).
#[derive(Clone)]
struct BareAdmit {
    conn: redis::aio::MultiplexedConnection,
    script: Arc<redis::Script>,
    pending: PendingKeys,
    record: Arc<String>,
}

impl BareAdmit {
    async fn connect() -> Self {
        let redis = Testbed::load().unwrap().redis().unwrap();
        Self {
            conn: redis.get_multiplexed_async_connection().await.unwrap(),
            script: Arc::new(redis::Script::new(ADMIT)),
            pending: PendingKeys::under(&env("AIGW_BENCH_PENDING")),
            record: Arc::new("x".repeat(500)),
        }
    }

    async fn call(&mut self, c: usize, i: usize, tokens: usize) {
        let hash = format!("bare{}", i % tokens);
        let keys = TokenKeys::new(&hash);
        let mut inv = self.script.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        inv.key(&self.pending.set)
            .key(&self.pending.events)
            .key(&self.pending.grants)
            .arg(1_000_000)
            .arg(-1)
            .arg(4096)
            .arg(60_000)
            .arg(format!("r{c}-{i}"))
            .arg(0)
            .arg(self.record.as_str())
            .arg(0)
            .arg(format!("g{c}-{i}:{hash}"));
        let _: (i64, i64) = inv.invoke_async(&mut self.conn).await.unwrap();
    }
}

/// Where an open-loop generator's requests go.
enum Caller {
    Authz(Conn),
    Redis(BareAdmit),
}

impl Caller {
    /// Request `i` of connection `c`; authz must admit it.
    async fn call(&mut self, c: usize, i: usize, tokens: usize) {
        match self {
            Self::Authz(conn) => assert_eq!(conn.call(&key(i % tokens)).await, 200),
            Self::Redis(bare) => bare.call(c, i, tokens).await,
        }
    }
}

/// CPU seconds (user + system, all threads) process `pid` has used; `/proc/<pid>/stat` counts
/// them in clock ticks of 1/100 s (`CLK_TCK` is 100 on Linux).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The generator's modes (`AIGW_BENCH_GENERATE`), each printing one line of results.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// 64 connections as fast as the server answers, 10 s: requests/s.
    Closed,
    /// 5,000 requests/s over 50 connections, 10 s: latencies.
    Open,
    /// The bare `ADMIT` call, 64 in flight, 5 s: calls/s.
    Redis,
    /// The bare `ADMIT` call at 5,000 calls/s over one multiplexed connection, 10 s: latencies.
    RedisOpen,
}

/// The closed loop and the bare reference alternate in this many pairs of runs, each run this
/// long: this machine's speed drifts over tens of seconds (other tenants of the host), so each
/// ratio compares runs seconds apart, and the median of the pairs is reported.
const PAIRS: usize = 4;
const PAIR_SECS: u64 = 5;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// Generator mode: runs `mode` against `AIGW_BENCH_ADDR` and prints its result.
async fn generate(mode: &str) {
    let tokens: usize = env("AIGW_BENCH_TOKENS").parse().unwrap();
    let addr: SocketAddr = env("AIGW_BENCH_ADDR").parse().unwrap();
    // How long the closed-loop and bare runs last.
    let secs: f64 = env("AIGW_BENCH_SECS").parse().unwrap();
    match mode {
        "closed" => {
            let done = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
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
            println!(
                "{} {}",
                done.load(Ordering::Relaxed) as f64 / secs,
                cpu_secs("self")
            );
        }
        "open" | "redis-open" => {
            let rate = 5_000.0;
            let conns = 50;
            // The bare reference shares one multiplexed Redis connection, as authz does.
            let bare = (mode == "redis-open").then(BareAdmit::connect);
            let bare = match bare {
                Some(b) => Some(b.await),
                None => None,
            };
            let per_conn = Duration::from_secs_f64(conns as f64 / rate);
            let start = Instant::now() + Duration::from_millis(100);
            let mut tasks = Vec::new();
            for c in 0..conns {
                let bare = bare.clone();
                tasks.push(tokio::spawn(async move {
                    let mut conn = match bare {
                        Some(b) => Caller::Redis(b),
                        None => Caller::Authz(Conn::open(addr).await),
                    };
                    let mut lat = Vec::new();
                    let offset = per_conn.mul_f64(c as f64 / conns as f64);
                    for n in 0u32.. {
                        let due = start + offset + per_conn * n;
                        if due > start + Duration::from_secs(10) {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        let sent = Instant::now();
                        conn.call(c, c + n as usize * conns, tokens).await;
                        lat.push((
                            due.elapsed().as_secs_f64() * 1000.0,
                            sent.elapsed().as_secs_f64() * 1000.0,
                        ));
                    }
                    lat
                }));
            }
            let (mut lat, mut service_time) = (Vec::new(), Vec::new());
            for t in tasks {
                for (from_due, from_send) in t.await.unwrap() {
                    lat.push(from_due);
                    service_time.push(from_send);
                }
            }
            lat.sort_by(f64::total_cmp);
            service_time.sort_by(f64::total_cmp);
            println!(
                "{} {} {} {} {} {}",
                lat.len(),
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                pct(&lat, 1.0),
                pct(&service_time, 0.5),
                pct(&service_time, 0.99)
            );
        }
        "redis" => {
            let calls = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut tasks = Vec::new();
            for c in 0..64usize {
                let calls = calls.clone();
                tasks.push(tokio::spawn(async move {
                    // One connection per task: the most the bare call can do.
                    let mut bare = BareAdmit::connect().await;
                    let mut i = c;
                    while Instant::now() < deadline {
                        bare.call(c, i, tokens).await;
                        calls.fetch_add(1, Ordering::Relaxed);
                        i += 64;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            println!(
                "{} {}",
                calls.load(Ordering::Relaxed) as f64 / secs,
                cpu_secs("self")
            );
        }
        other => panic!("unknown generator mode {other}"),
    }
}

/// Runs the generator in its own process pinned to CPU 1; returns its result line's numbers.
fn run_generator(mode: Mode, addr: SocketAddr, tokens: usize, pending: &str) -> Vec<f64> {
    let exe = std::env::current_exe().unwrap();
    let mode = match mode {
        Mode::Closed => "closed",
        Mode::Open => "open",
        Mode::Redis => "redis",
        Mode::RedisOpen => "redis-open",
    };
    let out = std::process::Command::new("taskset")
        .arg("-c")
        .arg("1")
        .arg(exe)
        .env("AIGW_BENCH_GENERATE", mode)
        .env("AIGW_BENCH_ADDR", addr.to_string())
        .env("AIGW_BENCH_TOKENS", tokens.to_string())
        .env("AIGW_BENCH_PENDING", pending)
        .env("AIGW_BENCH_SECS", PAIR_SECS.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generator {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn main() {
    if let Ok(mode) = std::env::var("AIGW_BENCH_GENERATE") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(generate(&mode));
        return;
    }
    // The server's process on CPU 0 (its threads, and those it starts later, inherit it).
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .output()
        .unwrap();
    assert!(pinned.status.success(), "taskset: {pinned:?}");
    // As the binary's `#[tokio::main]`: one worker per CPU the process may use — here the one it
    // is pinned to (the default reads the affinity mask set just above).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(serve());
}

async fn serve() {
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
    let under = format!("bench:pending:{}", std::process::id());
    let pending = PendingKeys::under(&under);
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

    let run = |mode| {
        let under = under.clone();
        tokio::task::spawn_blocking(move || run_generator(mode, addr, tokens, &under))
    };
    // Where the CPU goes: each process's CPU time over the closed loop and over the bare
    // reference, per request. Redis is the test bed's server, found by its own report.
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis_pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned();
    let me = std::process::id().to_string();
    // CPU seconds over all pairs: server, Redis, generator in the closed loops; Redis, generator
    // in the bare runs. Then the rates of each pair.
    let (mut closed_cpu, mut bare_cpu) = ((0.0, 0.0, 0.0), (0.0, 0.0));
    let (mut closed_rates, mut bare_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        let before = (cpu_secs(&me), cpu_secs(&redis_pid));
        let closed = run(Mode::Closed).await.unwrap();
        closed_cpu.0 += cpu_secs(&me) - before.0;
        closed_cpu.1 += cpu_secs(&redis_pid) - before.1;
        closed_cpu.2 += closed[1];
        let before = cpu_secs(&redis_pid);
        let bare = run(Mode::Redis).await.unwrap();
        bare_cpu.0 += cpu_secs(&redis_pid) - before;
        bare_cpu.1 += bare[1];
        closed_rates.push(closed[0]);
        bare_rates.push(bare[0]);
        ratios.push(closed[0] / bare[0]);
    }
    let open = run(Mode::Open).await.unwrap();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        f64::midpoint(v[(v.len() - 1) / 2], v[v.len() / 2])
    };
    let (max_rps, redis_rps, ratio) = (median(&closed_rates), median(&bare_rates), median(&ratios));
    let redis_open = run(Mode::RedisOpen).await.unwrap();
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
    let list = |v: &[f64], scale: f64| {
        v.iter()
            .map(|x| format!("{:.0}", x * scale))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| max throughput (64 connections, closed loop, {PAIR_SECS} s), median of {PAIRS} | {max_rps:.0} req/s ({}) |",
        list(&closed_rates, 1.0)
    );
    println!(
        "| latency at 5000 req/s (open loop, {} requests) p50 / p99 / max, from the scheduled send | {:.3} / {:.3} / {:.3} ms |",
        open[0], open[1], open[2], open[3]
    );
    println!(
        "| send → response at 5000 req/s, p50 / p99 | {:.3} / {:.3} ms |",
        open[4], open[5]
    );
    println!(
        "| bare Redis ADMIT call, 8 keys (64 in flight, {PAIR_SECS} s), median of {PAIRS}, each right after a closed loop | {redis_rps:.0} calls/s ({}) |",
        list(&bare_rates, 1.0)
    );
    println!(
        "| authz max throughput / bare Redis call rate, median of the {PAIRS} pairs | {:.0} % ({} %) |",
        100.0 * ratio,
        list(&ratios, 100.0)
    );
    println!("| index memory for 1,000,000 tokens (RSS growth) | {index_mib:.0} MiB |");
    // µs of CPU per request and per bare call, over all pairs.
    let wall = (PAIRS as u64 * PAIR_SECS) as f64;
    let n_closed: f64 = closed_rates.iter().sum::<f64>() * PAIR_SECS as f64;
    let n_bare: f64 = bare_rates.iter().sum::<f64>() * PAIR_SECS as f64;
    let us = |secs: f64, n: f64| secs * 1e6 / n;
    let authz_sum = us(closed_cpu.0 + closed_cpu.1 + closed_cpu.2, n_closed);
    let bare_sum = us(bare_cpu.0 + bare_cpu.1, n_bare);
    println!(
        "| CPU per request, closed loop: server / Redis / generator = sum (busy: of 2 cores) | {:.1} / {:.1} / {:.1} = {authz_sum:.1} µs ({:.0} %) |",
        us(closed_cpu.0, n_closed),
        us(closed_cpu.1, n_closed),
        us(closed_cpu.2, n_closed),
        100.0 * (closed_cpu.0 + closed_cpu.1 + closed_cpu.2) / (2.0 * wall)
    );
    println!(
        "| CPU per bare ADMIT call: Redis / generator = sum (busy: of 2 cores) | {:.1} / {:.1} = {bare_sum:.1} µs ({:.0} %) |",
        us(bare_cpu.0, n_bare),
        us(bare_cpu.1, n_bare),
        100.0 * (bare_cpu.0 + bare_cpu.1) / (2.0 * wall)
    );
    println!(
        "ratio: | authz max throughput, req/s (median of {PAIRS} pairs) | {max_rps:.0} | bare Redis ADMIT {redis_rps:.0} calls/s | {ratio:.2} | ≥ 0.85 |"
    );
    println!(
        "| bare Redis ADMIT at 5000 calls/s (one multiplexed connection, as authz): send → response p50 / p99 | {:.3} / {:.3} ms |",
        redis_open[4], redis_open[5]
    );
    println!(
        "ratio: | authz send → response p99 at 5,000 req/s (generator pinned apart) | {:.3} ms | bare Redis ADMIT p99 at 5,000/s {:.3} ms | {:.2} | ≤ 1 ms |",
        open[5],
        redis_open[5],
        open[5] / redis_open[5]
    );
    // UNLINK: the run's pending records are hundreds of thousands; Redis frees them off its loop.
    let _: () = redis::cmd("UNLINK")
        .arg(&pending.set)
        .arg(&pending.events)
        .arg(&pending.grants)
        .query_async(&mut conn)
        .await
        .unwrap();
}
