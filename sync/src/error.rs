//! Errors of the sync crate.

/// What went wrong talking to a peer, or setting the endpoint up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer broke the protocol (a malformed, oversized or unexpected message).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The connection or a stream failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A ticket or address that does not parse.
    #[error("invalid peer: {0}")]
    InvalidPeer(String),
    /// The peer refused the request (its stable code and message).
    #[error("{code}: {message}")]
    Refused {
        /// Stable code.
        code: String,
        /// What to fix.
        message: String,
    },
    /// Nothing to get it from (the message says what was tried).
    #[error("{0}")]
    NotFound(String),
    /// The local ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] meshnode_ledger::Error),
    /// Reading or writing the peers file.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol(message.into())
    }

    pub(crate) fn transport(e: impl std::fmt::Display) -> Self {
        Error::Transport(e.to_string())
    }
}

/// The sync crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
