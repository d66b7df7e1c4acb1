//! The peers a node knows, persisted in `peers.json` in its data directory (written to a
//! temporary file, fsynced and renamed, so a crash leaves the old or the new list).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Most peers remembered.
pub const PEERS_MAX: usize = 256;
/// Most peers remembered that no user added (learnt by exchange or from their dialling us).
pub const LEARNT_MAX: usize = PEERS_MAX / 2;

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
    /// What it was last scored for (at most 200 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_offence: Option<String>,
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
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(peers) => peers,
                Err(e) => {
                    // Kept aside, not overwritten by the next save: its peers and bans can
                    // be recovered by hand.
                    let aside = path.with_extension("json.unreadable");
                    std::fs::rename(&path, &aside)?;
                    tracing::warn!(
                        "{}: unreadable ({e}); moved to {} and starting with no peers",
                        path.display(),
                        aside.display()
                    );
                    BTreeMap::new()
                }
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_survives_a_save_and_an_unreadable_file_is_kept_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let mut table = PeerTable::load(dir.path()).expect("empty");
        table.peers.insert(
            "ab".into(),
            PeerRecord {
                ticket: "endpointx".into(),
                cursor: 7,
                manual: true,
                ..PeerRecord::default()
            },
        );
        table.save().expect("save");
        let again = PeerTable::load(dir.path()).expect("load");
        assert_eq!(again.peers, table.peers);
        std::fs::write(dir.path().join("peers.json"), b"{not json").expect("corrupt");
        let empty = PeerTable::load(dir.path()).expect("load corrupt");
        assert!(empty.peers.is_empty());
        let aside = std::fs::read(dir.path().join("peers.json.unreadable")).expect("kept");
        assert_eq!(aside, b"{not json");
    }
}
