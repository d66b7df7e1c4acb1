//! meshnode ledger: per-author signed logs over the store — verification, validation, derived
//! state, fork proofs, the transparency log and audit (DESIGN.md §3–§4).
//!
//! Events arrive as envelopes ([`Ledger::submit`]); a single worker validates them in
//! batches (signatures checked on all cores), stores the envelopes as blobs, and commits the
//! index in one transaction per batch, so acknowledged means durable with one fsync per batch.
//! The fold ([`State::apply`]) is deterministic and is the same code the audit replays.

mod audit;
mod db;
mod error;
mod fold;
mod ledger;
mod past;
mod pending;
mod proof;
mod reads;
mod roots;
mod state;
pub mod tlog;
mod worker;

pub use audit::{AuditReport, BundleTrust, Finding, verify_bundle};
pub use error::{Error, Result, Rule, RuleClass, Waiting};
pub use fold::{
    Applied, AuthorState, BasinState, BasinVersion, Credit, Effect, EventRecord, ForkProof,
    HostMark, Lookup, NodeState, Overlay, PAST_SEARCH_EVENTS_MAX, ReputationState, Rules,
    SkillState, State, StateDigest, Touched,
};
pub use ledger::{
    Accepted, Account, BATCH_EVENTS_MAX, FEED_CAPACITY, Ledger, LedgerConfig, PENDING_EVENTS_MAX,
    QUEUE_EVENTS_MAX, Receipt, Status, Submitted,
};
pub use pending::{PENDING_BYTES_MAX, PENDING_PER_AUTHOR_MAX};
pub use reads::Page;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_convergence;
