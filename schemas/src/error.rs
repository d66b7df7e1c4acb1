//! The schemas error type: every variant is a problem with input bytes or text.

/// What was wrong with a value handed to `schemas`. Every variant is bad input (never our bug),
/// and carries a stable code from [`Error::code`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A hash, id, key or CID text or byte form is malformed.
    #[error("invalid {what}: {reason}")]
    InvalidId {
        /// Which kind of identifier.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The bytes are not well-formed DAG-CBOR of the expected shape.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// The bytes decode, but are not the canonical encoding of the value they carry.
    #[error("non-canonical encoding: re-encoding the decoded value gives different bytes")]
    NonCanonical,
    /// A size limit was exceeded.
    #[error("{what} too large: {size} > {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The size seen.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A field has a value outside what the schema allows.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field name, as on the wire.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A vector field holds NaN, ±Inf, a length that is not a multiple of 4, or too many dims.
    #[error("invalid vector `{field}`: {reason}")]
    BadVector {
        /// The field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The event kind is not one of the known kinds.
    #[error("unknown event kind `{0}`")]
    UnknownKind(String),
    /// The format version is not supported.
    #[error("unsupported format version {0}, expected 1")]
    Version(u64),
    /// An Ed25519 public key is invalid, non-canonical or of small order.
    #[error("bad key: {0}")]
    BadKey(String),
    /// The signature does not verify (strictly) for this author and event id.
    #[error("signature does not verify")]
    BadSignature,
    /// A key file's text is not 64 lowercase hex characters and a newline.
    #[error("bad key file: {0}")]
    BadKeyFile(String),
}

impl Error {
    /// A stable, machine-readable code for the error, used in HTTP and CLI error output.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidId { .. } => "invalid_id",
            Error::Malformed(_) => "malformed_encoding",
            Error::NonCanonical => "non_canonical",
            Error::TooLarge { .. } => "too_large",
            Error::InvalidField { .. } => "invalid_field",
            Error::BadVector { .. } => "invalid_vector",
            Error::UnknownKind(_) => "unknown_kind",
            Error::Version(_) => "unsupported_version",
            Error::BadKey(_) => "bad_key",
            Error::BadSignature => "bad_signature",
            Error::BadKeyFile(_) => "bad_key_file",
        }
    }
}

/// The schemas result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
