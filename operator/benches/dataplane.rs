//! The data plane's added cost per request (`make bench`): wasm instructions each plugin executes
//! for one chat completion through the Higress stand-in — Higress's real ext-auth, model-router
//! and ai-proxy builds and our plugin instances (header scrub, credential strip, reporter) — on the
//! configuration the operator wrote, with the real authz and ingest of the test bed. Counted with
//! wasmtime fuel (one unit per executed wasm instruction, host calls excluded). Two shapes: a
//! non-streamed answer (the recorded OpenAI body), and a 200-event stream. Each is sent `BENCH_N`
//! times (default 20) after warm-up; medians are printed for `docs/benchmarks.md`.

// A benchmark driver: failures abort with their message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/dataplane_bed/mod.rs"]
mod dataplane_bed;

use std::{collections::BTreeMap, fmt::Write as _};

use aigw_standin::provider::Scripted;
use dataplane_bed::{Bed, chat, send};
use serde_json::json;

/// An OpenAI chat stream of `n` content events, then the usage chunk and `[DONE]`.
fn stream_body(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "data: {{\"id\":\"chatcmpl-b\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
    }
    out.push_str("data: {\"id\":\"chatcmpl-b\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !aigw_standin::plugins::reference_available("dataplane bench").unwrap() {
        return;
    }
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut bed = Bed::start().await;
    let sfx = bed.h.sfx.clone();
    bed.channel(
        &format!("bench-{sfx}"),
        json!({"provider": "openai", "models": ["gpt-4o"]}),
    )
    .await;
    let tenant = format!("bench-{sfx}");
    let domain = format!("api.{tenant}.example");
    let key = format!("sk-bench-{sfx}");
    bed.tenant(&tenant, &domain, &key, &["gpt-4o"]).await;
    let gw = bed.gateway_metered(&["gpt-4o"], true).await;
    let fuel = |gw: &std::sync::Arc<std::sync::Mutex<aigw_standin::gateway::Gateway>>| {
        gw.lock()
            .unwrap()
            .filters
            .iter()
            .map(|f| (f.name.clone(), f.host.fuel_used()))
            .collect::<BTreeMap<String, u64>>()
    };
    let shapes = [("non-streamed", false), ("200-event stream", true)];
    println!("data plane: wasm instructions per chat completion (median of {n}), by plugin");
    for (label, stream) in shapes {
        let body = json!({"model": "gpt-4o", "stream": stream, "max_tokens": 200,
                          "messages": [{"role": "user", "content": "Say hello in one word."}]});
        let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for i in 0..n + 3 {
            if stream {
                bed.provider.script(Scripted {
                    status: 200,
                    content_type: "text/event-stream".into(),
                    body: stream_body(200),
                });
            }
            let before = fuel(&gw);
            let r = send(&gw, chat(&domain, &key, &body)).await;
            assert_eq!(r.status, 200, "{}", r.details);
            let after = fuel(&gw);
            if i < 3 {
                continue; // warm-up: first-use allocations and caches
            }
            for (name, a) in &after {
                per.entry(name.clone())
                    .or_default()
                    .push(a - before.get(name).copied().unwrap_or_default());
            }
        }
        println!("  {label}:");
        let mut total = 0;
        for (name, v) in per {
            let m = median(v);
            total += m;
            println!("    {name:<24} {m:>12}");
        }
        println!("    {:<24} {total:>12}", "total");
    }
    bed.finish().await;
}
