//! Usage extraction against our fixtures (written from each provider's documented formats, in
//! `tests/fixtures/`) and against the recorded responses in `../shared/reference/llm-responses/`
//! (read in place, never copied; skipped with a message when that folder is absent, as in a user's
//! own clone). Every case is also split at every byte position and into random chunk sequences:
//! the result must not depend on where chunks end.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aigw_plugin_core::{Extracted, Framing, Outcome, TokenUsage, UsageParser};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    file: String,
    content_type: Option<String>,
    status: u16,
    usage: TokenUsage,
    model: Option<String>,
    outcome: Outcome,
}

fn parse_chunks(body: &[u8], ct: Option<&str>, status: u16, cuts: &[usize]) -> Extracted {
    let mut p = UsageParser::new(Framing::from_content_type(ct));
    let mut start = 0;
    for &c in cuts {
        p.feed(&body[start..c]);
        start = c;
    }
    p.feed(&body[start..]);
    p.finish(status, true)
}

/// Whole, at every single split point (bodies up to `every_limit` bytes), and 64 random chunkings.
fn check_split_invariance(name: &str, body: &[u8], ct: Option<&str>, status: u16) -> Extracted {
    let whole = parse_chunks(body, ct, status, &[]);
    let every_limit = 16 * 1024;
    let step = if body.len() <= every_limit {
        1
    } else {
        body.len() / 2048 + 1
    };
    for i in (0..=body.len()).step_by(step) {
        assert_eq!(
            parse_chunks(body, ct, status, &[i]),
            whole,
            "{name}: split at {i}"
        );
    }
    let mut rng = StdRng::seed_from_u64(body.len() as u64);
    for round in 0..64 {
        let mut cuts = Vec::new();
        let mut at = 0;
        while at < body.len() {
            at += rng.random_range(1..=64.min(body.len()).max(1));
            if at < body.len() {
                cuts.push(at);
            }
        }
        assert_eq!(
            parse_chunks(body, ct, status, &cuts),
            whole,
            "{name}: random chunking {round}"
        );
    }
    whole
}

#[test]
fn fixtures_give_the_documented_usage_in_any_chunking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cases: Vec<Case> =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let body = std::fs::read(dir.join(&c.file)).unwrap();
        let got = check_split_invariance(&c.file, &body, c.content_type.as_deref(), c.status);
        assert_eq!(got.usage, c.usage, "{}: usage", c.file);
        assert_eq!(got.model, c.model, "{}: model", c.file);
        assert_eq!(
            got.outcome, c.outcome,
            "{}: outcome ({:?})",
            c.file, got.error
        );
    }
}

#[test]
fn a_stream_cut_short_is_reported_as_truncated_with_what_had_arrived() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let body = std::fs::read(dir.join("anthropic-stream.sse")).unwrap();
    let cut = body
        .windows(13)
        .position(|w| w == b"message_delta")
        .unwrap();
    let mut p = UsageParser::new(Framing::Sse);
    p.feed(&body[..cut]);
    let got = p.finish(200, false);
    assert_eq!(got.outcome, Outcome::Truncated);
    // message_start's counts, not invented ones: output 1 as sent so far.
    assert_eq!(got.usage.prompt_tokens, Some(135));
    assert_eq!(got.usage.completion_tokens, Some(1));
}

#[test]
fn memory_stays_bounded_on_a_huge_response() {
    // 8 MiB of content in one JSON string, then usage: the parser keeps none of the content.
    let mut body = br#"{"model":"gpt-4o","choices":[{"message":{"content":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 8 << 20));
    body.extend(br#""}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#);
    let mut p = UsageParser::new(Framing::Json);
    for c in body.chunks(64 * 1024) {
        p.feed(c);
    }
    let size = std::mem::size_of_val(&p);
    let got = p.finish(200, true);
    assert_eq!(got.usage.total_tokens, Some(7));
    assert!(size < 4096, "parser struct is {size} bytes");
}

fn reference_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/llm-responses");
    dir.is_dir().then_some(dir)
}

#[derive(Debug, Deserialize)]
struct Expected {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    total_tokens: Option<u64>,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    http_status: u16,
    content_type: Option<String>,
    expected: Expected,
}

#[test]
fn recorded_provider_responses_give_their_known_usage() {
    let Some(dir) = reference_dir() else {
        eprintln!("SKIPPED: ../shared/reference/llm-responses is not present in this checkout");
        return;
    };
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    for meta_path in names {
        let name = meta_path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        let body = std::fs::read(meta_path.with_extension("body")).unwrap();
        let got =
            check_split_invariance(&name, &body, meta.content_type.as_deref(), meta.http_status);
        let e = &meta.expected;
        let want = TokenUsage {
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cached_input_tokens: e.cached_input_tokens,
            cache_creation_input_tokens: e.cache_creation_input_tokens,
            reasoning_tokens: e.reasoning_tokens,
            total_tokens: e.total_tokens,
        };
        if got.usage != want || got.model != e.model {
            failures.push(format!(
                "{name}:\n  want {want:?} model {:?}\n  got  {:?} model {:?} ({:?})",
                e.model, got.usage, got.model, got.outcome
            ));
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases found");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
