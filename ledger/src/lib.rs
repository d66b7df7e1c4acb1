//! meshnode ledger: per-author signed logs over the store — verification, validation, derived
//! state, fork proofs, the transparency log and audit.
