//! meshnode gateway: the HTTP API (warp, served through a hardened hyper server), the node's
//! configuration and process lifetime, and the `meshnode` command line.
//!
//! This is the only crate that knows HTTP, JSON bodies, config files and processes.

pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod events_json;
pub mod http;
pub mod node;
