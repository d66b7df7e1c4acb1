//! Small blobs written in groups (event envelopes), in an append-only redb table.
//!
//! iroh-blobs stores blobs up to 16 KiB inline in its own database too, but every add goes
//! through its actors (tens of microseconds); a ledger batch of thousands of envelopes is
//! written here in one transaction instead. Reads verify the hash like every other read.
//!
//! Layout: rows are keyed by a sequence number, so a batch appends at the right edge of the
//! B-trees instead of rewriting pages all over a hash-keyed tree (with random BLAKE3 keys,
//! every batch of a few thousand blobs would copy nearly every leaf page once the table holds
//! a few hundred thousand). The hash → sequence map lives in memory, rebuilt on open from
//! the compact `small_keys` table (40 bytes a blob).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use meshnode_schemas::BlobHash;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{Error, Result};

/// Largest blob kept here.
pub(crate) const SMALL_BYTES_MAX: usize = 16 * 1024;

/// Sequence → blob bytes.
const DATA: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("small_data");
/// Sequence → blob hash (what the in-memory index is rebuilt from).
const KEYS: TableDefinition<'static, u64, [u8; 32]> = TableDefinition::new("small_keys");
/// The first layout (hash → bytes); migrated on open.
const LEGACY: TableDefinition<'static, [u8; 32], &'static [u8]> =
    TableDefinition::new("small_blobs");

fn db_error(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("small blob table: {e}"))
}

/// A write transaction that records the allocator state with its commit (redb quick-repair),
/// so that opening after a crash does not walk the whole table (seconds per GiB).
fn begin_write(db: &Database) -> Result<redb::WriteTransaction> {
    let mut tx = db.begin_write().map_err(db_error)?;
    tx.set_quick_repair(true);
    Ok(tx)
}

#[derive(Debug)]
pub(crate) struct SmallBlobs {
    db: Database,
    /// Hash → sequence of every committed blob.
    index: RwLock<HashMap<BlobHash, u64>>,
    /// Next sequence; held across a write so that sequences are assigned in commit order.
    next: Mutex<u64>,
}

impl SmallBlobs {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(db_error)?;
        let tx = begin_write(&db)?;
        tx.open_table(DATA).map_err(db_error)?;
        tx.open_table(KEYS).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        let this = Self {
            db,
            index: RwLock::new(HashMap::new()),
            next: Mutex::new(0),
        };
        this.load()?;
        this.migrate()?;
        Ok(this)
    }

    fn load(&self) -> Result<()> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let keys = tx.open_table(KEYS).map_err(db_error)?;
        let n = keys.len().map_err(db_error)? as usize;
        let mut index = HashMap::with_capacity(n);
        let mut next = 0;
        for entry in keys.iter().map_err(db_error)? {
            let (seq, hash) = entry.map_err(db_error)?;
            let seq = seq.value();
            index.insert(BlobHash::from_bytes(hash.value()), seq);
            next = seq + 1;
        }
        *self
            .index
            .write()
            .expect("invariant: lock is never poisoned") = index;
        *self.next.lock().expect("invariant: lock is never poisoned") = next;
        Ok(())
    }

    /// Moves rows of the first (hash-keyed) layout into the append-only tables.
    fn migrate(&self) -> Result<()> {
        let legacy: Vec<(BlobHash, Bytes)> = {
            let tx = self.db.begin_read().map_err(db_error)?;
            let table = match tx.open_table(LEGACY) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(db_error(e)),
            };
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_error)? {
                let (k, v) = entry.map_err(db_error)?;
                out.push((
                    BlobHash::from_bytes(k.value()),
                    Bytes::copy_from_slice(v.value()),
                ));
            }
            out
        };
        self.write(&legacy, true)?;
        tracing::info!(blobs = legacy.len(), "small blob table migrated");
        Ok(())
    }

    /// Writes blobs in one durable transaction (blobs already stored are skipped).
    pub(crate) fn put_many(&self, items: &[(BlobHash, Bytes)]) -> Result<()> {
        self.write(items, false)
    }

    fn write(&self, items: &[(BlobHash, Bytes)], drop_legacy: bool) -> Result<()> {
        if items.is_empty() && !drop_legacy {
            return Ok(());
        }
        let mut next = self.next.lock().expect("invariant: lock is never poisoned");
        let mut added: Vec<(BlobHash, u64)> = Vec::with_capacity(items.len());
        let tx = begin_write(&self.db)?;
        {
            let index = self
                .index
                .read()
                .expect("invariant: lock is never poisoned");
            let mut in_batch = HashSet::with_capacity(items.len());
            let mut data = tx.open_table(DATA).map_err(db_error)?;
            let mut keys = tx.open_table(KEYS).map_err(db_error)?;
            for (hash, bytes) in items {
                if index.contains_key(hash) || !in_batch.insert(*hash) {
                    continue;
                }
                let seq = *next + added.len() as u64;
                data.insert(seq, bytes.as_ref()).map_err(db_error)?;
                keys.insert(seq, *hash.as_bytes()).map_err(db_error)?;
                added.push((*hash, seq));
            }
        }
        if drop_legacy {
            tx.delete_table(LEGACY).map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
        let mut index = self
            .index
            .write()
            .expect("invariant: lock is never poisoned");
        *next += added.len() as u64;
        index.extend(added);
        Ok(())
    }

    fn seq(&self, hash: &BlobHash) -> Option<u64> {
        self.index
            .read()
            .expect("invariant: lock is never poisoned")
            .get(hash)
            .copied()
    }

    /// The stored bytes of a blob, unverified (the caller checks the hash).
    pub(crate) fn get(&self, hash: &BlobHash) -> Result<Option<Bytes>> {
        Ok(self.get_many(std::slice::from_ref(hash))?.pop().flatten())
    }

    /// Many blobs in one read transaction, unverified; `None` where absent.
    pub(crate) fn get_many(&self, hashes: &[BlobHash]) -> Result<Vec<Option<Bytes>>> {
        let seqs: Vec<Option<u64>> = hashes.iter().map(|h| self.seq(h)).collect();
        if seqs.iter().all(Option::is_none) {
            return Ok(vec![None; hashes.len()]);
        }
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(DATA).map_err(db_error)?;
        seqs.into_iter()
            .map(|seq| match seq {
                // A row removed between the index read and this one reads as absent.
                Some(seq) => Ok(table
                    .get(seq)
                    .map_err(db_error)?
                    .map(|v| Bytes::copy_from_slice(v.value()))),
                None => Ok(None),
            })
            .collect()
    }

    pub(crate) fn contains(&self, hash: &BlobHash) -> Result<bool> {
        Ok(self.seq(hash).is_some())
    }

    pub(crate) fn size(&self, hash: &BlobHash) -> Result<Option<u64>> {
        let Some(seq) = self.seq(hash) else {
            return Ok(None);
        };
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(DATA).map_err(db_error)?;
        Ok(table
            .get(seq)
            .map_err(db_error)?
            .map(|v| v.value().len() as u64))
    }

    pub(crate) fn list(&self) -> Result<Vec<BlobHash>> {
        Ok(self
            .index
            .read()
            .expect("invariant: lock is never poisoned")
            .keys()
            .copied()
            .collect())
    }

    pub(crate) fn remove(&self, hash: &BlobHash) -> Result<()> {
        self.remove_many(std::slice::from_ref(hash), |_| false)
            .map(|_| ())
    }

    /// Deletes every blob not in `live`; returns how many.
    /// Removes every blob for which `keep` is false. `keep` is asked again while writes are
    /// held off, so a blob that became protected while the table was listed survives.
    pub(crate) fn sweep(&self, keep: impl Fn(&BlobHash) -> bool) -> Result<u64> {
        let dead: Vec<BlobHash> = self.list()?.into_iter().filter(|h| !keep(h)).collect();
        self.remove_many(&dead, keep)
    }

    fn remove_many(&self, hashes: &[BlobHash], keep: impl Fn(&BlobHash) -> bool) -> Result<u64> {
        let _next = self.next.lock().expect("invariant: lock is never poisoned");
        let seqs: Vec<(BlobHash, u64)> = hashes
            .iter()
            .filter(|h| !keep(h))
            .filter_map(|h| self.seq(h).map(|s| (*h, s)))
            .collect();
        if seqs.is_empty() {
            return Ok(0);
        }
        let tx = begin_write(&self.db)?;
        {
            let mut data = tx.open_table(DATA).map_err(db_error)?;
            let mut keys = tx.open_table(KEYS).map_err(db_error)?;
            for (_, seq) in &seqs {
                data.remove(*seq).map_err(db_error)?;
                keys.remove(*seq).map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)?;
        let mut index = self
            .index
            .write()
            .expect("invariant: lock is never poisoned");
        for (hash, _) in &seqs {
            index.remove(hash);
        }
        Ok(seqs.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(i: u32) -> (BlobHash, Bytes) {
        let bytes = Bytes::from(format!("small blob {i}").into_bytes());
        (BlobHash::of(&bytes), bytes)
    }

    #[test]
    fn append_only_rows_survive_reopen_and_dedupe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("small.redb");
        let items: Vec<_> = (0..100).map(blob).collect();
        {
            let small = SmallBlobs::open(&path).expect("open");
            small.put_many(&items[..60]).expect("put");
            // Overlapping and repeated items are stored once.
            let mut again = items[50..].to_vec();
            again.push(items[99].clone());
            small.put_many(&again).expect("put");
            assert_eq!(small.list().expect("list").len(), 100);
            small.remove(&items[3].0).expect("remove");
        }
        let small = SmallBlobs::open(&path).expect("reopen");
        assert_eq!(small.list().expect("list").len(), 99);
        assert_eq!(small.get(&items[3].0).expect("get"), None);
        for (hash, bytes) in &items[4..] {
            assert_eq!(small.get(hash).expect("get").as_ref(), Some(bytes));
            assert_eq!(small.size(hash).expect("size"), Some(bytes.len() as u64));
        }
        // New rows continue after the last sequence.
        small.put_many(&[blob(1000)]).expect("put");
        assert!(small.contains(&blob(1000).0).expect("contains"));
        let live: HashSet<BlobHash> = items[..10].iter().map(|(h, _)| *h).collect();
        assert_eq!(small.sweep(|h| live.contains(h)).expect("sweep"), 91);
        assert_eq!(small.list().expect("list").len(), 9);
    }

    #[test]
    fn the_hash_keyed_layout_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("small.redb");
        let items: Vec<_> = (0..20).map(blob).collect();
        {
            let db = Database::create(&path).expect("create");
            let tx = db.begin_write().expect("begin");
            {
                let mut table = tx.open_table(LEGACY).expect("table");
                for (hash, bytes) in &items {
                    table
                        .insert(*hash.as_bytes(), bytes.as_ref())
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
        for _ in 0..2 {
            let small = SmallBlobs::open(&path).expect("open");
            assert_eq!(small.list().expect("list").len(), 20);
            for (hash, bytes) in &items {
                assert_eq!(small.get(hash).expect("get").as_ref(), Some(bytes));
            }
        }
        let db = Database::open(&path).expect("open db");
        let tx = db.begin_read().expect("read");
        assert!(tx.open_table(LEGACY).is_err(), "legacy table removed");
    }
}
