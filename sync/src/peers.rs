//! The peers a node knows, persisted in `peers.json` in its data directory (written to a
//! temporary file, fsynced and renamed, so a crash leaves the old or the new list).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Most peers remembered.
pub const PEERS_MAX: usize = 256;

/// What is remembered of one peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    /// Its ticket (endpoint id and direct addresses).
    pub ticket: String,
    /// The next leaf of its transparency log to ask for.
    pub cursor: u64,
    /// Added by a user (`peer add`), not learned by peer exchange.
    #[serde(default)]
    pub manual: bool,
    /// Misbehaviour score (decays; past the limit the peer is banned).
    #[serde(default)]
    pub score: u32,
    /// Banned until this time (ms since the epoch), if banned.
    #[serde(default)]
    pub banned_until_ms: u64,
    /// Bans so far (each lasts twice the one before).
    #[serde(default)]
    pub bans: u32,
}

/// The peers table, by endpoint id (hex).
#[derive(Debug)]
pub(crate) struct PeerTable {
    path: PathBuf,
    pub(crate) peers: BTreeMap<String, PeerRecord>,
}

impl PeerTable {
    /// Loads `peers.json` from `dir` (an empty table if there is none).
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("peers.json");
        let peers = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: unreadable ({e}); starting with no peers",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(Self { path, peers })
    }

    /// Writes the table durably.
    pub(crate) fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.peers)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
