//! `aigw-apiserver`: the REST API resellers use (`/api/*`, `/oauth/*`) and the authz listener
//! Higress `ext-auth` calls on every LLM request. The two listeners are independent so authz can be
//! deployed (and scaled) on its own (`--role authz`).

pub mod api;
pub mod app;
pub mod authz;
pub mod sso;
