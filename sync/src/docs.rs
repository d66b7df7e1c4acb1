//! The hint documents: each node's own `heads` and `catalog` automerge documents, written
//! from its ledger (one writer), and the read-only replicas it keeps of its peers' ones.
//!
//! They are hints: what a peer's documents say is never applied. A node reads a peer's
//! `heads` to see whether the peer holds anything it lacks (and skips reading the peer's log
//! when it does not); events still come only through the event plane and the ledger's checks.
//!
//! Shape (notes/sync.md §4.2): a flat map at the root, one `Bytes` scalar per key (values
//! packed into fixed binary layouts, 10–20× cheaper to load than nested maps):
//! - `heads`: `<author hex>` → `seq u64 BE ‖ head id ‖ envelope hash` (72 bytes);
//!   `fork:<author hex>` → `seq u64 BE ‖ lower id ‖ higher id` (72); `size` → the owner's
//!   transparency-log size these heads reflect (`u64 BE`, 8).
//! - `catalog`: `s<publish id hex>` → `author ‖ weights hash ‖ size u64 BE ‖ name` (≤ 136);
//!   `b<basin id hex>` → `owner ‖ head version ‖ versions u64 BE` (72); `n<author hex>` →
//!   the node's announced address (≤ 200). No heartbeat fields: every change stays in the
//!   history until the next epoch.
//!
//! A document's actor is derived from `(owner, kind, epoch)`, so a peer checks that every
//! change of a replica was written by the document's owner. A new epoch (a fresh document,
//! a new actor) starts at each start of the node and whenever the history outgrows the live
//! data ([`OwnDoc::outgrown`]); an actor is never reused (automerge#337).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ROOT, ReadDoc, ScalarValueRef, ValueRef};
use meshnode_ledger::Ledger;
use meshnode_schemas::{AuthorKey, EventId};
use serde::{Deserialize, Serialize};

/// Which of a node's two documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    /// Per author: the head of its log here.
    Heads,
    /// Skills, basins and nodes known here.
    Catalog,
}

impl DocKind {
    fn tag(self) -> u8 {
        match self {
            Self::Heads => 1,
            Self::Catalog => 2,
        }
    }

    /// Whether `key` (and `value`, for a put) fit this document's grammar.
    pub(crate) fn entry_ok(self, key: &str, value: Option<&[u8]>) -> bool {
        let hex64 = |s: &str| {
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let len = value.map(<[u8]>::len);
        match self {
            Self::Heads => {
                if key == SIZE_KEY {
                    return len.is_none_or(|n| n == 8);
                }
                let author = key.strip_prefix(FORK_PREFIX).unwrap_or(key);
                hex64(author) && len.is_none_or(|n| n == HEAD_BYTES)
            }
            Self::Catalog => {
                let Some(first) = key.chars().next() else {
                    return false;
                };
                let rest = &key[1..];
                hex64(rest)
                    && match (first, len) {
                        ('s' | 'b' | 'n', None) => true,
                        ('s', Some(n)) => (SKILL_FIXED..=SKILL_FIXED + NAME_MAX).contains(&n),
                        ('b', Some(n)) => n == 72,
                        ('n', Some(n)) => n <= ADDR_MAX,
                        _ => false,
                    }
            }
        }
    }
}

/// Key of the heads document's log size.
pub(crate) const SIZE_KEY: &str = "size";
/// Prefix of the heads document's fork keys.
pub(crate) const FORK_PREFIX: &str = "fork:";
/// Bytes of a heads value (and of a fork value).
const HEAD_BYTES: usize = 72;
/// Fixed part of a skill entry.
const SKILL_FIXED: usize = 72;
/// Longest skill name kept in the catalog (bytes, cut at a character boundary).
const NAME_MAX: usize = 64;
/// Longest node address kept in the catalog.
const ADDR_MAX: usize = 200;
/// A new epoch when the history passes this many times the live data…
const HISTORY_FACTOR: usize = 4;
/// …plus this much.
const HISTORY_SLACK: usize = 64 << 10;
/// …or this many changes.
const CHANGES_MAX: usize = 10_000;
/// Records read from the ledger at a time when the heads are brought up to date.
const RECORDS_PER_READ: usize = 4096;

/// The actor that writes `owner`'s document `kind` in `epoch`.
pub(crate) fn actor(owner: &[u8; 32], kind: DocKind, epoch: u64) -> ActorId {
    let mut h = blake3::Hasher::new();
    h.update(b"meshnode/doc");
    h.update(owner);
    h.update(&[kind.tag()]);
    h.update(&epoch.to_le_bytes());
    ActorId::from(&h.finalize().as_bytes()[..16])
}

/// A fresh epoch number: never the same twice for one owner (time, process and a counter).
fn fresh_epoch(owner: &[u8; 32]) -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(owner);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    h.update(&n.to_le_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// One of this node's own documents.
pub(crate) struct OwnDoc {
    owner: [u8; 32],
    kind: DocKind,
    epoch: u64,
    doc: Automerge,
    live: HashMap<String, Vec<u8>>,
    live_bytes: usize,
    history_bytes: usize,
    changes: usize,
    started: Instant,
}

impl OwnDoc {
    /// A new epoch holding `live` in one change.
    pub(crate) fn new(owner: [u8; 32], kind: DocKind, live: HashMap<String, Vec<u8>>) -> Self {
        let epoch = fresh_epoch(&owner);
        let mut doc = Self {
            owner,
            kind,
            epoch,
            doc: Automerge::new().with_actor(actor(&owner, kind, epoch)),
            live: HashMap::new(),
            live_bytes: 0,
            history_bytes: 0,
            changes: 0,
            started: Instant::now(),
        };
        doc.apply(live.into_iter().map(|(k, v)| (k, Some(v))).collect());
        doc
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn doc(&mut self) -> &mut Automerge {
        &mut self.doc
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Writes the entries that differ from the live values in one change (a `None` deletes);
    /// whether anything was written.
    pub(crate) fn apply(&mut self, updates: Vec<(String, Option<Vec<u8>>)>) -> bool {
        let updates: Vec<_> = updates
            .into_iter()
            .filter(|(k, v)| self.live.get(k) != v.as_ref())
            .collect();
        if updates.is_empty() {
            return false;
        }
        let mut tx = self.doc.transaction();
        for (key, value) in &updates {
            debug_assert!(
                self.kind.entry_ok(key, value.as_deref()),
                "own entry {key} fits the grammar"
            );
            let done = match value {
                Some(v) => tx.put(ROOT, key.as_str(), automerge::ScalarValue::Bytes(v.clone())),
                None => tx.delete(ROOT, key.as_str()),
            };
            if let Err(e) = done {
                tracing::error!("own {:?} document: {e}", self.kind);
            }
        }
        tx.commit_with(CommitOptions::default().with_time(0));
        for (key, value) in updates {
            if let Some(old) = self.live.remove(&key) {
                self.live_bytes -= key.len() + old.len();
            }
            if let Some(v) = value {
                self.live_bytes += key.len() + v.len();
                self.live.insert(key, v);
            }
        }
        if let Some(change) = self.doc.get_last_local_change() {
            self.history_bytes += change.raw_bytes().len();
        }
        self.changes += 1;
        true
    }

    /// Whether the history has outgrown the live data enough for a fresh epoch (and the
    /// epoch is at least `min_age` old).
    pub(crate) fn outgrown(&self, min_age: Duration) -> bool {
        self.started.elapsed() >= min_age
            && (self.history_bytes > HISTORY_FACTOR * self.live_bytes + HISTORY_SLACK
                || self.changes > CHANGES_MAX)
    }

    /// Starts a fresh epoch with the live data.
    pub(crate) fn renew(&mut self) {
        let live = std::mem::take(&mut self.live);
        *self = Self::new(self.owner, self.kind, live);
    }

    /// Bytes of history written in this epoch (change chunks).
    #[cfg(test)]
    pub(crate) fn history_bytes(&self) -> usize {
        self.history_bytes
    }
}

/// This node's two documents and where the heads were last brought up to date.
pub(crate) struct Own {
    pub(crate) heads: OwnDoc,
    pub(crate) catalog: OwnDoc,
    read_to: u64,
    seqs: HashMap<AuthorKey, u64>,
    forks: usize,
    catalog_at: Option<u64>,
}

impl Own {
    /// Empty documents of a new epoch; [`Own::refresh`] fills them from the ledger.
    pub(crate) fn new(owner: [u8; 32]) -> Self {
        Self {
            heads: OwnDoc::new(owner, DocKind::Heads, HashMap::new()),
            catalog: OwnDoc::new(owner, DocKind::Catalog, HashMap::new()),
            read_to: 0,
            seqs: HashMap::new(),
            forks: 0,
            catalog_at: None,
        }
    }

    pub(crate) fn doc(&mut self, kind: DocKind) -> &mut OwnDoc {
        match kind {
            DocKind::Heads => &mut self.heads,
            DocKind::Catalog => &mut self.catalog,
        }
    }

    /// Brings the heads document up to the ledger's log (one change), and the catalog too
    /// when `catalog` is set and the log grew since it was last written. Blocking.
    pub(crate) fn refresh(
        &mut self,
        ledger: &Ledger,
        catalog: bool,
    ) -> meshnode_ledger::Result<()> {
        let size = ledger.tree_size()?;
        if size > self.read_to {
            self.refresh_heads(ledger, size)?;
        }
        if catalog && self.catalog_at != Some(size) {
            let live = catalog_entries(ledger)?;
            let mut updates: Vec<(String, Option<Vec<u8>>)> = self
                .catalog
                .live
                .keys()
                .filter(|k| !live.contains_key(*k))
                .map(|k| (k.clone(), None))
                .collect();
            updates.extend(live.into_iter().map(|(k, v)| (k, Some(v))));
            self.catalog.apply(updates);
            self.catalog_at = Some(size);
        }
        Ok(())
    }

    fn refresh_heads(&mut self, ledger: &Ledger, size: u64) -> meshnode_ledger::Result<()> {
        let mut updates = HashMap::new();
        let mut second_branch = false;
        while self.read_to < size {
            let records = ledger.records_since(self.read_to, RECORDS_PER_READ)?;
            if records.is_empty() {
                break;
            }
            self.read_to += records.len() as u64;
            for r in records {
                let seq = self.seqs.entry(r.author).or_insert(0);
                if r.seq <= *seq {
                    second_branch = true;
                    continue;
                }
                *seq = r.seq;
                let mut v = Vec::with_capacity(HEAD_BYTES);
                v.extend_from_slice(&r.seq.to_be_bytes());
                v.extend_from_slice(r.id.as_bytes());
                v.extend_from_slice(r.envelope.as_bytes());
                updates.insert(r.author.to_hex(), Some(v));
            }
        }
        if second_branch || self.forks > 0 {
            let forks = ledger.forks()?;
            self.forks = forks.len();
            for proof in forks {
                let [a, b] = proof.ids();
                let (lo, hi) = if a.as_bytes() <= b.as_bytes() {
                    (a, b)
                } else {
                    (b, a)
                };
                let mut v = Vec::with_capacity(HEAD_BYTES);
                v.extend_from_slice(&proof.seq.to_be_bytes());
                v.extend_from_slice(lo.as_bytes());
                v.extend_from_slice(hi.as_bytes());
                updates.insert(format!("{FORK_PREFIX}{}", proof.author.to_hex()), Some(v));
            }
        }
        updates.insert(
            SIZE_KEY.to_string(),
            Some(self.read_to.to_be_bytes().to_vec()),
        );
        self.heads.apply(updates.into_iter().collect());
        Ok(())
    }
}

fn cut(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// The catalog as the ledger has it now.
fn catalog_entries(ledger: &Ledger) -> meshnode_ledger::Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    for s in ledger.skills()? {
        let mut v = Vec::with_capacity(SKILL_FIXED + NAME_MAX);
        v.extend_from_slice(s.author.as_bytes());
        v.extend_from_slice(s.blob.as_bytes());
        v.extend_from_slice(&s.size.to_be_bytes());
        v.extend_from_slice(cut(&s.name, NAME_MAX));
        out.insert(format!("s{}", s.id.to_hex()), v);
    }
    for b in ledger.basins()? {
        let mut v = Vec::with_capacity(72);
        v.extend_from_slice(b.owner.as_bytes());
        v.extend_from_slice(b.head.as_bytes());
        v.extend_from_slice(&b.n_versions.to_be_bytes());
        out.insert(format!("b{}", b.id.to_hex()), v);
    }
    for n in ledger.nodes()? {
        out.insert(
            format!("n{}", n.author.to_hex()),
            cut(&n.addr, ADDR_MAX).to_vec(),
        );
    }
    Ok(out)
}

/// A read-only copy of a peer's document.
pub(crate) struct Replica {
    pub(crate) doc: Automerge,
    pub(crate) state: sync::State,
}

impl Replica {
    pub(crate) fn new() -> Self {
        Self {
            doc: Automerge::new(),
            state: sync::State::new(),
        }
    }

    /// Starts a session: the owner keeps no sync state between sessions, so ours keeps only
    /// what persists across connections (the shared heads; automerge's `State::decode` of
    /// its `encode`). Without it, a replica that ended a session in step would send nothing
    /// the next time (automerge stays quiet while its heads and the owner's last known ones
    /// are unchanged) and never learn the owner's new heads.
    pub(crate) fn new_session(&mut self) {
        self.state = sync::State::decode(&self.state.encode())
            .expect("a sync state decodes from its own encoding");
    }

    /// The next message to the owner, flags stripped (we speak V1 only: a peer never sends
    /// a whole document, notes/sync.md §2.5).
    pub(crate) fn generate(&mut self) -> Option<Vec<u8>> {
        let mut m = self.doc.generate_sync_message(&mut self.state)?;
        m.flags = None;
        Some(m.encode())
    }

    pub(crate) fn heads(&self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
    }
}

/// What a peer's heads document says, against this node's ledger.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeadsHint {
    /// The peer's log size the heads reflect.
    pub(crate) size: u64,
    /// This node holds every head listed (and no fork is listed): it holds every event of
    /// the peer's log below `size`.
    pub(crate) covered: bool,
    /// Σ over authors of how many seqs the peer is ahead of this node.
    pub(crate) behind: u64,
    /// Authors listed.
    pub(crate) authors: u64,
}

/// Reads a heads replica against the ledger. Blocking (one ledger read for all authors).
pub(crate) fn heads_hint(doc: &Automerge, ledger: &Ledger) -> meshnode_ledger::Result<HeadsHint> {
    let mut hint = HeadsHint {
        covered: true,
        ..HeadsHint::default()
    };
    let mut listed: Vec<(AuthorKey, u64)> = Vec::new();
    for item in doc.map_range(ROOT, ..) {
        let ValueRef::Scalar(ScalarValueRef::Bytes(v)) = item.value else {
            continue;
        };
        if item.key == SIZE_KEY {
            hint.size = u64::from_be_bytes(v[..8].try_into().unwrap_or([0; 8]));
            continue;
        }
        if item.key.starts_with(FORK_PREFIX) {
            // Which branches the peer holds past the fork cannot be told from its heads.
            hint.covered = false;
            continue;
        }
        let (Ok(author), Ok(id)) = (
            AuthorKey::from_hex(&item.key),
            EventId::from_slice(&v[8..40]),
        ) else {
            continue;
        };
        let seq = u64::from_be_bytes(v[..8].try_into().unwrap_or([0; 8]));
        if !ledger.has_event(&id) {
            hint.covered = false;
        }
        listed.push((author, seq));
    }
    let authors: Vec<AuthorKey> = listed.iter().map(|(a, _)| *a).collect();
    let ours = ledger.max_seqs(&authors)?;
    hint.authors = listed.len() as u64;
    hint.behind = listed
        .iter()
        .zip(ours)
        .map(|((_, theirs), ours)| theirs.saturating_sub(ours))
        .sum();
    Ok(hint)
}

/// What a peer's catalog lists: entries, and of them the ones whose event this node lacks.
pub(crate) fn catalog_hint(doc: &Automerge, ledger: &Ledger) -> (u64, u64) {
    let (mut n, mut missing) = (0, 0);
    for item in doc.map_range(ROOT, ..) {
        n += 1;
        if let Some(hex) = item.key.strip_prefix(['s', 'b'])
            && let Ok(id) = EventId::from_hex(hex)
            && !ledger.has_event(&id)
        {
            missing += 1;
        }
    }
    (n, missing)
}
