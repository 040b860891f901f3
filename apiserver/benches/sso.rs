//! Sign-in benchmark (`make bench`), against the test bed's Redis:
//!
//! 1. Login cost: argon2id verification of one password with the production parameters
//!    (`sso::password::PARAMS`), 50 times; mean and p99 per attempt. This is the CPU a sign-in
//!    attempt costs, wrong password or unknown user alike.
//! 2. Token verification as every management request does it (`Sso::verify_access`: EdDSA
//!    signature, claims, one Redis `MGET` of the deny-list), open loop at 2,000 verifications/s for
//!    10 s over 1,000 distinct tokens: p50/p99/max from each verification's scheduled start (no
//!    coordinated omission), and the rate achieved.

// A benchmark driver: failures abort with their message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aigw_apiserver::{
    authz::index::{Index, TenantRecord},
    sso::{self, Role, Site, Sso, jwt::Grant},
};
use aigw_crds::TenantType;
use aigw_testkit::Testbed;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    // 1. Login cost.
    let phc = sso::password::hash("a benchmark password").unwrap();
    let mut costs = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        assert!(!sso::password::verify("not the password", &phc));
        costs.push(started.elapsed());
    }
    costs.sort();
    let mean = costs.iter().sum::<Duration>() / 50;
    let (m, t, p) = sso::password::PARAMS;
    println!(
        "login (argon2id m={m} KiB, t={t}, p={p}): mean {:.1} ms, p99 {:.1} ms per attempt",
        mean.as_secs_f64() * 1e3,
        percentile(&costs, 0.99).as_secs_f64() * 1e3
    );

    // 2. Token verification.
    let tb = Testbed::load().unwrap();
    let dir = std::env::temp_dir().join(format!("aigw-bench-sso-{}", std::process::id()));
    sso::keys::generate(&dir, "bench").unwrap();
    let redis = tb.redis().unwrap();
    let manager = redis::aio::ConnectionManager::new(redis.clone())
        .await
        .unwrap();
    let prefix = format!("bench:{}:sso:", std::process::id());
    let idp = Sso::new(
        sso::Settings {
            redis_prefix: prefix.clone(),
            ..sso::Settings::default()
        },
        Index::default(),
        sqlx::mysql::MySqlPoolOptions::new()
            .connect_lazy(tb.var("DATABASE_URL").unwrap())
            .unwrap(),
        manager,
        sso::keys::Keys::load(&dir).unwrap(),
        sso::mail::Mailer::from_url("log", "AIGateway <noreply@aigateway.local>").unwrap(),
    )
    .unwrap();
    let site = Site {
        authority: "api.bench.example".into(),
        name: "bench".into(),
        tenant: Arc::new(TenantRecord {
            id: 1,
            domains: vec!["api.bench.example".into()],
            suspended: false,
            kind: TenantType::Reseller,
            display_name: "Bench".into(),
            branding: None,
        }),
        scheme: sso::Scheme::Https,
    };
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            let grant = Grant {
                user_id: i,
                client_id: "c-bench".into(),
                scope: "openid".into(),
                sid: sso::random_id(),
                family: sso::random_id(),
                roles: vec![Role::Owner, Role::Finance],
            };
            idp.mint_access(&site, &grant).unwrap().0
        })
        .collect();
    let tokens = Arc::new(tokens);
    let rate = 2_000u64;
    let secs = 10u64;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity((rate * secs) as usize)));
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..rate * secs {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (idp, site, tokens, latencies) =
            (idp.clone(), site.clone(), tokens.clone(), latencies.clone());
        handles.push(tokio::spawn(async move {
            let token = &tokens[(i % 1000) as usize];
            idp.verify_access(&site, token).await.unwrap();
            latencies.lock().unwrap().push(scheduled.elapsed());
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    println!(
        "token verification (EdDSA + deny-list MGET) at {rate}/s for {secs} s: {:.0}/s achieved, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        l.len() as f64 / elapsed.as_secs_f64(),
        percentile(&l, 0.5).as_secs_f64() * 1e3,
        percentile(&l, 0.99).as_secs_f64() * 1e3,
        l.last().unwrap().as_secs_f64() * 1e3,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
