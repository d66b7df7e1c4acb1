//! The store error type.

use meshnode_schemas::BlobHash;

/// Errors of the blob store. `NotFound`, `TooLarge`, `InvalidRange` and `Quarantined` are about
/// the request; `Corrupt` is detected damage on disk; `Backend` and `Io` are failures of the
/// machinery underneath.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The blob is not (completely) in this store.
    #[error("blob {0} not found")]
    NotFound(BlobHash),
    /// The input exceeded the size limit the caller set; nothing was stored.
    #[error("blob larger than the limit of {limit_bytes} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit_bytes: u64,
    },
    /// The requested byte range does not lie within the blob.
    #[error("range {start}..{end} not satisfiable for a blob of {size} bytes")]
    InvalidRange {
        /// First byte requested.
        start: u64,
        /// One past the last byte requested.
        end: u64,
        /// Blob size.
        size: u64,
    },
    /// The blob's bytes on disk do not match its hash. It was quarantined and is not served.
    #[error("blob {0} failed verification and was quarantined")]
    Corrupt(BlobHash),
    /// The blob is being quarantined (it failed verification); retry later.
    #[error("blob {0} is quarantined")]
    Quarantined(BlobHash),
    /// The store is momentarily overloaded (too many concurrent operations on one blob);
    /// retry shortly.
    #[error("the blob store is busy; retry shortly")]
    Busy,
    /// The data directory is used by another process.
    #[error("data directory {0} is locked by another process")]
    Locked(String),
    /// Garbage collection failed or did not finish in time; nothing unprotected was kept.
    #[error("garbage collection failed: {0}")]
    Gc(String),
    /// A filesystem operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The iroh-blobs store failed.
    #[error("blob store error: {0}")]
    Backend(String),
}

/// The store result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn backend(error: impl std::fmt::Display) -> Error {
    Error::Backend(error.to_string())
}
