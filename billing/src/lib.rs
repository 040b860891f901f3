//! AIGateway billing: usage ingest (HTTP → Kafka), the billing worker (Kafka → ClickHouse, Redis,
//! MySQL), the pure pricing the worker applies, settlement and reports.

pub mod alerts;
pub mod directory;
pub mod ingest;
pub mod ledger;
pub mod pending;
pub mod pricing;
pub mod reports;
pub mod retention;
pub mod settlement;
pub mod status;
pub mod topics;
pub mod worker;
