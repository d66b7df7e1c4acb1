//! Cross-crate integration tests: one test binary, one module per area.

mod blobs_http;
mod cli;
mod convergence_http;
mod durability;
mod gateway_rules;
mod harness;
mod hostile;
mod interop;
mod layering;
mod ledger_http;
mod query_http;
mod sync_mesh;
