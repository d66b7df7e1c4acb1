//! meshnode schemas: identities, event bodies and kinds, canonical DAG-CBOR encoding,
//! signing, validation limits. Pure data: no I/O.
//!
//! Everything a node accepts from a peer passes through here first; the functions are
//! deterministic so that every honest node accepts exactly the same bytes.

mod cbor;
mod envelope;
mod error;
mod event;
mod genesis;
mod ids;
mod keys;
pub mod limits;
pub mod tables;

pub use cbor::{from_canonical, to_canonical};
pub use ed25519_dalek::SigningKey;
pub use envelope::{SignedEvent, signing_message, verify_signature};
pub use error::{Error, Result};
pub use event::{
    BasinDelta, BasinPublish, BlobHost, EventBody, KeyRotate, Kind, NodeAnnounce, Payload,
    ReputationDelta, SkillEndorse, SkillPublish, TokenMint, TokenTransfer, Vector,
};
pub use genesis::Genesis;
pub use ids::{AuthorKey, BlobHash, Digest32, EventId, ID_BYTES};
pub use keys::{author_of, key_file_text, parse_key_file};

#[cfg(test)]
mod tests;
