//! The authorisation gate Higress `ext-auth` (`forward_auth` mode) calls on every LLM request.
//!
//! - [`index`]: SHA-256(key) → token record and tenant → served domains, in memory, fed by watches
//!   on Token and Tenant CRs. No database or apiserver round trip per request.
//! - [`decide`]: the pure checks (key, host, status, expiry, model allow-list).
//! - [`request`]: the endpoint, model and token estimate read from the forwarded request.
//! - [`service`]: the HTTP endpoint; rate limit and quota reservation in one atomic Redis call
//!   (`aigw_common::quota::ADMIT`).

pub mod decide;
pub mod index;
pub mod request;
pub mod service;
