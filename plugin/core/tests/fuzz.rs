//! A mutation fuzzer for the usage parser (SSE and JSON framing), bounded in time.
//!
//! Inputs are our fixtures with random byte flips, insertions, deletions, duplicated and spliced
//! ranges, fed in random chunkings. For every input: no panic, the same result whatever the
//! chunking, and the parser's own size stays bounded. `cargo test` runs it for 2 seconds;
//! `make fuzz` runs it for `AIGW_FUZZ_SECS` (default 60). A failure prints the seed to replay with
//! `AIGW_FUZZ_SEED`.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use aigw_plugin_core::{Extracted, Framing, UsageParser};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn fixtures() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "cases.json")
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    out.sort();
    out
}

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..8) {
        if b.is_empty() {
            b.push(b'{');
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[at] = rng.random(),
            1 => b.insert(
                at,
                *[
                    b'{', b'}', b'[', b']', b'"', b'\\', b':', b',', b'\n', b'\r',
                ]
                .get(rng.random_range(0..10))
                .unwrap(),
            ),
            2 => {
                let end = (at + rng.random_range(1..32)).min(b.len());
                b.drain(at..end);
            }
            3 => {
                let end = (at + rng.random_range(1..256)).min(b.len());
                let dup = b[at..end].to_vec();
                b.splice(at..at, dup);
            }
            4 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                let from = rng.random_range(0..other.len());
                let end = (from + rng.random_range(1..512)).min(other.len());
                b.splice(at..at, other[from..end].iter().copied());
            }
            _ => b.truncate(at),
        }
    }
    b
}

fn run(body: &[u8], framing: Framing, cuts: &[usize]) -> Extracted {
    let mut p = UsageParser::new(framing);
    let mut start = 0;
    for &c in cuts {
        p.feed(&body[start..c]);
        start = c;
    }
    p.feed(&body[start..]);
    assert!(std::mem::size_of_val(&p) < 4096);
    p.finish(200, true)
}

#[test]
fn mutated_inputs_never_panic_and_never_depend_on_chunking() {
    let secs: u64 = std::env::var("AIGW_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let corpus = fixtures();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    let base_seed: u64 = std::env::var("AIGW_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos())
        });
    let replay = std::env::var("AIGW_FUZZ_SEED").is_ok();
    while Instant::now() < deadline || (replay && runs == 0) {
        let seed = base_seed.wrapping_add(runs);
        let mut rng = StdRng::seed_from_u64(seed);
        let body = mutate(&mut rng, &corpus);
        for framing in [Framing::Sse, Framing::Json, Framing::Sniff] {
            let whole = run(&body, framing, &[]);
            let mut cuts: Vec<usize> = (0..rng.random_range(1..12))
                .map(|_| rng.random_range(0..=body.len()))
                .collect();
            cuts.sort_unstable();
            let chunked = run(&body, framing, &cuts);
            assert_eq!(
                chunked,
                whole,
                "seed {seed}, {framing:?}, cuts {cuts:?}: chunking changed the result for {:?}",
                String::from_utf8_lossy(&body)
            );
        }
        runs += 1;
    }
    eprintln!("fuzz: {runs} inputs in {secs}s (seed base {base_seed})");
    assert!(runs > 0);
}
