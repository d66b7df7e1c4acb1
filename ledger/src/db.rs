//! The ledger's index database (redb): events, logs, the transparency tree, derived state,
//! checkpoints and pending events. Values are postcard-encoded records of `fold`.

use std::collections::HashMap;
use std::path::Path;

use meshnode_schemas::{AuthorKey, BlobHash, EventId};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::fold::{
    AuthorState, BasinState, BasinVersion, EventRecord, ForkProof, HostMark, Lookup, NodeState,
    Overlay, ReputationState, SkillState, State,
};
use crate::tlog::{Nodes, TreeHash, leaf_hash};

type Key32 = [u8; 32];

/// Scalars: `n_events` (u64, 8 bytes LE), `supply` (u128, 16 bytes LE) and `last_audit`.
pub(crate) const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
/// Leaf index → EventRecord. Keyed by acceptance order so that a batch appends at the right
/// edge of the tree; the EventId → leaf index map is kept in memory ([`EventIds`]), rebuilt
/// from `leaves` on open.
pub(crate) const EVENTS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("events");

/// EventId → leaf index of every committed event.
pub(crate) type EventIds = HashMap<EventId, u64>;

/// Builds [`EventIds`] from the `leaves` table.
pub(crate) fn load_ids(tx: &ReadTransaction, n_events: u64) -> Result<EventIds> {
    let leaves = tx.open_table(LEAVES)?;
    let mut ids = HashMap::with_capacity(n_events as usize);
    for entry in leaves.range(0..n_events)? {
        let (index, id) = entry?;
        ids.insert(EventId::from_bytes(id.value()), index.value());
    }
    Ok(ids)
}
/// (author, seq, EventId) → (): every accepted event of a log (two or more at a forked seq).
pub(crate) const LOG: TableDefinition<'static, (Key32, u64, Key32), ()> =
    TableDefinition::new("log");
/// Transparency-log leaf index → EventId (acceptance order).
pub(crate) const LEAVES: TableDefinition<'static, u64, Key32> = TableDefinition::new("leaves");
/// (level ≥ 1, index) → hash of a perfect subtree.
pub(crate) const TREE: TableDefinition<'static, (u8, u64), Key32> = TableDefinition::new("tree");
/// Tree size → signed checkpoint note.
pub(crate) const CHECKPOINTS: TableDefinition<'static, u64, &str> =
    TableDefinition::new("checkpoints");
/// Version EventId → BasinVersion.
pub(crate) const VERSIONS: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("basin_versions");
/// (basin publish id, leaf index) → version id: a basin's history in acceptance order.
pub(crate) const BASIN_HISTORY: TableDefinition<'static, (Key32, u64), Key32> =
    TableDefinition::new("basin_history");
pub(crate) const AUTHORS: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_authors");
pub(crate) const SKILLS: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_skills");
pub(crate) const BASINS: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_basins");
pub(crate) const REPUTATION: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_reputation");
pub(crate) const NODES: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_nodes");
/// Who hosts which blob: (blob, host) → the host's deciding `blob.host` (seq, id, pinned),
/// one row per pair so that a popular blob costs one small row per announcement.
pub(crate) const HOSTS: TableDefinition<'static, (Key32, Key32), (u64, Key32, bool)> =
    TableDefinition::new("state_hosts");
/// Event id → the peer (endpoint id) whose log it was accepted from. *Local*: not part of
/// the state (an event posted here, or woken from the pending set, has no row).
pub(crate) const DELIVERED: TableDefinition<'static, Key32, Key32> =
    TableDefinition::new("delivered_by");
/// Forked log → canonical fork proof.
pub(crate) const FORKS: TableDefinition<'static, Key32, &[u8]> =
    TableDefinition::new("state_forks");
/// (credit, covering event) → (): which events of the recipient's log covered a credit.
pub(crate) const COVERED_BY: TableDefinition<'static, (Key32, Key32), ()> =
    TableDefinition::new("covered_by");
/// Contested events.
pub(crate) const CONTESTED: TableDefinition<'static, Key32, ()> = TableDefinition::new("contested");
/// Unreferenced credits: (recipient, credit event) → ().
pub(crate) const UNCOVERED: TableDefinition<'static, (Key32, Key32), ()> =
    TableDefinition::new("uncovered");
/// Version of the row formats in this database (META `format`).
pub(crate) const FORMAT: u64 = 5;
/// Envelope BlobHash → EventId and arrival time (ms) of events waiting for prev or deps.
pub(crate) const PENDING: TableDefinition<'static, Key32, (Key32, u64)> =
    TableDefinition::new("pending");

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(postcard::to_stdvec(value)?)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(postcard::from_bytes(bytes)?)
}

/// Opens (or creates) the database and every table.
pub(crate) fn open(path: &Path) -> Result<Database> {
    let db = Database::create(path)?;
    // The format first: tables of an older layout may have other key types.
    let tx = begin_write(&db)?;
    tx.open_table(META)?;
    tx.commit()?;
    let tx = db.begin_read()?;
    let n_events = meta_u64(&tx, "n_events")?;
    let format = meta_u64(&tx, "format")?;
    drop(tx);
    if format != FORMAT && n_events > 0 {
        return Err(Error::Corrupt(format!(
            "the ledger index at {} has row format {format}, this build reads {FORMAT}; it \
             was written by an older development build: start from a new data dir",
            path.display()
        )));
    }
    let tx = begin_write(&db)?;
    if format != FORMAT {
        // An empty index of an older layout: drop the tables whose key types changed.
        for name in ["events", "log", "state_hosts", "state_forks"] {
            tx.delete_table(redb::TableDefinition::<&str, ()>::new(name))?;
        }
    }
    {
        tx.open_table(META)?;
        tx.open_table(EVENTS)?;
        tx.open_table(LOG)?;
        tx.open_table(LEAVES)?;
        tx.open_table(TREE)?;
        tx.open_table(CHECKPOINTS)?;
        tx.open_table(VERSIONS)?;
        tx.open_table(BASIN_HISTORY)?;
        tx.open_table(AUTHORS)?;
        tx.open_table(SKILLS)?;
        tx.open_table(BASINS)?;
        tx.open_table(REPUTATION)?;
        tx.open_table(NODES)?;
        tx.open_table(HOSTS)?;
        tx.open_table(DELIVERED)?;
        tx.open_table(FORKS)?;
        tx.open_table(PENDING)?;
        tx.open_table(UNCOVERED)?;
        tx.open_table(COVERED_BY)?;
        tx.open_table(CONTESTED)?;
    }
    tx.commit()?;
    if format != FORMAT {
        let tx = begin_write(&db)?;
        tx.open_table(META)?
            .insert("format", FORMAT.to_le_bytes().as_slice())?;
        tx.commit()?;
    }
    Ok(db)
}

/// A little-endian META scalar of `N` bytes (zeros when absent).
fn meta_le<const N: usize>(tx: &ReadTransaction, key: &str) -> Result<[u8; N]> {
    let table = tx.open_table(META)?;
    match table.get(key)? {
        Some(v) => v
            .value()
            .try_into()
            .map_err(|_| Error::Corrupt(format!("meta {key} is not {N} bytes"))),
        None => Ok([0; N]),
    }
}

pub(crate) fn meta_u128(tx: &ReadTransaction, key: &str) -> Result<u128> {
    meta_le(tx, key).map(u128::from_le_bytes)
}

pub(crate) fn meta_u64(tx: &ReadTransaction, key: &str) -> Result<u64> {
    meta_le(tx, key).map(u64::from_le_bytes)
}

/// Loads the whole derived state.
pub(crate) fn load_state(db: &Database) -> Result<State> {
    load_state_in(&db.begin_read()?)
}

/// Loads the whole derived state as of a read transaction.
pub(crate) fn load_state_in(tx: &ReadTransaction) -> Result<State> {
    let mut state = State {
        n_events: meta_u64(tx, "n_events")?,
        supply: meta_u128(tx, "supply")?,
        ..State::default()
    };
    for entry in tx.open_table(AUTHORS)?.iter()? {
        let (k, v) = entry?;
        state.authors.insert(
            AuthorKey::from_bytes(k.value()),
            decode::<AuthorState>(v.value())?,
        );
    }
    for entry in tx.open_table(UNCOVERED)?.iter()? {
        let (k, _) = entry?;
        let (author, credit) = k.value();
        state
            .authors
            .entry(AuthorKey::from_bytes(author))
            .or_default()
            .uncovered
            .insert(EventId::from_bytes(credit));
    }
    for entry in tx.open_table(SKILLS)?.iter()? {
        let (k, v) = entry?;
        state.skills.insert(
            EventId::from_bytes(k.value()),
            decode::<SkillState>(v.value())?,
        );
    }
    for entry in tx.open_table(BASINS)?.iter()? {
        let (k, v) = entry?;
        state.basins.insert(
            EventId::from_bytes(k.value()),
            decode::<BasinState>(v.value())?,
        );
    }
    for entry in tx.open_table(REPUTATION)?.iter()? {
        let (k, v) = entry?;
        state.reputation.insert(
            AuthorKey::from_bytes(k.value()),
            decode::<ReputationState>(v.value())?,
        );
    }
    for entry in tx.open_table(NODES)?.iter()? {
        let (k, v) = entry?;
        state.nodes.insert(
            AuthorKey::from_bytes(k.value()),
            decode::<NodeState>(v.value())?,
        );
    }
    for entry in tx.open_table(HOSTS)?.iter()? {
        let (k, v) = entry?;
        let (blob, host) = k.value();
        let (seq, id, pinned) = v.value();
        state
            .hosts
            .entry(BlobHash::from_bytes(blob))
            .or_default()
            .insert(
                AuthorKey::from_bytes(host),
                HostMark {
                    seq,
                    id: EventId::from_bytes(id),
                    pinned,
                },
            );
    }
    for entry in tx.open_table(FORKS)?.iter()? {
        let (k, v) = entry?;
        state.forks.insert(
            AuthorKey::from_bytes(k.value()),
            decode::<ForkProof>(v.value())?,
        );
    }
    for entry in tx.open_table(CONTESTED)?.iter()? {
        state
            .contested
            .insert(EventId::from_bytes(entry?.0.value()));
    }
    Ok(state)
}

/// A host row: (blob, host) and the deciding (seq, event, pinned).
type HostRow = ((Key32, Key32), (u64, Key32, bool));

/// A fork row: the forked log and its encoded proof.
type ForkRow = (Key32, Vec<u8>);

/// Which state table a row belongs to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum StateTable {
    Authors,
    Skills,
    Basins,
    Reputation,
    Nodes,
}

/// Everything one batch writes, encoded, so that the write can run on a blocking thread.
#[derive(Default)]
pub(crate) struct BatchRows {
    events: Vec<(u64, Vec<u8>)>,
    log: Vec<(Key32, u64, Key32)>,
    leaves: Vec<(u64, Key32)>,
    tree: Vec<(u8, u64, TreeHash)>,
    versions: Vec<(Key32, Vec<u8>)>,
    history: Vec<((Key32, u64), Key32)>,
    state: Vec<(StateTable, Key32, Option<Vec<u8>>)>,
    forks: Vec<ForkRow>,
    uncovered: Vec<((Key32, Key32), bool)>,
    covered_by: Vec<(Key32, Key32)>,
    contested: Vec<Key32>,
    hosts: Vec<HostRow>,
    n_events: u64,
    supply: u128,
    pub(crate) pending_add: Vec<(Key32, (Key32, u64))>,
    pub(crate) pending_remove: Vec<Key32>,
    /// (event id, peer) of the events accepted from a peer's log.
    pub(crate) delivered: Vec<(Key32, Key32)>,
    pub(crate) checkpoint: Option<(u64, String)>,
}

fn row<T: Serialize>(value: Option<&T>) -> Result<Option<Vec<u8>>> {
    value.map(encode).transpose()
}

/// Encodes the records of an overlay, the tree nodes completed by its leaves and the touched
/// parts of the state.
pub(crate) fn batch_rows(
    state: &State,
    overlay: &Overlay,
    tree_nodes: &[(u8, u64, TreeHash)],
) -> Result<BatchRows> {
    let mut rows = BatchRows {
        n_events: state.n_events,
        supply: state.supply,
        tree: tree_nodes.to_vec(),
        ..BatchRows::default()
    };
    for (id, record) in &overlay.events {
        debug_assert_eq!(*id, record.id);
        rows.events.push((record.index, encode(record)?));
    }
    for (author, seq, id) in &overlay.log {
        rows.log.push((*author.as_bytes(), *seq, *id.as_bytes()));
    }
    for (credit, coverers) in &overlay.covered_by {
        for y in coverers {
            rows.covered_by.push((*credit.as_bytes(), *y.as_bytes()));
        }
    }
    rows.contested = overlay.contested.iter().map(|id| *id.as_bytes()).collect();
    for id in &overlay.accepted {
        rows.leaves.push((overlay.events[id].index, *id.as_bytes()));
    }
    for (id, version) in &overlay.versions {
        rows.versions.push((*id.as_bytes(), encode(version)?));
        let index = overlay.events[id].index;
        rows.history
            .push(((*version.basin.as_bytes(), index), *id.as_bytes()));
    }
    for (author, credit, added) in &overlay.uncovered {
        rows.uncovered
            .push(((*author.as_bytes(), *credit.as_bytes()), *added));
    }
    for (blob, host, mark) in &overlay.hosts {
        rows.hosts.push((
            (*blob.as_bytes(), *host.as_bytes()),
            (mark.seq, *mark.id.as_bytes(), mark.pinned),
        ));
    }
    let t = &overlay.touched;
    for key in &t.authors {
        rows.state.push((
            StateTable::Authors,
            *key.as_bytes(),
            row(state.authors.get(key))?,
        ));
    }
    for key in &t.skills {
        rows.state.push((
            StateTable::Skills,
            *key.as_bytes(),
            row(state.skills.get(key))?,
        ));
    }
    for key in &t.basins {
        rows.state.push((
            StateTable::Basins,
            *key.as_bytes(),
            row(state.basins.get(key))?,
        ));
    }
    for key in &t.reputation {
        rows.state.push((
            StateTable::Reputation,
            *key.as_bytes(),
            row(state.reputation.get(key))?,
        ));
    }
    for key in &t.nodes {
        rows.state.push((
            StateTable::Nodes,
            *key.as_bytes(),
            row(state.nodes.get(key))?,
        ));
    }
    for author in &t.forks {
        let proof = state
            .forks
            .get(author)
            .ok_or_else(|| Error::Corrupt(format!("fork proof of {author} missing")))?;
        rows.forks.push((*author.as_bytes(), encode(proof)?));
    }
    Ok(rows)
}

/// A write transaction that records the allocator state with its commit (redb quick-repair),
/// so that opening after a crash does not walk the whole index (seconds per GiB).
pub(crate) fn begin_write(
    db: &Database,
) -> std::result::Result<redb::WriteTransaction, redb::TransactionError> {
    let mut tx = db.begin_write()?;
    tx.set_quick_repair(true);
    Ok(tx)
}

/// Inserts (`true`) or removes (`false`) the keys of a set-valued table, in order.
fn apply_set_changes(
    table: &mut redb::Table<'_, (Key32, Key32), ()>,
    changes: &[((Key32, Key32), bool)],
) -> Result<()> {
    for (k, added) in changes {
        if *added {
            table.insert(*k, ())?;
        } else {
            table.remove(*k)?;
        }
    }
    Ok(())
}

/// Writes a batch in one transaction and commits it durably.
pub(crate) fn write_rows(db: &Database, rows: BatchRows) -> Result<()> {
    let tx = begin_write(db)?;
    {
        let mut events = tx.open_table(EVENTS)?;
        for (k, v) in &rows.events {
            events.insert(*k, v.as_slice())?;
        }
        let mut log = tx.open_table(LOG)?;
        for k in &rows.log {
            log.insert(*k, ())?;
        }
        let mut covered_by = tx.open_table(COVERED_BY)?;
        for k in &rows.covered_by {
            covered_by.insert(*k, ())?;
        }
        let mut contested = tx.open_table(CONTESTED)?;
        for k in &rows.contested {
            contested.insert(*k, ())?;
        }
        let mut leaves = tx.open_table(LEAVES)?;
        for (k, v) in &rows.leaves {
            leaves.insert(*k, *v)?;
        }
        let mut tree = tx.open_table(TREE)?;
        for (level, index, hash) in &rows.tree {
            tree.insert((*level, *index), *hash)?;
        }
        let mut versions = tx.open_table(VERSIONS)?;
        for (k, v) in &rows.versions {
            versions.insert(*k, v.as_slice())?;
        }
        let mut history = tx.open_table(BASIN_HISTORY)?;
        for (k, v) in &rows.history {
            history.insert(*k, *v)?;
        }
        for (table, key, value) in &rows.state {
            let definition = match table {
                StateTable::Authors => AUTHORS,
                StateTable::Skills => SKILLS,
                StateTable::Basins => BASINS,
                StateTable::Reputation => REPUTATION,
                StateTable::Nodes => NODES,
            };
            let mut t = tx.open_table(definition)?;
            match value {
                Some(v) => {
                    t.insert(*key, v.as_slice())?;
                }
                None => {
                    t.remove(*key)?;
                }
            }
        }
        let mut forks = tx.open_table(FORKS)?;
        for (k, v) in &rows.forks {
            forks.insert(*k, v.as_slice())?;
        }
        apply_set_changes(&mut tx.open_table(UNCOVERED)?, &rows.uncovered)?;
        let mut hosts = tx.open_table(HOSTS)?;
        for (k, v) in &rows.hosts {
            hosts.insert(*k, *v)?;
        }
        let mut pending = tx.open_table(PENDING)?;
        for (k, v) in &rows.pending_add {
            pending.insert(*k, *v)?;
        }
        for k in &rows.pending_remove {
            pending.remove(*k)?;
        }
        let mut delivered = tx.open_table(DELIVERED)?;
        for (k, v) in &rows.delivered {
            delivered.insert(*k, *v)?;
        }
        if let Some((size, note)) = &rows.checkpoint {
            tx.open_table(CHECKPOINTS)?.insert(*size, note.as_str())?;
        }
        let mut meta = tx.open_table(META)?;
        meta.insert("n_events", rows.n_events.to_le_bytes().as_slice())?;
        meta.insert("supply", rows.supply.to_le_bytes().as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

/// [`Lookup`] and [`Nodes`] over a read transaction, with envelopes read through `envelope`.
pub(crate) struct DbView<'a, F: Fn(&BlobHash) -> Result<Option<Vec<u8>>>> {
    pub(crate) ids: &'a EventIds,
    pub(crate) events: redb::ReadOnlyTable<u64, &'static [u8]>,
    pub(crate) log: redb::ReadOnlyTable<(Key32, u64, Key32), ()>,
    pub(crate) covered_by: redb::ReadOnlyTable<(Key32, Key32), ()>,
    pub(crate) versions: redb::ReadOnlyTable<Key32, &'static [u8]>,
    pub(crate) leaves: redb::ReadOnlyTable<u64, Key32>,
    pub(crate) tree: redb::ReadOnlyTable<(u8, u64), Key32>,
    pub(crate) envelope: &'a F,
}

impl<'a, F: Fn(&BlobHash) -> Result<Option<Vec<u8>>>> DbView<'a, F> {
    pub(crate) fn new(tx: &ReadTransaction, ids: &'a EventIds, envelope: &'a F) -> Result<Self> {
        Ok(Self {
            ids,
            events: tx.open_table(EVENTS)?,
            log: tx.open_table(LOG)?,
            covered_by: tx.open_table(COVERED_BY)?,
            versions: tx.open_table(VERSIONS)?,
            leaves: tx.open_table(LEAVES)?,
            tree: tx.open_table(TREE)?,
            envelope,
        })
    }
}

impl<F: Fn(&BlobHash) -> Result<Option<Vec<u8>>>> Lookup for DbView<'_, F> {
    fn event(&self, id: &EventId) -> Result<Option<EventRecord>> {
        let Some(index) = self.ids.get(id) else {
            return Ok(None);
        };
        match self.events.get(*index)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Err(Error::Corrupt(format!(
                "event {id} is leaf {index} but has no record"
            ))),
        }
    }
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Vec<EventId>> {
        let a = *author.as_bytes();
        let mut ids = Vec::new();
        for entry in self.log.range((a, seq, [0; 32])..=(a, seq, [0xff; 32]))? {
            ids.push(EventId::from_bytes(entry?.0.value().2));
        }
        Ok(ids)
    }
    fn covered_by(&self, credit: &EventId) -> Result<Vec<EventId>> {
        let c = *credit.as_bytes();
        let mut ids = Vec::new();
        for entry in self.covered_by.range((c, [0; 32])..=(c, [0xff; 32]))? {
            ids.push(EventId::from_bytes(entry?.0.value().1));
        }
        Ok(ids)
    }
    fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>> {
        match self.versions.get(*id.as_bytes())? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }
    fn envelope(&self, id: &EventId) -> Result<Option<Vec<u8>>> {
        match self.event(id)? {
            Some(record) => (self.envelope)(&record.envelope),
            None => Ok(None),
        }
    }
}

impl<F: Fn(&BlobHash) -> Result<Option<Vec<u8>>>> Nodes for DbView<'_, F> {
    fn node(&self, level: u8, index: u64) -> Result<TreeHash> {
        if level == 0 {
            let id = self
                .leaves
                .get(index)?
                .ok_or_else(|| Error::Corrupt(format!("leaf {index} missing")))?;
            return Ok(leaf_hash(&EventId::from_bytes(id.value())));
        }
        self.tree
            .get((level, index))?
            .map(|v| v.value())
            .ok_or_else(|| Error::Corrupt(format!("tree node ({level}, {index}) missing")))
    }
}
