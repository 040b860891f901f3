//! The token index's memory per token, counted exactly: every allocation the index makes while a
//! million tokens are upserted goes through a counting allocator (this test binary's global
//! allocator), so the figure is deterministic and a regression fails here, not in a benchmark.
//!
//! Two figures: the bytes the index asked for, and those plus 16 bytes per live allocation —
//! glibc's malloc adds an 8-byte header to each chunk and rounds it up to 16, so 16 is its mean
//! overhead. The second is what the process's RSS grows by; the budget (≤ 256 bytes per token) is
//! asserted on it. The hash tables are large blocks (mapped pages) and count at their size.

#![allow(clippy::unwrap_used)]

use std::alloc::System;

use aigw_apiserver::authz::index::Index;
use aigw_crds::{Token, token::hash_api_key};
use serde_json::json;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TOKENS: usize = 1_000_000;

/// A token as the REST API and the operator leave it (the authz benchmark's shape): 1,000 owners,
/// a two-model allow-list, an expiry.
fn token(i: usize) -> Token {
    let hash = hash_api_key(&format!("sk-bench-{i:08}"));
    serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
        "metadata": {"name": format!("t{i}"), "namespace": "aigw-bench"},
        "spec": {"owner": format!("user{}", i % 1000), "keyHash": hash, "quota": -1,
                 "rateLimit": 1_000_000, "models": ["gpt-4o", "gpt-4o-mini"],
                 "expiresAt": "2030-01-01T00:00:00Z"},
        "status": {"tokenId": i, "phase": "Active", "keyHash": hash}}),
    )
    .unwrap()
}

#[test]
#[allow(clippy::cast_precision_loss)]
fn a_million_tokens_cost_at_most_256_bytes_each() {
    let index = Index::default();
    // The first upsert creates the index's lazily built parts; count from a steady start.
    index.upsert_token(&token(TOKENS));
    let region = Region::new(GLOBAL);
    for i in 0..TOKENS {
        let t = token(i);
        index.upsert_token(&t);
    }
    let change = region.change();
    let live_bytes = change.bytes_allocated as f64 - change.bytes_deallocated as f64
        + change.bytes_reallocated as f64;
    let live_allocations = change.allocations as f64 - change.deallocations as f64;
    let requested = live_bytes / TOKENS as f64;
    let chunks = (live_bytes + 16.0 * live_allocations) / TOKENS as f64;
    assert_eq!(index.len(), TOKENS + 1);
    println!(
        "token index: {requested:.1} bytes requested, {chunks:.1} bytes of malloc chunks per token"
    );
    assert!(
        chunks <= 256.0,
        "the token index costs {chunks:.1} bytes per token (budget 256)"
    );
    // The lookup still answers after all that.
    let found = index.token(&hash_api_key("sk-bench-00000042")).unwrap();
    assert_eq!(found.token_id, 42);
}
