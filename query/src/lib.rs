//! meshnode query: Lance datasets materialised from the ledger's event feed, read-only
//! DataFusion SQL and vector search.
