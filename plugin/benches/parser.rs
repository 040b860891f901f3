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

/// Parses `body` natively five times; prints and returns MB/s.
fn native(name: &str, body: &[u8], framing: Framing) -> f64 {
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
    mb / secs
}

fn main() {
    let sse = host::text_stream(50_000);
    native("SSE stream", &sse, Framing::Sse);
    let recorded = native(
        "recorded-shape OpenAI stream",
        &host::openai_stream(40_000),
        Framing::Sse,
    );
    println!(
        "ratio: | usage parser native, recorded-shape OpenAI stream | {recorded:.0} MB/s | | | ≥ 300 MB/s |"
    );
    native("JSON body", &json_body(16), Framing::Json);

    for (name, body) in [
        ("recorded-shape OpenAI stream", host::openai_stream(20_000)),
        ("text-heavy stream", sse),
    ] {
        let (used, _) = host::parser_fuel(&body);
        let per_byte = used as f64 / body.len() as f64;
        println!(
            "wasm {name}: {:.1} MB, {used} instructions (fuel) = {per_byte:.1} instructions per byte",
            body.len() as f64 / 1e6,
        );
        println!(
            "ratio: | usage parser in wasm, {name} | {per_byte:.1} instructions/byte | | | ≤ 30 |"
        );
    }
    // Where an event's instructions go: 2,000 events of one shape, less a stream of none.
    let stream = |event: &str| -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..2_000 {
            out.extend(format!("data: {event}\n\n").as_bytes());
        }
        out.extend(b"data: {\"object\":\"chat.completion.chunk\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata: [DONE]\n\n");
        out
    };
    let (base, _) = host::parser_fuel(&stream(""));
    println!("| SSE event data | wasm instructions per event |\n|---|---:|");
    for event in [
        "{}",
        r#"{"a":1}"#,
        r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"j":10}"#,
        r#"{"a":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
        r#"{"a":{"b":{"c":1}}}"#,
        r#"{"object":"chat.completion.chunk"}"#,
        r#"{"usage":null}"#,
    ] {
        let (used, _) = host::parser_fuel(&stream(event));
        println!(
            "| `{event}` | {:.0} |",
            (used as f64 - base as f64) / 2_000.0
        );
    }
}
