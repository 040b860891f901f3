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
    clippy::too_many_lines,
    clippy::cast_precision_loss
)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/dataplane_bed/mod.rs"]
mod dataplane_bed;

use dataplane_bed::{Bed, SHAPES, TOTAL_INSTRUCTION_BUDGETS, fuel_per_request};

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
    let (domain, key, gw) = bed.gpt4o_tenant("bench").await;
    println!("data plane: wasm instructions per chat completion (median of {n}), by plugin");
    let mut ratios = Vec::new();
    for (shape, (label, stream)) in SHAPES.into_iter().enumerate() {
        let per = fuel_per_request(&bed, &gw, &domain, &key, stream, n).await;
        println!("  {label}:");
        for (name, m) in &per {
            println!("    {name:<24} {m:>12}");
        }
        let total = per.values().sum::<u64>();
        println!("    {:<24} {total:>12}", "total");
        let budget = TOTAL_INSTRUCTION_BUDGETS[shape];
        ratios.push(format!(
            "ratio: | data plane wasm instructions per request, {label} | {total} | budget {budget} (`make test` asserts it) | {:.2} | ≤ 1 |",
            total as f64 / budget as f64
        ));
    }
    for r in ratios {
        println!("{r}");
    }
    bed.finish().await;
}
