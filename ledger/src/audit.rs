//! Audit: re-verify everything from the blobs alone (signatures, chains, kind rules, balances,
//! supply, the transparency log and its checkpoints), and offline audit bundles.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use meshnode_schemas::{AuthorKey, BlobHash, EventId, Genesis, SignedEvent};
use rayon::prelude::*;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::db;
use crate::error::{Error, Result};
use crate::fold::{Applied, BasinVersion, EventRecord, ForkProof, Lookup, Overlay, Rules, State};
use crate::ledger::Ledger;
use crate::tlog::{self, Frontier, TreeHash};

/// Findings reported at most (the count is always exact).
const FINDINGS_MAX: usize = 200;
/// Envelopes fetched and verified per step.
const AUDIT_CHUNK_EVENTS: usize = 8192;

/// One problem the audit found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable code, e.g. `bad_signature`, `state_mismatch`, `root_mismatch`.
    pub code: String,
    /// What is wrong.
    pub message: String,
}

/// The result of an audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// No findings.
    pub ok: bool,
    /// Events re-verified.
    pub n_events: u64,
    /// Transparency-log size audited.
    pub tree_size: u64,
    /// Recomputed root (hex).
    pub root: String,
    /// The checkpoint the audit checked the root against.
    pub checkpoint: String,
    /// Size of the previous audited checkpoint this one was checked to be consistent with.
    pub previous_size: Option<u64>,
    /// Forks found (each with a verified proof).
    pub n_forks: u64,
    /// Total supply (uncontested mints): a JSON integer, or a decimal string beyond 2^64.
    #[serde(with = "amount_serde")]
    pub supply: u128,
    /// The state digest of the replayed state (hex; equal on every node with the same events).
    pub state_digest: String,
    /// Authors with activity.
    pub n_authors: u64,
    /// Number of findings (all of them; `findings` holds the first 200).
    pub n_findings: u64,
    /// The findings.
    pub findings: Vec<Finding>,
    /// Wall time.
    pub duration_ms: u64,
}

/// A u128 amount in JSON: an integer when it fits 64 bits (what JSON tools read), else a
/// decimal string.
mod amount_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        match u64::try_from(*v) {
            Ok(x) => s.serialize_u64(x),
            Err(_) => s.serialize_str(&v.to_string()),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Amount {
            Number(u64),
            Text(String),
        }
        match Amount::deserialize(d)? {
            Amount::Number(n) => Ok(n.into()),
            Amount::Text(t) => t.parse().map_err(D::Error::custom),
        }
    }
}

/// In-memory lookup built during a replay.
#[derive(Default)]
pub(crate) struct MemLookup {
    events: HashMap<EventId, EventRecord>,
    log: HashMap<(AuthorKey, u64), Vec<EventId>>,
    versions: HashMap<EventId, BasinVersion>,
    /// Envelopes kept in memory (a bundle's); a node's audit reads them from `store` instead,
    /// only when a fork proof needs one.
    envelopes: HashMap<EventId, Vec<u8>>,
    store: Option<meshnode_store::Store>,
    covered_by: HashMap<EventId, Vec<EventId>>,
}

impl Lookup for MemLookup {
    fn event(&self, id: &EventId) -> Result<Option<EventRecord>> {
        Ok(self.events.get(id).cloned())
    }
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Vec<EventId>> {
        let mut ids = self.log.get(&(*author, seq)).cloned().unwrap_or_default();
        ids.sort();
        Ok(ids)
    }
    fn covered_by(&self, credit: &EventId) -> Result<Vec<EventId>> {
        Ok(self.covered_by.get(credit).cloned().unwrap_or_default())
    }
    fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>> {
        Ok(self.versions.get(id).cloned())
    }
    fn envelope(&self, id: &EventId) -> Result<Option<Vec<u8>>> {
        if let Some(e) = self.envelopes.get(id) {
            return Ok(Some(e.clone()));
        }
        match (&self.store, self.events.get(id)) {
            (Some(store), Some(record)) => crate::ledger::read_envelope(store, &record.envelope),
            _ => Ok(None),
        }
    }
}

impl MemLookup {
    pub(crate) fn absorb(&mut self, overlay: Overlay) {
        self.events.extend(overlay.events);
        for (author, seq, id) in overlay.log {
            self.log.entry((author, seq)).or_default().push(id);
        }
        for (credit, ys) in overlay.covered_by {
            self.covered_by.entry(credit).or_default().extend(ys);
        }
        self.versions.extend(overlay.versions);
        // Envelopes are only needed to build fork proofs: kept when there is no store.
        if self.store.is_none() {
            self.envelopes.extend(overlay.envelopes);
        }
    }
}

/// Re-runs the fold over events in acceptance order.
struct Replay {
    rules: Rules,
    state: State,
    mem: MemLookup,
    /// What the current chunk added (moved into `mem` by [`Replay::absorb`]).
    overlay: Overlay,
    /// A failure of this node (not a finding about the events) that ends the audit.
    fatal: Option<Error>,
    frontier: Frontier,
    findings: Vec<Finding>,
    n_findings: u64,
    roots: HashMap<u64, TreeHash>,
    wanted_roots: std::collections::HashSet<u64>,
}

impl Replay {
    fn new(rules: Rules, wanted_roots: impl IntoIterator<Item = u64>) -> Self {
        Self {
            rules,
            state: State::default(),
            mem: MemLookup::default(),
            overlay: Overlay::default(),
            fatal: None,
            frontier: Frontier::default(),
            findings: Vec::new(),
            n_findings: 0,
            // The empty log has a root too: a checkpoint of size 0 (an audit of a new
            // node) is a prefix of every log.
            roots: HashMap::from([(0, tlog::empty_root())]),
            wanted_roots: wanted_roots.into_iter().collect(),
        }
    }

    fn finding(&mut self, code: &str, message: String) {
        self.n_findings += 1;
        if self.findings.len() < FINDINGS_MAX {
            self.findings.push(Finding {
                code: code.to_string(),
                message,
            });
        }
    }

    /// Checks fork proofs given with the events (a bundle's, or the index's) against the
    /// ones the replay derived: each must verify for this network and be exactly the
    /// canonical proof the events give.
    fn check_forks(&mut self, given: &BTreeMap<AuthorKey, ForkProof>) {
        for (author, proof) in given {
            if let Err(e) = proof.verify(&self.rules.net) {
                self.finding(
                    "invalid_fork_proof",
                    format!("fork of {author} at seq {}: {e}", proof.seq),
                );
            }
        }
        let ours = self.state.forks.clone();
        compare(self, "fork", &ours, given);
    }

    /// Moves what the current chunk added into the lookup.
    fn absorb(&mut self) {
        let overlay = std::mem::take(&mut self.overlay);
        self.mem.absorb(overlay);
    }

    fn apply(&mut self, expected: u64, event: &SignedEvent, verified_with: Option<AuthorKey>) {
        let hash = BlobHash::of(&event.envelope);
        match self.state.apply(
            &self.rules,
            &self.mem,
            &mut self.overlay,
            event,
            hash,
            verified_with,
        ) {
            Ok(Applied::Accepted(record)) => {
                if record.index != expected {
                    self.finding(
                        "order_mismatch",
                        format!(
                            "event {} replays at {} not {expected}",
                            event.id, record.index
                        ),
                    );
                }
                self.frontier.push(tlog::leaf_hash(&record.id));
                if self.wanted_roots.contains(&self.frontier.size()) {
                    self.roots
                        .insert(self.frontier.size(), self.frontier.root());
                }
            }
            Ok(Applied::Duplicate(_)) => self.finding(
                "duplicate_leaf",
                format!("event {} appears twice in the log", event.id),
            ),
            Ok(Applied::Waiting(w)) => self.finding(
                "unresolved",
                format!(
                    "event {} (leaf {expected}) was accepted before its {} arrived: {:?}",
                    event.id, w.reason, w.missing
                ),
            ),
            Err(e) if e.is_rejection() => self.finding(
                e.code(),
                format!("event {} (leaf {expected}) breaks a rule: {e}", event.id),
            ),
            Err(e) => {
                if self.fatal.is_none() {
                    self.fatal = Some(e);
                }
            }
        }
    }

    /// Compares the index's record of an event with the replay's (its coverage, chain values
    /// and signing key decide later events' validity). Whether it is contested may change
    /// after it: that is compared with the contested set at the end.
    fn compare_record(&mut self, mut stored: EventRecord) {
        let Some(ours) = self.overlay.events.get(&stored.id) else {
            return;
        };
        let contested = stored.contested;
        stored.contested = ours.contested;
        if *ours != stored {
            stored.contested = contested;
            self.finding(
                "record_mismatch",
                format!(
                    "event {}: the index has {stored:?}, the replay gives {ours:?}",
                    stored.id
                ),
            );
        }
    }

    /// The key each event's log uses now (a rotation inside the chunk makes the fold
    /// re-check that event singly).
    fn keys_for(&self, events: &[SignedEvent]) -> Vec<AuthorKey> {
        events
            .iter()
            .map(|e| {
                let author = e.body.author;
                self.state
                    .authors
                    .get(&author)
                    .map(|a| a.key_at(&author, e.body.seq))
                    .unwrap_or(author)
            })
            .collect()
    }

    /// Invariants of the final state.
    fn check_invariants(&mut self) {
        for (code, message) in self.state.invariant_violations() {
            self.finding(code, message);
        }
        // A credit is covered at most once on a log's unforked prefix (one branch).
        let mut twice = Vec::new();
        for (author, a) in &self.state.authors {
            let last = a.frozen_from.map_or(a.max_seq, |f| f - 1);
            let mut covered = std::collections::HashSet::new();
            for seq in 1..=last {
                for id in self.mem.log.get(&(*author, seq)).into_iter().flatten() {
                    let Some(record) = self.mem.events.get(id) else {
                        continue;
                    };
                    for (credit, _) in &record.covers {
                        if !covered.insert(*credit) {
                            twice.push((*author, *credit));
                        }
                    }
                }
            }
        }
        for (author, credit) in twice {
            self.finding(
                "double_coverage",
                format!("credit {credit} is covered twice on the log of {author}"),
            );
        }
        if self.frontier.size() != self.state.n_events {
            self.finding(
                "count_mismatch",
                format!(
                    "the tree has {} leaves but {} events were accepted",
                    self.frontier.size(),
                    self.state.n_events
                ),
            );
        }
    }

    fn report(
        mut self,
        checkpoint: String,
        previous_size: Option<u64>,
        started: Instant,
    ) -> AuditReport {
        self.check_invariants();
        let n_forks = self.state.forks.len() as u64;
        AuditReport {
            ok: self.n_findings == 0,
            n_events: self.state.n_events,
            tree_size: self.frontier.size(),
            root: hex::encode(self.frontier.root()),
            checkpoint,
            previous_size,
            n_forks,
            supply: self.state.supply,
            state_digest: hex::encode(self.state.digest()),
            n_authors: self.state.authors.len() as u64,
            n_findings: self.n_findings,
            findings: self.findings,
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }
}

fn compare<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    replay: &mut Replay,
    what: &str,
    ours: &BTreeMap<K, V>,
    stored: &BTreeMap<K, V>,
) {
    for (key, value) in ours {
        match stored.get(key) {
            Some(s) if s == value => {}
            Some(s) => replay.finding(
                "state_mismatch",
                format!("{what} {key:?}: index has {s:?}, replay gives {value:?}"),
            ),
            None => replay.finding(
                "state_mismatch",
                format!("{what} {key:?} is missing from the index"),
            ),
        }
    }
    for key in stored.keys() {
        if !ours.contains_key(key) {
            replay.finding(
                "state_mismatch",
                format!("{what} {key:?} is in the index but not in the replay"),
            );
        }
    }
}

/// Reads envelopes (verified by the store), in order.
async fn fetch_envelopes(
    store: meshnode_store::Store,
    hashes: Vec<BlobHash>,
) -> Vec<Result<bytes::Bytes>> {
    store
        .get_many(&hashes, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
        .await
        .into_iter()
        .map(|r| r.map_err(Error::from))
        .collect()
}

/// One chunk of the audit, read, decoded and signature-checked.
struct Prepared {
    findings: Vec<(&'static str, String)>,
    events: Vec<SignedEvent>,
    positions: Vec<u64>,
    verified: Vec<Option<AuthorKey>>,
    /// The index's record of each event (compared with the replay's).
    stored: Vec<EventRecord>,
}

/// The audit's first stage: reads every envelope in acceptance order (writing it to the
/// bundle when exporting), decodes and verifies chunk by chunk, and hands the chunks on.
/// The stored records and leaf ids of the audited snapshot, read a chunk at a time.
struct RecordSource {
    tx: redb::ReadTransaction,
    n_events: u64,
}

impl RecordSource {
    /// Records and leaf ids `[from, from + AUDIT_CHUNK_EVENTS)` (empty past the end).
    fn chunk(&self, from: u64) -> Result<(Vec<EventRecord>, Vec<EventId>)> {
        let to = (from + AUDIT_CHUNK_EVENTS as u64).min(self.n_events);
        if from >= to {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut ids = Vec::with_capacity((to - from) as usize);
        for entry in self.tx.open_table(db::LEAVES)?.range(from..to)? {
            ids.push(EventId::from_bytes(entry?.1.value()));
        }
        let mut records = Vec::with_capacity(ids.len());
        for entry in self.tx.open_table(db::EVENTS)?.range(from..to)? {
            records.push(db::decode::<EventRecord>(entry?.1.value())?);
        }
        if records.len() != ids.len() || ids.len() as u64 != to - from {
            return Err(Error::Corrupt(format!(
                "leaves {from}..{to}: {} leaves but {} event records",
                ids.len(),
                records.len()
            )));
        }
        Ok((records, ids))
    }
}

async fn prepare_chunks(
    store: meshnode_store::Store,
    source: RecordSource,
    keys: HashMap<AuthorKey, crate::fold::AuthorState>,
    mut writer: Option<BufWriter<std::fs::File>>,
    tx: tokio::sync::mpsc::Sender<Prepared>,
) -> Result<()> {
    let keys = std::sync::Arc::new(keys);
    let (mut fetching, mut verifying, mut sending) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for chunk_idx in 0.. {
        let base = (chunk_idx * AUDIT_CHUNK_EVENTS) as u64;
        let (chunk, ids) = source.chunk(base)?;
        if chunk.is_empty() {
            break;
        }
        let hashes: Vec<BlobHash> = chunk.iter().map(|r| r.envelope).collect();
        let t0 = Instant::now();
        let fetched = fetch_envelopes(store.clone(), hashes).await;
        fetching += t0.elapsed();
        let mut findings = Vec::new();
        let mut present = Vec::with_capacity(chunk.len());
        for (offset, (record, bytes)) in chunk.iter().zip(fetched).enumerate() {
            let position = base + offset as u64;
            match bytes {
                Ok(bytes) => {
                    if let Some(w) = writer.as_mut() {
                        w.write_all(&(bytes.len() as u32).to_be_bytes())?;
                        w.write_all(&bytes)?;
                    }
                    present.push((position, bytes));
                }
                Err(e) => findings.push((
                    "envelope_unavailable",
                    format!(
                        "envelope {} of event {} (leaf {position}): {e}",
                        record.envelope, record.id
                    ),
                )),
            }
        }
        let expected: Vec<EventId> = present
            .iter()
            .map(|(position, _)| ids[(*position - base) as usize])
            .collect();
        let keys = keys.clone();
        let chunk_records = chunk;
        let t0 = Instant::now();
        // Decoding (canonical checks) and signatures run on all cores.
        let prepared = tokio::task::spawn_blocking(move || {
            let decoded_all: Vec<(u64, EventId, Result<SignedEvent>)> = present
                .into_par_iter()
                .zip(expected.into_par_iter())
                .map(|((position, bytes), expected)| {
                    (
                        position,
                        expected,
                        SignedEvent::decode(&bytes).map_err(Error::from),
                    )
                })
                .collect();
            let mut events = Vec::with_capacity(decoded_all.len());
            let mut positions = Vec::with_capacity(decoded_all.len());
            for (position, expected, result) in decoded_all {
                match result {
                    Ok(event) if event.id == expected => {
                        events.push(event);
                        positions.push(position);
                    }
                    Ok(event) => findings.push((
                        "id_mismatch",
                        format!(
                            "leaf {position} names {expected} but its envelope is {}",
                            event.id
                        ),
                    )),
                    Err(e) => findings.push((
                        e.code(),
                        format!("envelope of leaf {position} does not decode: {e}"),
                    )),
                }
            }
            let signers: Vec<AuthorKey> = events
                .iter()
                .map(|e| {
                    let author = e.body.author;
                    keys.get(&author)
                        .map(|a| a.key_at(&author, e.body.seq))
                        .unwrap_or(author)
                })
                .collect();
            let verified = verify_all(&events, &signers);
            let mut chunk_records: Vec<Option<EventRecord>> =
                chunk_records.into_iter().map(Some).collect();
            let stored = positions
                .iter()
                .filter_map(|p| chunk_records[(*p - base) as usize].take())
                .collect();
            Prepared {
                findings,
                events,
                positions,
                verified,
                stored,
            }
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
        verifying += t0.elapsed();
        let t0 = Instant::now();
        if tx.send(prepared).await.is_err() {
            return Ok(());
        }
        sending += t0.elapsed();
    }
    tracing::debug!(?fetching, ?verifying, ?sending, "audit reader done");
    if let Some(mut w) = writer {
        w.flush()?;
    }
    Ok(())
}

/// Checks signatures on all cores.
fn verify_all(events: &[SignedEvent], keys: &[AuthorKey]) -> Vec<Option<AuthorKey>> {
    events
        .par_iter()
        .zip(keys.par_iter())
        .map(|(e, k)| e.verify(k).ok().map(|_| *k))
        .collect()
}

/// The files of an offline audit bundle.
mod bundle {
    pub(super) const MANIFEST: &str = "manifest.json";
    pub(super) const GENESIS: &str = "genesis.cbor";
    pub(super) const CHECKPOINT: &str = "checkpoint.txt";
    pub(super) const EVENTS: &str = "events.bin";
    pub(super) const FORKS: &str = "forks.json";
    pub(super) const PROOFS: &str = "proofs.json";
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    net: String,
    origin: String,
    node: String,
    tree_size: u64,
    root: String,
}

#[derive(Serialize, Deserialize)]
struct ForkJson {
    author: String,
    seq: u64,
    signer: String,
    envelopes: [String; 2],
    rotations: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct ProofsJson {
    /// The previous audited checkpoint, if any.
    previous_checkpoint: Option<String>,
    /// Consistency proof from it to this bundle's checkpoint (hex hashes).
    consistency: Vec<String>,
}

impl Ledger {
    /// Audits the ledger from the blobs alone. With `export`, also writes an offline bundle
    /// there (events, fork proofs, checkpoint, consistency proof from the previous audit).
    pub async fn audit(&self, export: Option<&Path>) -> Result<AuditReport> {
        let started = Instant::now();
        // One read transaction for the whole audit: a consistent snapshot, from which the
        // records are streamed chunk by chunk rather than loaded whole.
        let tx = self.db().begin_read()?;
        let (stored, stored_covered_by, checkpoint_sizes, previous) = {
            let stored = db::load_state_in(&tx)?;
            let mut covered_by: BTreeMap<(EventId, EventId), ()> = BTreeMap::new();
            for entry in tx.open_table(db::COVERED_BY)?.iter()? {
                let (c, y) = entry?.0.value();
                covered_by.insert((EventId::from_bytes(c), EventId::from_bytes(y)), ());
            }
            let mut sizes = Vec::new();
            for entry in tx.open_table(db::CHECKPOINTS)?.iter()? {
                let (size, _) = entry?;
                sizes.push(size.value());
            }
            let previous = tx
                .open_table(db::META)?
                .get("last_audit")?
                .and_then(|v| String::from_utf8(v.value().to_vec()).ok());
            (stored, covered_by, sizes, previous)
        };
        let key = self.verifying_key();
        let origin = self.origin().to_string();
        let previous_checkpoint = previous
            .as_deref()
            .and_then(|note| tlog::verify_checkpoint(note, &origin, &key).ok());
        let mut wanted = checkpoint_sizes.clone();
        wanted.push(stored.n_events);
        if let Some(p) = &previous_checkpoint {
            wanted.push(p.size);
        }
        let mut replay = Replay::new(self.rules().clone(), wanted);
        replay.mem.store = Some(self.store().clone());
        replay.mem.events.reserve(stored.n_events as usize);
        replay.mem.log.reserve(stored.n_events as usize);
        let writer = match export {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                Some(BufWriter::new(std::fs::File::create(
                    dir.join(bundle::EVENTS),
                )?))
            }
            None => None,
        };
        // Two stages: a producer reads, decodes and verifies chunk N+1 (on all cores) while
        // the fold applies chunk N. Signatures are checked against the key the stored state
        // says each log used at that seq; where that is wrong (a tampered index), the fold
        // finds the mismatch and checks the signature itself with the key it derived.
        let store = self.store().clone();
        let keys: HashMap<AuthorKey, crate::fold::AuthorState> = stored
            .authors
            .iter()
            .map(|(k, a)| (*k, a.without_credits()))
            .collect();
        let (chunks_tx, mut rx) = tokio::sync::mpsc::channel::<Prepared>(2);
        let source = RecordSource {
            tx,
            n_events: stored.n_events,
        };
        let producer = tokio::spawn(prepare_chunks(store, source, keys, writer, chunks_tx));
        // The fold is CPU work (seconds at a million events): off the async workers, so the
        // node keeps answering requests while it audits.
        let folded = tokio::task::spawn_blocking(move || {
            let (mut waiting, mut folding) = (Duration::ZERO, Duration::ZERO);
            let mut t0 = Instant::now();
            while let Some(chunk) = rx.blocking_recv() {
                waiting += t0.elapsed();
                t0 = Instant::now();
                for (code, message) in chunk.findings {
                    replay.finding(code, message);
                }
                for (((event, position), verified_with), stored) in chunk
                    .events
                    .iter()
                    .zip(chunk.positions)
                    .zip(chunk.verified)
                    .zip(chunk.stored)
                {
                    replay.apply(position, event, verified_with);
                    replay.compare_record(stored);
                }
                replay.absorb();
                folding += t0.elapsed();
                t0 = Instant::now();
            }
            tracing::debug!(?waiting, ?folding, "audit fold done");
            replay
        })
        .await;
        let mut replay = match folded {
            Ok(replay) => replay,
            Err(e) => {
                producer.abort();
                return Err(Error::Unavailable(format!("audit fold stopped: {e}")));
            }
        };
        producer
            .await
            .map_err(|e| Error::Unavailable(format!("audit reader stopped: {e}")))??;
        if let Some(e) = replay.fatal.take() {
            return Err(Error::Unavailable(format!(
                "the audit could not read what it checks: {e}"
            )));
        }
        // Which events covered which credits: the index's table equals the replay's.
        let ours: BTreeMap<(EventId, EventId), ()> = replay
            .mem
            .covered_by
            .iter()
            .flat_map(|(c, ys)| ys.iter().map(move |y| ((*c, *y), ())))
            .collect();
        compare(&mut replay, "covered_by", &ours, &stored_covered_by);
        // Derived tables equal a fresh fold.
        let ours = replay.state.clone();
        if ours.n_events != stored.n_events || ours.supply != stored.supply {
            replay.finding(
                "state_mismatch",
                format!(
                    "index has {} events and supply {}, replay gives {} and {}",
                    stored.n_events, stored.supply, ours.n_events, ours.supply
                ),
            );
        }
        compare(&mut replay, "author", &ours.authors, &stored.authors);
        compare(&mut replay, "skill", &ours.skills, &stored.skills);
        compare(&mut replay, "basin", &ours.basins, &stored.basins);
        compare(
            &mut replay,
            "reputation",
            &ours.reputation,
            &stored.reputation,
        );
        compare(&mut replay, "node", &ours.nodes, &stored.nodes);
        compare(&mut replay, "hosts", &ours.hosts, &stored.hosts);
        replay.check_forks(&stored.forks);
        compare(
            &mut replay,
            "contested",
            &ours.contested.iter().map(|id| (*id, ())).collect(),
            &stored.contested.iter().map(|id| (*id, ())).collect(),
        );
        if ours.digest() != stored.digest() {
            replay.finding(
                "digest_mismatch",
                "the index's state digest differs from the replay's".into(),
            );
        }

        // The transparency log: every stored checkpoint's root equals the recomputed one.
        let notes: Vec<(u64, String)> = {
            let tx = self.db().begin_read()?;
            let table = tx.open_table(db::CHECKPOINTS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (size, note) = entry?;
                out.push((size.value(), note.value().to_string()));
            }
            out
        };
        for (size, note) in &notes {
            match tlog::verify_checkpoint(note, &origin, &key) {
                Ok(cp) => {
                    if cp.size != *size || replay.roots.get(size) != Some(&cp.root) {
                        replay.finding(
                            "root_mismatch",
                            format!("checkpoint at size {size} does not match the recomputed tree"),
                        );
                    }
                }
                Err(e) => {
                    replay.finding("bad_checkpoint", format!("checkpoint at size {size}: {e}"))
                }
            }
        }
        let current = self.checkpoint();
        let mut previous_size = None;
        if let Some(p) = &previous_checkpoint {
            previous_size = Some(p.size);
            if p.size > replay.frontier.size() || replay.roots.get(&p.size) != Some(&p.root) {
                replay.finding(
                    "inconsistent_checkpoint",
                    format!(
                        "the previously audited checkpoint (size {}) is not a prefix of this log",
                        p.size
                    ),
                );
            }
        }
        match tlog::verify_checkpoint(&current, &origin, &key) {
            Ok(cp) if cp.size == replay.frontier.size() && cp.root == replay.frontier.root() => {}
            Ok(cp) if cp.size > replay.frontier.size() => {
                // Events were accepted while the audit ran; it audited a prefix.
            }
            Ok(cp) => replay.finding(
                "root_mismatch",
                format!(
                    "the current checkpoint (size {}) does not match the recomputed tree",
                    cp.size
                ),
            ),
            Err(e) => replay.finding("bad_checkpoint", e.to_string()),
        }
        // The checkpoint of exactly the audited prefix, for the report and the bundle.
        let audited = notes
            .iter()
            .find(|(size, _)| *size == replay.frontier.size())
            .map(|(_, n)| n.clone())
            .unwrap_or(current);

        if let Some(dir) = export {
            let genesis_bytes = self.genesis().encode()?;
            std::fs::write(dir.join(bundle::GENESIS), genesis_bytes)?;
            std::fs::write(dir.join(bundle::CHECKPOINT), &audited)?;
            let manifest = Manifest {
                format: "meshnode-audit-bundle/1".into(),
                net: self.net().to_hex(),
                origin: origin.clone(),
                node: hex::encode(key.as_bytes()),
                tree_size: replay.frontier.size(),
                root: hex::encode(replay.frontier.root()),
            };
            std::fs::write(
                dir.join(bundle::MANIFEST),
                serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Io(e.into()))?,
            )?;
            let forks: Vec<ForkJson> = replay
                .state
                .forks
                .values()
                .map(|p| ForkJson {
                    author: p.author.to_hex(),
                    seq: p.seq,
                    signer: p.signer.to_hex(),
                    envelopes: [hex::encode(&p.envelopes[0]), hex::encode(&p.envelopes[1])],
                    rotations: p.rotations.iter().map(hex::encode).collect(),
                })
                .collect();
            std::fs::write(
                dir.join(bundle::FORKS),
                serde_json::to_vec_pretty(&forks).map_err(|e| Error::Io(e.into()))?,
            )?;
            let proofs = match &previous_checkpoint {
                Some(p) if p.size <= replay.frontier.size() => ProofsJson {
                    previous_checkpoint: previous.clone(),
                    consistency: self
                        .consistency_proof(p.size, Some(replay.frontier.size()))?
                        .1
                        .iter()
                        .map(hex::encode)
                        .collect(),
                },
                _ => ProofsJson {
                    previous_checkpoint: None,
                    consistency: Vec::new(),
                },
            };
            std::fs::write(
                dir.join(bundle::PROOFS),
                serde_json::to_vec_pretty(&proofs).map_err(|e| Error::Io(e.into()))?,
            )?;
        }
        let report = replay.report(audited.clone(), previous_size, started);
        // Only an export (an authorized POST) records the audited checkpoint: a plain audit
        // is a read and writes nothing.
        if report.ok && export.is_some() {
            let tx = db::begin_write(self.db())?;
            tx.open_table(db::META)?
                .insert("last_audit", audited.as_bytes())?;
            tx.commit()?;
        }
        Ok(report)
    }
}

/// What ties an offline bundle to the node the verifier means: a bundle says by itself only
/// that it is self-consistent, since anyone can sign one with a fresh key.
#[derive(Clone, Debug)]
pub enum BundleTrust {
    /// The node key the bundle must be signed by (e.g. from `GET /v1/status` of the node).
    Node(AuthorKey),
    /// A checkpoint (signed note) obtained earlier from the node: the bundle must be signed by
    /// the key that signed it, and its log must contain it (same root at that size).
    Checkpoint(String),
}

/// Verifies an offline audit bundle without a node: checks that it is signed by the node
/// `trust` names, replays every event from genesis with the same rules, recomputes the
/// transparency-log root, checks the checkpoint signature, the fork proofs, and the
/// consistency proof from the previous audited checkpoint. Returns the report and the node
/// key it was checked against.
pub fn verify_bundle(dir: &Path, trust: &BundleTrust) -> Result<(AuditReport, AuthorKey)> {
    let started = Instant::now();
    let read = |name: &str| std::fs::read(dir.join(name));
    let manifest: Manifest = serde_json::from_slice(&read(bundle::MANIFEST)?)
        .map_err(|e| Error::Invalid(format!("{}: {e}", bundle::MANIFEST)))?;
    let genesis_bytes = read(bundle::GENESIS)?;
    let genesis = Genesis::decode(&genesis_bytes)?;
    let net = BlobHash::of(&genesis_bytes);
    if net.to_hex() != manifest.net {
        return Err(Error::Invalid(
            "genesis does not hash to the manifest's net".into(),
        ));
    }
    let node = AuthorKey::from_hex(&manifest.node)?;
    let key = node.verifying_key()?;
    // The checkpoint's origin names the network and the node: a log of another network
    // signed by the same key is not this one.
    let origin = format!("meshnode/{}/{}", manifest.net, node.to_hex());
    if manifest.origin != origin {
        return Err(Error::Invalid(format!(
            "the bundle's origin `{}` is not `{origin}` (its network and node)",
            manifest.origin
        )));
    }
    let expected = match trust {
        BundleTrust::Node(expected) if *expected != node => {
            return Err(Error::Invalid(format!(
                "the bundle is signed by node {node}, not by the expected node {expected}"
            )));
        }
        BundleTrust::Node(_) => None,
        BundleTrust::Checkpoint(note) => Some(
            tlog::verify_checkpoint(note, &manifest.origin, &key).map_err(|e| {
                Error::Invalid(format!(
                    "the expected checkpoint is not signed by the bundle's node {node} for \
                     origin {}: {e}",
                    manifest.origin
                ))
            })?,
        ),
    };
    let note = String::from_utf8(read(bundle::CHECKPOINT)?)
        .map_err(|_| Error::Invalid("checkpoint is not UTF-8".into()))?;
    let fork_json: Vec<ForkJson> = serde_json::from_slice(&read(bundle::FORKS)?)
        .map_err(|e| Error::Invalid(format!("{}: {e}", bundle::FORKS)))?;
    let mut forks = BTreeMap::new();
    for f in fork_json {
        let hexes = |s: &str| hex::decode(s).map_err(|e| Error::Invalid(format!("fork: {e}")));
        let author = AuthorKey::from_hex(&f.author)?;
        forks.insert(
            author,
            ForkProof {
                author,
                seq: f.seq,
                signer: AuthorKey::from_hex(&f.signer)?,
                envelopes: [hexes(&f.envelopes[0])?, hexes(&f.envelopes[1])?],
                rotations: f
                    .rotations
                    .iter()
                    .map(|r| hexes(r))
                    .collect::<Result<_>>()?,
            },
        );
    }
    let proofs: ProofsJson = serde_json::from_slice(&read(bundle::PROOFS)?)
        .map_err(|e| Error::Invalid(format!("{}: {e}", bundle::PROOFS)))?;
    let previous = match &proofs.previous_checkpoint {
        Some(n) => Some(tlog::verify_checkpoint(n, &manifest.origin, &key)?),
        None => None,
    };
    let mut wanted = vec![manifest.tree_size];
    if let Some(p) = &previous {
        wanted.push(p.size);
    }
    if let Some(e) = &expected {
        wanted.push(e.size);
    }
    let mut replay = Replay::new(Rules { genesis, net }, wanted);
    let mut reader = BufReader::new(std::fs::File::open(dir.join(bundle::EVENTS))?);
    let mut position = 0u64;
    let mut chunk: Vec<SignedEvent> = Vec::new();
    let flush = |replay: &mut Replay, chunk: &mut Vec<SignedEvent>, position: &mut u64| {
        let keys = replay.keys_for(chunk);
        let verified = verify_all(chunk, &keys);
        for (event, v) in chunk.drain(..).zip(verified) {
            replay.apply(*position, &event, v);
            *position += 1;
        }
        replay.absorb();
    };
    loop {
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > meshnode_schemas::limits::EVENT_BYTES_MAX {
            return Err(Error::Invalid(format!("event {position} is {len} bytes")));
        }
        let mut bytes = vec![0u8; len];
        reader.read_exact(&mut bytes)?;
        match SignedEvent::decode(&bytes) {
            Ok(event) => chunk.push(event),
            Err(e) => {
                flush(&mut replay, &mut chunk, &mut position);
                replay.finding(e.code(), format!("event {position} does not decode: {e}"));
                position += 1;
            }
        }
        if chunk.len() >= AUDIT_CHUNK_EVENTS {
            flush(&mut replay, &mut chunk, &mut position);
        }
    }
    flush(&mut replay, &mut chunk, &mut position);
    replay.check_forks(&forks);
    match tlog::verify_checkpoint(&note, &manifest.origin, &key) {
        Ok(cp) if cp.size == replay.frontier.size() && cp.root == replay.frontier.root() => {}
        Ok(cp) => replay.finding(
            "root_mismatch",
            format!(
                "checkpoint says size {} root {}, the events give size {} root {}",
                cp.size,
                hex::encode(cp.root),
                replay.frontier.size(),
                hex::encode(replay.frontier.root())
            ),
        ),
        Err(e) => replay.finding("bad_checkpoint", e.to_string()),
    }
    let mut previous_size = None;
    if let Some(p) = previous {
        previous_size = Some(p.size);
        let path: Vec<TreeHash> = proofs
            .consistency
            .iter()
            .filter_map(|h| hex::decode(h).ok()?.try_into().ok())
            .collect();
        if !tlog::verify_consistency(
            p.size,
            replay.frontier.size(),
            &p.root,
            &replay.frontier.root(),
            &path,
        ) || replay.roots.get(&p.size) != Some(&p.root)
        {
            replay.finding(
                "inconsistent_checkpoint",
                format!(
                    "the previous checkpoint (size {}) is not consistent with this one",
                    p.size
                ),
            );
        }
    }
    if let Some(e) = expected
        && replay.roots.get(&e.size) != Some(&e.root)
    {
        replay.finding(
            "inconsistent_checkpoint",
            format!(
                "the expected checkpoint (size {}) is not a prefix of the bundle's log",
                e.size
            ),
        );
    }
    Ok((replay.report(note, previous_size, started), node))
}
