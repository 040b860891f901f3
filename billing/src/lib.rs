//! AIGateway billing: usage ingest and the billing worker (see `main.rs`), and the pure pricing
//! the worker applies to each usage event.

pub mod pricing;
