//! Usage-parser cost, so regressions are visible (numbers in docs/benchmarks.md):
//!
//! - native throughput (MB/s) of `aigw-plugin-core`'s parser on a large SSE stream and a large
//!   JSON body, fed in 16 KiB chunks;
//! - inside the real `.wasm` (wasmtime test host with fuel metering): wasm instructions per KB of
//!   response body, for the same SSE stream, from the first body chunk to the dispatched event.
//!
//! `cargo bench -p aigw-plugin --bench parser` (`make bench` runs it).

// A measuring harness: casts between counts and floats are the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss
)]

#[path = "../tests/host/mod.rs"]
mod host;

use std::time::Instant;

use aigw_plugin_core::{Framing, UsageParser};
use host::Drive;

/// An OpenAI-style chat stream of `n` content chunks ending with a usage chunk and `[DONE]`.
fn sse_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1790000000,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} — some text with \\\"quotes\\\" and unicode é\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ).as_bytes());
    }
    out.extend(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":5000,\"total_tokens\":5100}}\n\ndata: [DONE]\n\n");
    out
}

fn json_body(mb: usize) -> Vec<u8> {
    let mut out =
        br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":["#.to_vec();
    while out.len() < mb << 20 {
        out.extend(b"-0.0123456789,0.0987654321,");
    }
    out.extend(
        br#"0.5]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
    );
    out
}

fn native(name: &str, body: &[u8], framing: Framing) {
    let rounds = 5;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut p = UsageParser::new(framing);
        for c in body.chunks(16 * 1024) {
            p.feed(c);
        }
        let got = p.finish(200, true);
        assert!(got.usage.total_tokens.is_some());
    }
    let secs = started.elapsed().as_secs_f64();
    let mb = (body.len() * rounds) as f64 / 1e6;
    println!(
        "native {name}: {:.1} MB parsed in {secs:.2}s = {:.0} MB/s",
        mb,
        mb / secs
    );
}

fn main() {
    let sse = sse_stream(50_000);
    native("SSE stream", &sse, Framing::Sse);
    native("JSON body", &json_body(16), Framing::Json);

    let config = br#"{"version":1,"mode":"report","ingestCluster":"ingest","ingestSecret":"x"}"#;
    let (mut h, ok) = host::load_with(host::build_wasm(), config, true);
    assert!(ok);
    let id = h.new_http();
    h.request_headers(
        id,
        &[
            ("x-aigw-tenant", "1"),
            ("x-aigw-token", "2"),
            ("x-request-id", "r"),
        ],
        true,
    );
    h.response_headers(
        id,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    let before = h.fuel_used();
    let chunks: Vec<&[u8]> = sse.chunks(16 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        h.response_body(id, c, i + 1 == chunks.len());
    }
    let used = h.fuel_used() - before;
    assert_eq!(h.state().calls.len(), 1, "the event was dispatched");
    println!(
        "wasm SSE stream: {:.1} MB, {used} instructions (fuel) = {:.0} instructions per KB",
        sse.len() as f64 / 1e6,
        used as f64 / (sse.len() as f64 / 1024.0)
    );
}
