//! The ledger error type: rejections of events (with stable codes) and failures underneath.

use meshnode_schemas::EventId;

/// Why an event was not accepted, or what failed. [`Error::Rejected`] is bad input (the event
/// breaks a rule, nothing changed); the other variants are failures of this node.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event breaks a rule. `code` is stable (see [`Error::code`]); nothing was changed.
    #[error("{code}: {message}")]
    Rejected {
        /// Stable machine-readable rule name, e.g. `insufficient_balance`.
        code: &'static str,
        /// What is wrong and what to fix.
        message: String,
    },
    /// The requested event, author or proof does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A request parameter is invalid (e.g. a tree size larger than the log).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The ledger is shutting down or its worker stopped.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// The blob store failed.
    #[error("blob store: {0}")]
    Store(#[from] meshnode_store::Error),
    /// The index database failed.
    #[error("ledger database: {0}")]
    Db(String),
    /// A filesystem operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// An invariant did not hold: data written by this node is inconsistent.
    #[error("ledger corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// The stable code: the rule name for rejections, otherwise a class name.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Rejected { code, .. } => code,
            Error::NotFound(_) => "not_found",
            Error::Invalid(_) => "invalid_request",
            Error::Unavailable(_) => "unavailable",
            Error::Store(_) => "store_error",
            Error::Db(_) => "db_error",
            Error::Io(_) => "io_error",
            Error::Corrupt(_) => "ledger_corrupt",
        }
    }

    /// Whether the error is about the input rather than this node.
    pub fn is_rejection(&self) -> bool {
        matches!(self, Error::Rejected { .. })
    }
}

/// Builds a rejection.
pub(crate) fn reject(code: &'static str, message: impl Into<String>) -> Error {
    Error::Rejected {
        code,
        message: message.into(),
    }
}

impl From<meshnode_schemas::Error> for Error {
    fn from(error: meshnode_schemas::Error) -> Self {
        Error::Rejected {
            code: error.code(),
            message: error.to_string(),
        }
    }
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(error: $t) -> Self {
                Error::Db(error.to_string())
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    postcard::Error
);

/// The ledger result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An event that is stored but cannot be applied yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Why: `seq_gap` (its `prev` has not arrived) or `missing_deps`.
    pub reason: &'static str,
    /// The events it waits for (for a seq gap: the author's next expected seq is implied).
    pub missing: Vec<EventId>,
}
