//! meshnode gateway: the HTTP API (warp, served through a hardened hyper server), the node's
//! configuration and process lifetime, and the `meshnode` command line.
//!
//! This is the only crate that knows HTTP, JSON bodies, config files and processes.

/// The allocator of every program that links the node (the `meshnode` binary, its benches
/// and the test nodes): mimalloc, as datafusion-cli uses. It keeps freed pages for reuse,
/// where glibc's malloc handed the embedder's and DataFusion's multi-megabyte buffers back
/// to the kernel and faulted them in again (14% of an embedding pass in page faults, `perf`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod events_json;
pub mod http;
pub mod node;
pub mod replicate;
