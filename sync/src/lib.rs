//! meshnode sync: the iroh endpoint (the node key is its endpoint id), the peers a node
//! knows, and the replication of accepted events between peers (`/meshnode/sync/1`).
//!
//! Peers are untrusted: every frame is bounded, every event is verified by the ledger, and a
//! peer that sends malformed or invalid data is scored and, past a limit, banned.

mod amchange;
mod amcheck;
mod blobs;
pub mod craft;
mod docs;
mod docsync;
mod error;
mod mesh;
mod peers;
pub mod wire;

pub use docs::DocKind;
pub use error::{Error, Result};
pub use iroh::RelayUrl;
pub use mesh::{Fetched, Mesh, MeshConfig, PeerStatus, parse_ticket};
pub use peers::{LEARNT_MAX, PEERS_MAX, PeerRecord};
