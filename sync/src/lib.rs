//! meshnode sync: the iroh endpoint, automerge catalog and heads documents, blob and event
//! replication between peers.
