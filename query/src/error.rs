//! The query error type.

/// Errors of the query layer. [`Error::Query`] is bad input (the SQL, the vector, the
/// parameters); the others are failures of this node.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid: `code` is stable (`sql_error`, `read_only`, `unknown_table`,
    /// `invalid_vector`, `dimension_mismatch`, `invalid_k`, …).
    #[error("{code}: {message}")]
    Query {
        /// Stable code.
        code: &'static str,
        /// What is wrong and what to fix.
        message: String,
    },
    /// The query ran longer than the limit and was cancelled.
    #[error("query cancelled after {0} ms")]
    Timeout(u64),
    /// The query needed more memory than the limit.
    #[error("query exceeded the memory limit: {0}")]
    ResourcesExhausted(String),
    /// Too many queries at once.
    #[error("too many queries running; retry shortly")]
    Busy,
    /// The tables are being rebuilt or caught up.
    #[error("query tables unavailable: {0}")]
    Unavailable(String),
    /// The node has no embedding model: text routes cannot answer.
    #[error("{0}")]
    NoModel(String),
    /// The ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] meshnode_ledger::Error),
    /// The blob store failed.
    #[error("store: {0}")]
    Store(#[from] meshnode_store::Error),
    /// A filesystem operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Our bug or a failure inside Lance/DataFusion.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Query { code, .. } => code,
            Error::Timeout(_) => "query_timeout",
            Error::ResourcesExhausted(_) => "query_too_expensive",
            Error::Busy => "too_many_queries",
            Error::Unavailable(_) => "unavailable",
            Error::NoModel(_) => "no_embed_model",
            Error::Ledger(e) => e.code(),
            Error::Store(_) => "store_error",
            Error::Io(_) => "io_error",
            Error::Internal(_) => "internal",
        }
    }
}

/// Every code of [`Error::Query`] (a worker process sends codes as text; the node maps them
/// back here).
const CODES: &[&str] = &[
    "as_of_ahead",
    "dimension_mismatch",
    "filter_too_large",
    "invalid_columns",
    "invalid_filter",
    "invalid_input",
    "invalid_k",
    "invalid_metric",
    "invalid_mode",
    "invalid_text",
    "invalid_vector",
    "knn_error",
    "not_a_text_table",
    "not_a_vector_table",
    "read_only",
    "sql_error",
    "sql_too_complex",
    "sql_too_deep",
    "sql_too_large",
    "too_many_inputs",
    "unknown_column",
    "unknown_function",
    "unknown_table",
];

/// The static code for `code` (`sql_error` for an unknown one).
pub(crate) fn known_code(code: &str) -> &'static str {
    CODES
        .iter()
        .copied()
        .find(|c| *c == code)
        .unwrap_or("sql_error")
}

pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Error {
    debug_assert!(
        CODES.contains(&code),
        "query error code {code} not in CODES"
    );
    Error::Query {
        code,
        message: message.into(),
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// The query result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    /// Every literal code given to `bad(…)` in this crate is one a worker's answer can carry
    /// back (`known_code` would turn any other into `sql_error`).
    #[test]
    fn every_code_of_the_crate_is_known() {
        let sources = [
            include_str!("sql.rs"),
            include_str!("knn.rs"),
            include_str!("guard.rs"),
            include_str!("lib.rs"),
            include_str!("tables.rs"),
            include_str!("materialize.rs"),
            include_str!("cancel.rs"),
            include_str!("worker.rs"),
            include_str!("hybrid.rs"),
            include_str!("ann.rs"),
            include_str!("hot.rs"),
            include_str!("text.rs"),
        ];
        let mut seen = 0;
        for source in sources {
            for (i, _) in source.match_indices("bad(") {
                let rest = source[i + 4..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let code = &rest[..rest.find('"').expect("closing quote")];
                assert_eq!(super::known_code(code), code, "code {code} is not in CODES");
                seen += 1;
            }
        }
        assert!(seen > 20, "found only {seen} codes: the scan is broken");
    }
}
