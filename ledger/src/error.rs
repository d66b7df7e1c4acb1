//! The ledger error type: rejections of events (with stable codes) and failures underneath.

use meshnode_schemas::EventId;

/// Why an event was not accepted, or what failed. [`Error::Rejected`] is bad input (the event
/// breaks a rule, nothing changed); the other variants are failures of this node.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event breaks a rule (or, for [`Rule::PendingFull`], cannot wait now); nothing was
    /// changed.
    #[error("{}: {message}", rule.as_str())]
    Rejected {
        /// The rule; its stable name is [`Rule::as_str`].
        rule: Rule,
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
            Error::Rejected { rule, .. } => rule.as_str(),
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

    /// The rule a rejection names.
    pub fn rule(&self) -> Option<Rule> {
        match self {
            Error::Rejected { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

/// Every rule an event can break, as a typed value with a stable name.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Decoding, canonical form, field limits, keys or signature (the schemas crate's code,
    /// e.g. `non_canonical`, `bad_signature`, `too_large`).
    Schema(&'static str),
    /// The event is for another network.
    WrongNet,
    /// `prev` is not the log's event at `seq - 1`.
    WrongPrev,
    /// Signed with a key the log rotated away from.
    KeyRotated,
    /// A field value the rules refuse (e.g. rotating to the key already in use).
    InvalidField,
    /// A mint by a key that is not a genesis issuer.
    NotIssuer,
    /// A transfer beyond the credits in its causal past.
    InsufficientBalance,
    /// An endorsement of something that is not an accepted `skill.publish`.
    UnknownSkill,
    /// A named event is not in the causal past.
    NotInCausalPast,
    /// Finding a named event in the causal past needs more steps than allowed.
    CausalPastTooLarge,
    /// A delta's parent is not an accepted basin version.
    UnknownParent,
    /// A delta names another basin than its parent's.
    BasinMismatch,
    /// A delta by neither the basin's owner nor a writer its publish names.
    NotAWriter,
    /// A delta of the wrong dimension or with an index outside the basin.
    DimensionMismatch,
    /// A delta too far from its anchor.
    BasinOutlier,
    /// A fork proof that does not prove a fork.
    InvalidForkProof,
    /// The same event twice in one batch.
    DuplicateSubmission,
    /// Too many events wait already: a limit that delays, not a verdict on the event.
    PendingFull,
    /// An event read from a peer's log whose causal past is not here: a log is in its
    /// node's acceptance order, so its sender broke the protocol (it never waits here).
    OutOfOrder,
}

/// How a rejection is reported: bad bytes, too large, breaks a rule, or try again later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleClass {
    /// The bytes are malformed or not this network's (HTTP 400).
    Malformed,
    /// Over a size limit (HTTP 413).
    TooLarge,
    /// Well-formed, but breaks a ledger rule (HTTP 422).
    Broken,
    /// Not judged: a limit of this node; deliver again later (HTTP 503).
    Busy,
}

impl Rule {
    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Schema(code) => code,
            Rule::WrongNet => "wrong_net",
            Rule::WrongPrev => "wrong_prev",
            Rule::KeyRotated => "key_rotated",
            Rule::InvalidField => "invalid_field",
            Rule::NotIssuer => "not_issuer",
            Rule::InsufficientBalance => "insufficient_balance",
            Rule::UnknownSkill => "unknown_skill",
            Rule::NotInCausalPast => "not_in_causal_past",
            Rule::CausalPastTooLarge => "causal_past_too_large",
            Rule::UnknownParent => "unknown_parent",
            Rule::BasinMismatch => "basin_mismatch",
            Rule::NotAWriter => "not_a_writer",
            Rule::DimensionMismatch => "dimension_mismatch",
            Rule::BasinOutlier => "basin_outlier",
            Rule::InvalidForkProof => "invalid_fork_proof",
            Rule::DuplicateSubmission => "duplicate_submission",
            Rule::PendingFull => "pending_full",
            Rule::OutOfOrder => "out_of_order",
        }
    }

    /// How it is reported.
    pub fn class(self) -> RuleClass {
        match self {
            Rule::Schema("too_large") => RuleClass::TooLarge,
            Rule::Schema(_) | Rule::WrongNet | Rule::InvalidField => RuleClass::Malformed,
            Rule::PendingFull | Rule::DuplicateSubmission => RuleClass::Busy,
            _ => RuleClass::Broken,
        }
    }
}

/// Builds a rejection.
pub(crate) fn reject(rule: Rule, message: impl Into<String>) -> Error {
    Error::Rejected {
        rule,
        message: message.into(),
    }
}

impl From<meshnode_schemas::Error> for Error {
    fn from(error: meshnode_schemas::Error) -> Self {
        Error::Rejected {
            rule: Rule::Schema(error.code()),
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
