//! Small blobs written in groups (event envelopes): one redb table keyed by BlobHash.
//!
//! iroh-blobs stores blobs up to 16 KiB inline in its own database too, but every add goes
//! through its actors (tens of microseconds); a ledger batch of thousands of envelopes is
//! written here in one transaction instead. Reads verify the hash like every other read.

use std::collections::HashSet;
use std::path::Path;

use bytes::Bytes;
use meshnode_schemas::BlobHash;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

/// Largest blob kept here.
pub(crate) const SMALL_BYTES_MAX: usize = 16 * 1024;

const BLOBS: TableDefinition<'static, [u8; 32], &'static [u8]> =
    TableDefinition::new("small_blobs");

fn db_error(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("small blob table: {e}"))
}

#[derive(Debug)]
pub(crate) struct SmallBlobs {
    db: Database,
}

impl SmallBlobs {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(db_error)?;
        let tx = db.begin_write().map_err(db_error)?;
        tx.open_table(BLOBS).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(Self { db })
    }

    /// Writes blobs in one durable transaction.
    pub(crate) fn put_many(&self, items: &[(BlobHash, Bytes)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = tx.open_table(BLOBS).map_err(db_error)?;
            for (hash, bytes) in items {
                table
                    .insert(*hash.as_bytes(), bytes.as_ref())
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)?;
        Ok(())
    }

    /// The stored bytes of a blob, unverified (the caller checks the hash).
    pub(crate) fn get(&self, hash: &BlobHash) -> Result<Option<Bytes>> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(BLOBS).map_err(db_error)?;
        Ok(table
            .get(*hash.as_bytes())
            .map_err(db_error)?
            .map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// Many blobs in one read transaction, unverified; `None` where absent.
    pub(crate) fn get_many(&self, hashes: &[BlobHash]) -> Result<Vec<Option<Bytes>>> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(BLOBS).map_err(db_error)?;
        hashes
            .iter()
            .map(|h| {
                Ok(table
                    .get(*h.as_bytes())
                    .map_err(db_error)?
                    .map(|v| Bytes::copy_from_slice(v.value())))
            })
            .collect()
    }

    pub(crate) fn contains(&self, hash: &BlobHash) -> Result<bool> {
        Ok(self.size(hash)?.is_some())
    }

    pub(crate) fn size(&self, hash: &BlobHash) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(BLOBS).map_err(db_error)?;
        Ok(table
            .get(*hash.as_bytes())
            .map_err(db_error)?
            .map(|v| v.value().len() as u64))
    }

    pub(crate) fn list(&self) -> Result<Vec<BlobHash>> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(BLOBS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (k, _) = entry.map_err(db_error)?;
            out.push(BlobHash::from_bytes(k.value()));
        }
        Ok(out)
    }

    pub(crate) fn remove(&self, hash: &BlobHash) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_error)?;
        tx.open_table(BLOBS)
            .map_err(db_error)?
            .remove(*hash.as_bytes())
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(())
    }

    /// Deletes every blob not in `live`; returns how many.
    pub(crate) fn sweep(&self, live: &HashSet<BlobHash>) -> Result<u64> {
        let dead: Vec<BlobHash> = self
            .list()?
            .into_iter()
            .filter(|h| !live.contains(h))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = tx.open_table(BLOBS).map_err(db_error)?;
            for hash in &dead {
                table.remove(*hash.as_bytes()).map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)?;
        Ok(dead.len() as u64)
    }
}
