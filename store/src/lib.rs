//! meshnode store: the content-addressed blob store of a node.
//!
//! iroh-blobs' `FsStore` underneath, plus what it does not give by itself: an add is
//! acknowledged only once durable (group-committed fsync barrier), every read is verified
//! against the hash (a mismatch quarantines the blob, it is never served), pins are named tags,
//! and GC never deletes a pinned blob or a root that a registered hook (the ledger) reports.

mod barrier;
mod error;
mod gc;
mod quarantine;
mod small;
mod store;

pub use error::{Error, Result};
pub use gc::{GcHealth, GcRoots};
pub use store::{
    AddPhase, Added, BlobRead, BlobStat, ByteStream, DownloadHold, GET_BYTES_MAX_DEFAULT, GcReport,
    PinMode, ScrubReport, Store, StoreConfig, Writer, coalesce, collect,
};

#[cfg(test)]
mod tests;
