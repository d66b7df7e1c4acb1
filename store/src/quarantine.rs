//! The quarantine journal: an append-only, fsynced text log of corrupt blobs being purged.
//!
//! Line format: `begin <hex> <pinned 0|1> <reason>` and `end <hex>`. A `begin` without a later
//! `end` is finished on the next start, so a crash in the middle never loses a pin.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use meshnode_schemas::BlobHash;

use crate::error::Result;

#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    fn append(&self, line: &str) -> Result<()> {
        let mut file = self
            .file
            .lock()
            .expect("invariant: journal lock is never poisoned");
        file.write_all(line.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }

    pub(crate) fn begin(&self, hash: &BlobHash, pinned: bool, reason: &str) -> Result<()> {
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        self.append(&format!("begin {} {} {}\n", hash, u8::from(pinned), reason))
    }

    pub(crate) fn end(&self, hash: &BlobHash) -> Result<()> {
        self.append(&format!("end {hash}\n"))
    }

    /// Quarantines begun but not ended, with whether the blob was pinned.
    pub(crate) fn pending(&self) -> Result<Vec<(BlobHash, bool)>> {
        let file = File::open(&self.path)?;
        let mut open: BTreeMap<BlobHash, bool> = BTreeMap::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            let mut parts = line.splitn(4, ' ');
            let (Some(op), Some(hex)) = (parts.next(), parts.next()) else {
                continue;
            };
            // A torn last line (crash mid-write) fails to parse and is ignored.
            let Ok(hash) = BlobHash::from_hex(hex) else {
                continue;
            };
            match op {
                "begin" => {
                    let pinned = parts.next() == Some("1");
                    let was = open.get(&hash).copied().unwrap_or(false);
                    open.insert(hash, pinned || was);
                }
                "end" => {
                    open.remove(&hash);
                }
                _ => {}
            }
        }
        Ok(open.into_iter().collect())
    }
}
