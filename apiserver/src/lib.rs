//! `aigw-apiserver`: the REST API resellers use (`/api/*`, `/oauth/*`) and the authz listener
//! Higress `ext-auth` calls on every LLM request. The two listeners are independent so authz can be
//! deployed (and scaled) on its own (`--role authz`).

pub mod api;
pub mod app;
pub mod authz;
pub mod sso;

/// The allocator of the apiserver binary and of the authz benchmark, declared by each with
/// `#[global_allocator] static GLOBAL: aigw_apiserver::Allocator = aigw_apiserver::Allocator;`.
/// With glibc's allocator, `malloc`/`free` were a third of the authz listener's CPU under load
/// (`perf`, docs/benchmarks.md); a request makes many small short-lived allocations (headers, the
/// parsed body, the pending record, the Redis command), which mimalloc's per-thread free lists serve
/// without locking.
pub use mimalloc::MiMalloc as Allocator;
