//! The ledger service: batched ingest with group commit, pending events, queries over the
//! committed index, the event feed and GC roots.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshnode_schemas::{AuthorKey, BlobHash, EventId, Genesis, SignedEvent, SigningKey, author_of};
use meshnode_store::{GcRoots, Store};
use rayon::prelude::*;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::db::{self, DbView};
use crate::error::{Error, Result, Waiting, reject};
use crate::fold::{
    Applied, AuthorState, BasinState, BasinVersion, EventRecord, ForkProof, Layered, NodeState,
    Overlay, ReputationState, Rules, SkillState, State,
};
use crate::tlog::{self, Checkpoint, Frontier, TreeHash};

/// Most events applied in one batch (one transaction, one fsync).
pub const BATCH_EVENTS_MAX: usize = 4096;
/// Submissions queued for the worker; submitters wait for room beyond this.
pub const QUEUE_EVENTS_MAX: usize = 16_384;
/// Most events waiting for their prev or deps.
pub const PENDING_EVENTS_MAX: usize = 10_000;
/// Envelope writes to the blob store in flight at once during a commit.
const STORE_ADDS_IN_FLIGHT: usize = 64;

/// Accepted events buffered for slow feed subscribers (they then catch up with
/// [`Ledger::events_since`]).
pub const FEED_CAPACITY: usize = 4096;

/// Ledger settings.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// How long an event may wait for its prev or deps before it is dropped as unresolved.
    pub pending_ttl: Duration,
    /// Most events waiting at once.
    pub pending_max: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            pending_ttl: Duration::from_secs(600),
            pending_max: PENDING_EVENTS_MAX,
        }
    }
}

/// The outcome of a submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Accepted now (durable).
    Accepted,
    /// Accepted before; nothing changed.
    Duplicate,
    /// Stored and waiting (bounded in count and time) for its prev or deps.
    Pending(Waiting),
}

/// What a submission answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// EventId.
    pub id: EventId,
    /// BlobHash of the envelope.
    pub blob: BlobHash,
    /// The event's seq.
    pub seq: u64,
    /// Transparency-log index, once accepted.
    pub index: Option<u64>,
    /// Outcome.
    pub status: Status,
}

/// An accepted event as published on the feed.
#[derive(Debug)]
pub struct Accepted {
    /// Its record (index = transparency-log position).
    pub record: EventRecord,
    /// The decoded event.
    pub event: Arc<SignedEvent>,
}

/// An account as answered by `GET /v1/accounts/{key}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// The key.
    pub key: AuthorKey,
    /// Spendable balance: uncontested credits received minus sent.
    pub balance: i128,
    /// Credits received (contested included).
    pub received: u64,
    /// Of which contested (unspendable).
    pub received_contested: u64,
    /// Sent.
    pub sent: u64,
    /// Minted (issuers).
    pub minted: u64,
    /// Credits not yet in the causal past of the log; name them in `deps` to spend them.
    pub unreferenced_credits: Vec<EventId>,
    /// Head of the log.
    pub head_seq: u64,
    /// Head event.
    pub head_id: Option<EventId>,
    /// Key that signs the next event.
    pub signing_key: AuthorKey,
    /// First forked seq, if the log is frozen.
    pub frozen_from: Option<u64>,
    /// Reputation score.
    pub reputation: i64,
}

struct Job {
    event: Arc<SignedEvent>,
    reply: Option<oneshot::Sender<Result<Submitted>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum WaitKey {
    Event(EventId),
    Seq(AuthorKey, u64),
}

struct PendingEntry {
    event: Arc<SignedEvent>,
    since: Instant,
    keys: Vec<WaitKey>,
}

#[derive(Default)]
struct Pending {
    entries: HashMap<EventId, PendingEntry>,
    waiters: HashMap<WaitKey, Vec<EventId>>,
}

impl Pending {
    fn insert(&mut self, event: Arc<SignedEvent>, waiting: &Waiting) {
        let mut keys: Vec<WaitKey> = waiting
            .missing
            .iter()
            .map(|id| WaitKey::Event(*id))
            .collect();
        if waiting.reason == "seq_gap" {
            keys = vec![WaitKey::Seq(event.body.author, event.body.seq - 1)];
        }
        for key in &keys {
            self.waiters.entry(*key).or_default().push(event.id);
        }
        self.entries.insert(
            event.id,
            PendingEntry {
                event,
                since: Instant::now(),
                keys,
            },
        );
    }

    fn remove(&mut self, id: &EventId) -> Option<PendingEntry> {
        let entry = self.entries.remove(id)?;
        for key in &entry.keys {
            if let Some(list) = self.waiters.get_mut(key) {
                list.retain(|x| x != id);
                if list.is_empty() {
                    self.waiters.remove(key);
                }
            }
        }
        Some(entry)
    }

    /// Pending events that may now apply because `record` was accepted.
    fn woken_by(&mut self, record: &EventRecord) -> Vec<PendingEntry> {
        let mut ids = Vec::new();
        for key in [
            WaitKey::Event(record.id),
            WaitKey::Seq(record.author, record.seq),
        ] {
            if let Some(list) = self.waiters.get(&key) {
                ids.extend(list.iter().copied());
            }
        }
        ids.into_iter().filter_map(|id| self.remove(&id)).collect()
    }
}

struct Shared {
    db: Database,
    store: Store,
    rules: Rules,
    key: SigningKey,
    node: AuthorKey,
    origin: String,
    checkpoint: RwLock<String>,
    /// EventId → leaf index of every committed event (the `events` table is keyed by leaf).
    ids: RwLock<db::EventIds>,
    feed: broadcast::Sender<Arc<Accepted>>,
    fork_feed: broadcast::Sender<ForkProof>,
    tx: mpsc::Sender<Job>,
    n_pending: Mutex<usize>,
    dir: PathBuf,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The answer to one queued submission ([`Ledger::enqueue_many`]).
#[derive(Debug)]
pub struct Receipt(Result<oneshot::Receiver<Result<Submitted>>>);

impl Receipt {
    /// Waits until the event is durably accepted, known as a duplicate, pending or rejected.
    pub async fn wait(self) -> Result<Submitted> {
        match self.0 {
            Ok(wait) => wait
                .await
                .unwrap_or_else(|_| Err(Error::Unavailable("ledger worker stopped".into()))),
            Err(e) => Err(e),
        }
    }
}

/// The ledger of one node. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads an envelope blob synchronously (from a blocking thread).
fn read_envelope(store: &Store, hash: &BlobHash) -> Result<Option<Vec<u8>>> {
    let handle = tokio::runtime::Handle::current();
    match handle.block_on(store.get_bytes(hash, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)) {
        Ok(bytes) => Ok(Some(bytes.to_vec())),
        Err(meshnode_store::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

struct Worker {
    shared: Arc<Shared>,
    state: State,
    frontier: Frontier,
    pending: Pending,
    config: LedgerConfig,
    /// The batch whose commit is running, if any.
    in_flight: Option<InFlight>,
}

/// Outcome of applying one job inside a batch.
enum Outcome {
    Accepted(EventRecord),
    Duplicate(EventRecord),
    Pending(Waiting, BlobHash),
    Rejected(Error),
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, over `store`, for the network of `genesis`
    /// (whose hash is `net`), signing checkpoints with `key`. Reloads pending events.
    pub async fn open(
        dir: &Path,
        store: Store,
        genesis: Genesis,
        net: BlobHash,
        key: SigningKey,
        config: LedgerConfig,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ledger.redb");
        let database = tokio::task::spawn_blocking(move || db::open(&path))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))??;
        let node = author_of(&key);
        let origin = format!("meshnode/{net}/{node}");
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS_MAX);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let (fork_feed, _) = broadcast::channel(FEED_CAPACITY);
        let shared = Arc::new(Shared {
            db: database,
            store,
            rules: Rules { genesis, net },
            key,
            node,
            origin,
            checkpoint: RwLock::new(String::new()),
            ids: RwLock::new(db::EventIds::new()),
            feed,
            fork_feed,
            tx,
            n_pending: Mutex::new(0),
            dir: dir.to_path_buf(),
            stop: Mutex::new(None),
            worker: Mutex::new(None),
        });
        let load = shared.clone();
        let (state, frontier, pending_rows) = tokio::task::spawn_blocking(move || {
            let state = db::load_state(&load.db)?;
            let tx = load.db.begin_read()?;
            let ids = db::load_ids(&tx, state.n_events)?;
            let noop = |_: &BlobHash| Ok(None);
            let view = DbView::new(&tx, &ids, &noop)?;
            let frontier = Frontier::load(&view, state.n_events)?;
            drop(view);
            *load
                .ids
                .write()
                .expect("invariant: id map lock is never poisoned") = ids;
            let mut rows = Vec::new();
            for entry in tx.open_table(db::PENDING)?.iter()? {
                let (k, v) = entry?;
                let (blob, since) = v.value();
                rows.push((
                    EventId::from_bytes(k.value()),
                    BlobHash::from_bytes(blob),
                    since,
                ));
            }
            Ok::<_, Error>((state, frontier, rows))
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))??;
        let ledger = Ledger {
            shared: shared.clone(),
        };
        ledger.publish_checkpoint(&frontier)?;
        ledger.shared.store.add_gc_roots(Arc::new(LedgerRoots {
            shared: Arc::downgrade(&shared),
        }));
        let mut worker = Worker {
            shared,
            state,
            frontier,
            pending: Pending::default(),
            config,
            in_flight: None,
        };
        // Events that were waiting when the node stopped wait again.
        let mut reloaded = Vec::new();
        for (id, blob, since_ms) in pending_rows {
            match ledger
                .shared
                .store
                .get_bytes(&blob, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
                .await
            {
                Ok(bytes) => match SignedEvent::decode(&bytes) {
                    Ok(event) if event.id == id => reloaded.push((Arc::new(event), blob, since_ms)),
                    _ => tracing::warn!(%id, "dropping an unreadable pending event"),
                },
                Err(e) => tracing::warn!(%id, "pending event envelope unavailable: {e}"),
            }
        }
        for (event, _blob, _since_ms) in reloaded {
            let waiting = Waiting {
                reason: "reloaded",
                missing: event.body.deps.clone(),
            };
            worker.pending.insert(event, &waiting);
        }
        *ledger
            .shared
            .n_pending
            .lock()
            .expect("invariant: pending counter lock is never poisoned") =
            worker.pending.entries.len();
        let retry: Vec<Job> = worker
            .pending
            .entries
            .keys()
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|id| worker.pending.remove(&id))
            .map(|entry| Job {
                event: entry.event,
                reply: None,
            })
            .collect();
        let (stop_tx, stop_rx) = oneshot::channel();
        let handle = tokio::spawn(worker.run(rx, stop_rx, retry));
        *ledger
            .shared
            .stop
            .lock()
            .expect("invariant: stop lock is never poisoned") = Some(stop_tx);
        *ledger
            .shared
            .worker
            .lock()
            .expect("invariant: worker lock is never poisoned") = Some(handle);
        Ok(ledger)
    }

    /// Stops the worker after the batch in progress. Submissions fail afterwards.
    pub async fn shutdown(&self) {
        let stop = self
            .shared
            .stop
            .lock()
            .expect("invariant: stop lock is never poisoned")
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let handle = self
            .shared
            .worker
            .lock()
            .expect("invariant: worker lock is never poisoned")
            .take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    fn publish_checkpoint(&self, frontier: &Frontier) -> Result<()> {
        let note = tlog::sign_checkpoint(
            &Checkpoint {
                origin: self.shared.origin.clone(),
                size: frontier.size(),
                root: frontier.root(),
            },
            &self.shared.origin,
            &self.shared.key,
        );
        *self
            .shared
            .checkpoint
            .write()
            .expect("invariant: checkpoint lock is never poisoned") = note;
        Ok(())
    }

    /// Submits one envelope. Returns once the event is durably accepted, known as a
    /// duplicate, or stored as pending; rejections come back as [`Error::Rejected`] with the
    /// rule's code, and nothing changed.
    pub async fn submit(&self, envelope: Bytes) -> Result<Submitted> {
        let event = SignedEvent::decode(&envelope)?;
        if let Some(record) = self.event_record(&event.id)? {
            return Ok(Submitted {
                id: record.id,
                blob: record.envelope,
                seq: record.seq,
                index: Some(record.index),
                status: Status::Duplicate,
            });
        }
        let (reply, wait) = oneshot::channel();
        self.shared
            .tx
            .send(Job {
                event: Arc::new(event),
                reply: Some(reply),
            })
            .await
            .map_err(|_| Error::Unavailable("ledger worker stopped".into()))?;
        wait.await
            .map_err(|_| Error::Unavailable("ledger worker stopped".into()))?
    }

    /// Submits many envelopes at once (import, benchmarks); results in the same order.
    pub async fn submit_many(&self, envelopes: Vec<Bytes>) -> Vec<Result<Submitted>> {
        let receipts = self.enqueue_many(envelopes).await;
        let mut out = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            out.push(receipt.wait().await);
        }
        out
    }

    /// Queues many envelopes in order (waiting for room in the queue) and returns without
    /// waiting for them to commit; each [`Receipt`] resolves when its event's batch is
    /// durable. Callers that keep the queue full this way let the worker apply one batch
    /// while the previous one commits.
    pub async fn enqueue_many(&self, envelopes: Vec<Bytes>) -> Vec<Receipt> {
        // Decoding (canonical checks) is CPU work: spread it over the cores.
        let decoded: Vec<Result<SignedEvent>> = tokio::task::spawn_blocking(move || {
            envelopes
                .par_iter()
                .map(|e| SignedEvent::decode(e).map_err(Error::from))
                .collect()
        })
        .await
        .unwrap_or_default();
        let mut waits = Vec::with_capacity(decoded.len());
        for event in decoded {
            match event {
                Ok(event) => {
                    let (reply, wait) = oneshot::channel();
                    if self
                        .shared
                        .tx
                        .send(Job {
                            event: Arc::new(event),
                            reply: Some(reply),
                        })
                        .await
                        .is_err()
                    {
                        waits.push(Err(Error::Unavailable("ledger worker stopped".into())));
                    } else {
                        waits.push(Ok(wait));
                    }
                }
                Err(e) => waits.push(Err(e)),
            }
        }
        waits.into_iter().map(Receipt).collect()
    }

    /// Subscribes to accepted events (bounded; a lagging subscriber catches up with
    /// [`Ledger::events_since`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Accepted>> {
        self.shared.feed.subscribe()
    }

    /// Subscribes to detected forks (bounded; [`Ledger::forks`] lists them all).
    pub fn subscribe_forks(&self) -> broadcast::Receiver<ForkProof> {
        self.shared.fork_feed.subscribe()
    }

    /// The network rules (genesis and net).
    pub fn genesis(&self) -> &Genesis {
        &self.shared.rules.genesis
    }

    /// The network id.
    pub fn net(&self) -> BlobHash {
        self.shared.rules.net
    }

    /// The transparency log's origin line (also the checkpoint signer name).
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// The node key that signs checkpoints.
    pub fn node(&self) -> AuthorKey {
        self.shared.node
    }

    /// Number of events waiting for prev or deps.
    pub fn n_pending(&self) -> usize {
        *self
            .shared
            .n_pending
            .lock()
            .expect("invariant: pending counter lock is never poisoned")
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        Ok(self.shared.db.begin_read()?)
    }

    /// Committed number of accepted events (= transparency-log size).
    pub fn tree_size(&self) -> Result<u64> {
        let tx = self.read()?;
        let meta = tx.open_table(db::META)?;
        Ok(match meta.get("n_events")? {
            Some(v) => u64::from_le_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| Error::Corrupt("n_events is not 8 bytes".into()))?,
            ),
            None => 0,
        })
    }

    /// The record of an accepted event.
    pub fn event_record(&self, id: &EventId) -> Result<Option<EventRecord>> {
        // The map first: an id in it is committed, so a transaction begun after sees it.
        let Some(index) = self.ids().get(id).copied() else {
            return Ok(None);
        };
        let tx = self.read()?;
        let table = tx.open_table(db::EVENTS)?;
        match table.get(index)? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Err(Error::Corrupt(format!(
                "event {id} is leaf {index} but has no record"
            ))),
        }
    }

    fn ids(&self) -> std::sync::RwLockReadGuard<'_, db::EventIds> {
        self.shared
            .ids
            .read()
            .expect("invariant: id map lock is never poisoned")
    }

    /// An accepted event with its decoded envelope.
    pub async fn event(&self, id: &EventId) -> Result<Option<(EventRecord, SignedEvent)>> {
        let Some(record) = self.event_record(id)? else {
            return Ok(None);
        };
        let bytes = self
            .shared
            .store
            .get_bytes(
                &record.envelope,
                meshnode_schemas::limits::EVENT_BYTES_MAX as u64,
            )
            .await?;
        Ok(Some((record, SignedEvent::decode(&bytes)?)))
    }

    /// Accepted events in acceptance order from leaf `start`, at most `limit`.
    pub async fn events_since(
        &self,
        start: u64,
        limit: usize,
    ) -> Result<Vec<(EventRecord, SignedEvent)>> {
        let records: Vec<EventRecord> = {
            let tx = self.read()?;
            let events = tx.open_table(db::EVENTS)?;
            let mut out = Vec::new();
            for entry in events.range(start..)?.take(limit) {
                out.push(db::decode(entry?.1.value())?);
            }
            out
        };
        let hashes: Vec<BlobHash> = records.iter().map(|r| r.envelope).collect();
        let envelopes = self
            .shared
            .store
            .get_many(&hashes, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
            .await;
        let mut out = Vec::with_capacity(records.len());
        for (record, bytes) in records.into_iter().zip(envelopes) {
            let event = SignedEvent::decode(&bytes?)?;
            out.push((record, event));
        }
        Ok(out)
    }

    /// An author's log from `after_seq` (exclusive), at most `limit` records.
    pub fn log(
        &self,
        author: &AuthorKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>> {
        let ids = self.ids();
        let tx = self.read()?;
        let log = tx.open_table(db::LOG)?;
        let events = tx.open_table(db::EVENTS)?;
        let mut out = Vec::new();
        let key = *author.as_bytes();
        for entry in log
            .range((key, after_seq + 1)..=(key, u64::MAX))?
            .take(limit)
        {
            let (_, id) = entry?;
            let v = ids
                .get(&EventId::from_bytes(id.value()))
                .map(|index| events.get(*index))
                .transpose()?
                .flatten()
                .ok_or_else(|| Error::Corrupt("log entry without event".into()))?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'static, [u8; 32], &'static [u8]>,
        key: &[u8; 32],
    ) -> Result<Option<T>> {
        let tx = self.read()?;
        let t = tx.open_table(table)?;
        match t.get(*key)? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn all_state<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'static, [u8; 32], &'static [u8]>,
    ) -> Result<Vec<T>> {
        let tx = self.read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// An account (every key has one; unknown keys have zero balances).
    pub fn account(&self, key: &AuthorKey) -> Result<Account> {
        let mut state: AuthorState = self
            .get_state(db::AUTHORS, key.as_bytes())?
            .unwrap_or_default();
        {
            let tx = self.read()?;
            let table = tx.open_table(db::UNCOVERED)?;
            let k = *key.as_bytes();
            for entry in table.range((k, [0u8; 32])..=(k, [0xffu8; 32]))? {
                let (credit, _) = entry?;
                state
                    .uncovered
                    .insert(EventId::from_bytes(credit.value().1));
            }
        }
        let reputation: ReputationState = self
            .get_state(db::REPUTATION, key.as_bytes())?
            .unwrap_or_default();
        Ok(Account {
            key: *key,
            balance: state.balance(),
            received: state.received,
            received_contested: state.received_contested,
            sent: state.sent,
            minted: state.minted,
            unreferenced_credits: state.uncovered.iter().copied().collect(),
            head_seq: state.head_seq,
            head_id: state.head_id,
            signing_key: state.key_at(key, state.head_seq + 1),
            frozen_from: state.frozen_from,
            reputation: reputation.score,
        })
    }

    /// Every account with activity, in key order.
    pub fn accounts(&self) -> Result<Vec<(AuthorKey, AuthorState)>> {
        let tx = self.read()?;
        let t = tx.open_table(db::AUTHORS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((AuthorKey::from_bytes(k.value()), db::decode(v.value())?));
        }
        Ok(out)
    }

    /// Total supply (sum of mints).
    pub fn supply(&self) -> Result<u64> {
        let tx = self.read()?;
        let meta = tx.open_table(db::META)?;
        Ok(match meta.get("supply")? {
            Some(v) => u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])),
            None => 0,
        })
    }

    /// Detected forks with their proofs.
    pub fn forks(&self) -> Result<Vec<ForkProof>> {
        let tx = self.read()?;
        let t = tx.open_table(db::FORKS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// The skill catalog.
    pub fn skills(&self) -> Result<Vec<SkillState>> {
        self.all_state(db::SKILLS)
    }

    /// Hosts of a blob.
    pub fn hosts(&self, blob: &BlobHash) -> Result<Vec<AuthorKey>> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::HOSTS)?;
        let from = (*blob.as_bytes(), [0u8; 32]);
        let to = (*blob.as_bytes(), [0xffu8; 32]);
        let mut out = Vec::new();
        for entry in table.range(from..=to)? {
            out.push(AuthorKey::from_bytes(entry?.0.value().1));
        }
        Ok(out)
    }

    /// Basins.
    pub fn basins(&self) -> Result<Vec<BasinState>> {
        self.all_state(db::BASINS)
    }

    /// A basin by its publish event.
    pub fn basin(&self, id: &EventId) -> Result<Option<BasinState>> {
        self.get_state(db::BASINS, id.as_bytes())
    }

    /// A basin's versions in acceptance order.
    pub fn basin_history(&self, id: &EventId) -> Result<Vec<BasinVersion>> {
        let tx = self.read()?;
        let history = tx.open_table(db::BASIN_HISTORY)?;
        let versions = tx.open_table(db::VERSIONS)?;
        let key = *id.as_bytes();
        let mut out = Vec::new();
        for entry in history.range((key, 0)..=(key, u64::MAX))? {
            let (_, vid) = entry?;
            let v = versions
                .get(vid.value())?
                .ok_or_else(|| Error::Corrupt("history entry without version".into()))?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// Reputation scores.
    pub fn reputation(&self) -> Result<Vec<(AuthorKey, ReputationState)>> {
        let tx = self.read()?;
        let t = tx.open_table(db::REPUTATION)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((AuthorKey::from_bytes(k.value()), db::decode(v.value())?));
        }
        Ok(out)
    }

    /// The node registry.
    pub fn nodes(&self) -> Result<Vec<NodeState>> {
        self.all_state(db::NODES)
    }

    /// The latest signed checkpoint (C2SP signed note).
    pub fn checkpoint(&self) -> String {
        self.shared
            .checkpoint
            .read()
            .expect("invariant: checkpoint lock is never poisoned")
            .clone()
    }

    fn with_view<T>(
        &self,
        f: impl FnOnce(&DbView<'_, fn(&BlobHash) -> Result<Option<Vec<u8>>>>, u64) -> Result<T>,
    ) -> Result<T> {
        let tx = self.read()?;
        let size = {
            let meta = tx.open_table(db::META)?;
            match meta.get("n_events")? {
                Some(v) => u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])),
                None => 0,
            }
        };
        let noop: fn(&BlobHash) -> Result<Option<Vec<u8>>> = |_| Ok(None);
        let ids = self.ids();
        let view = DbView::new(&tx, &ids, &noop)?;
        f(&view, size)
    }

    /// The root of the tree of the first `size` events.
    pub fn root(&self, size: u64) -> Result<TreeHash> {
        self.with_view(|view, committed| {
            if size > committed {
                return Err(Error::Invalid(format!(
                    "tree size {size} is larger than the log ({committed})"
                )));
            }
            tlog::root(view, size)
        })
    }

    /// An inclusion proof of event `id` in the tree of `tree_size` leaves (default: the
    /// committed size). Returns (leaf index, tree size, path).
    pub fn inclusion_proof(
        &self,
        id: &EventId,
        tree_size: Option<u64>,
    ) -> Result<(u64, u64, Vec<TreeHash>)> {
        let record = self
            .event_record(id)?
            .ok_or_else(|| Error::NotFound(format!("event {id}")))?;
        self.with_view(|view, committed| {
            let size = tree_size.unwrap_or(committed);
            if size > committed {
                return Err(Error::Invalid(format!(
                    "tree_size {size} is larger than the log ({committed})"
                )));
            }
            if record.index >= size {
                return Err(Error::Invalid(format!(
                    "event {id} is leaf {}, not in a tree of size {size}",
                    record.index
                )));
            }
            Ok((
                record.index,
                size,
                tlog::inclusion_path(view, record.index, size)?,
            ))
        })
    }

    /// A consistency proof between tree sizes `from` and `to` (default: committed size).
    pub fn consistency_proof(&self, from: u64, to: Option<u64>) -> Result<(u64, Vec<TreeHash>)> {
        self.with_view(|view, committed| {
            let to = to.unwrap_or(committed);
            if to > committed {
                return Err(Error::Invalid(format!(
                    "to={to} is larger than the log ({committed})"
                )));
            }
            Ok((to, tlog::consistency_path(view, from, to)?))
        })
    }

    /// The database (for the audit).
    pub(crate) fn db(&self) -> &Database {
        &self.shared.db
    }

    /// The store (for the audit).
    pub(crate) fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The rules (for the audit).
    pub(crate) fn rules(&self) -> &Rules {
        &self.shared.rules
    }

    /// The signing key (for the audit's checkpoint).
    pub(crate) fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.shared.key.verifying_key()
    }
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        mut stop: oneshot::Receiver<()>,
        initial: Vec<Job>,
    ) {
        let mut carry = initial;
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut jobs = std::mem::take(&mut carry);
            if jobs.is_empty() && self.in_flight.is_some() {
                // Nothing queued behind the committing batch: land it before waiting.
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => {
                        if let Some(f) = self.in_flight.take()
                            && !self.land(f).await
                        {
                            self.reload().await;
                        }
                        continue;
                    }
                }
            }
            if jobs.is_empty() {
                tokio::select! {
                    _ = &mut stop => return,
                    job = rx.recv() => match job {
                        Some(job) => jobs.push(job),
                        None => return,
                    },
                    _ = sweep.tick() => {
                        self.expire_pending().await;
                        continue;
                    }
                }
            }
            while jobs.len() < BATCH_EVENTS_MAX {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.batch(jobs).await;
        }
    }

    async fn expire_pending(&mut self) {
        let ttl = self.config.pending_ttl;
        let expired: Vec<EventId> = self
            .pending
            .entries
            .iter()
            .filter(|(_, e)| e.since.elapsed() > ttl)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        for id in &expired {
            self.pending.remove(id);
            tracing::info!(%id, "pending event dropped: unresolved after {ttl:?}");
        }
        let shared = self.shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let tx = db::begin_write(&shared.db)?;
            {
                let mut table = tx.open_table(db::PENDING)?;
                for id in &expired {
                    table.remove(*id.as_bytes())?;
                }
            }
            tx.commit()?;
            Ok::<_, Error>(())
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!("could not remove expired pending events from the index");
        }
        self.update_pending_count();
    }

    fn update_pending_count(&self) {
        *self
            .shared
            .n_pending
            .lock()
            .expect("invariant: pending counter lock is never poisoned") =
            self.pending.entries.len();
    }

    /// Verifies and applies one batch in memory on top of the batch still committing (if
    /// any), then lands that one and starts this one's commit. Applying batch N+1 while
    /// batch N's writes reach the disk keeps both cores busy instead of waiting on fsync.
    async fn batch(&mut self, jobs: Vec<Job>) {
        let prev = self
            .in_flight
            .as_ref()
            .map(|f| f.prepared.overlay.clone())
            .unwrap_or_default();
        let prepared = self.prepare(jobs, prev).await;
        let landed = match self.in_flight.take() {
            Some(f) => self.land(f).await,
            None => true,
        };
        match prepared {
            Some(prepared) if landed => self.in_flight = Some(self.start_commit(prepared)),
            Some(prepared) => {
                // It was applied on top of a batch that did not commit.
                for job in prepared.jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(Error::Unavailable(
                            "an earlier batch failed to commit; retry".into(),
                        )));
                    }
                }
                self.reload().await;
            }
            None => self.reload().await,
        }
    }

    /// Verifies signatures (both cores), applies the batch to the in-memory state and encodes
    /// its rows. `None` when applying failed (the jobs' callers see the worker gone).
    async fn prepare(&mut self, jobs: Vec<Job>, prev: Arc<Overlay>) -> Option<Prepared> {
        let t0 = Instant::now();
        // Signatures are the expensive part: check them in parallel against the key each log
        // uses now. The fold re-checks singly when a batch rotates a key.
        let keys: Vec<AuthorKey> = jobs
            .iter()
            .map(|j| {
                let author = j.event.body.author;
                self.state
                    .authors
                    .get(&author)
                    .map(|a| a.key_at(&author, j.event.body.seq))
                    .unwrap_or(author)
            })
            .collect();
        let events: Vec<Arc<SignedEvent>> = jobs.iter().map(|j| j.event.clone()).collect();
        let verified: Vec<Option<AuthorKey>> = tokio::task::spawn_blocking(move || {
            events
                .par_iter()
                .zip(keys.par_iter())
                .map(|(e, k)| e.verify(k).ok().map(|_| *k))
                .collect()
        })
        .await
        .unwrap_or_default();
        let t_verify = t0.elapsed();

        let shared = self.shared.clone();
        let mut state = std::mem::take(&mut self.state);
        let mut frontier = self.frontier.clone();
        let mut pending = std::mem::take(&mut self.pending);
        let pending_max = self.config.pending_max;
        let applied = tokio::task::spawn_blocking(move || {
            let result = apply_batch(
                &shared,
                &prev,
                &mut state,
                &mut frontier,
                &mut pending,
                pending_max,
                jobs,
                verified,
            )
            .and_then(|parts| encode_batch(&shared, &state, &frontier, parts));
            (state, frontier, pending, result)
        })
        .await;
        let (state, frontier, pending, result) = match applied {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!("ledger batch panicked: {e}");
                return None;
            }
        };
        self.state = state;
        self.pending = pending;
        match result {
            Ok(mut prepared) => {
                self.frontier = frontier;
                prepared.t_verify = t_verify;
                prepared.t_apply = t0.elapsed() - t_verify;
                Some(prepared)
            }
            Err(e) => {
                tracing::error!("ledger batch failed: {e}");
                None
            }
        }
    }

    /// Writes a prepared batch in the background: envelopes durable in the store first, then
    /// the index rows that reference them, in one redb transaction.
    fn start_commit(&mut self, mut prepared: Prepared) -> InFlight {
        let shared = self.shared.clone();
        let rows = prepared.rows.take();
        let adds = std::mem::take(&mut prepared.adds);
        let task = tokio::spawn(async move {
            let Some(rows) = rows else {
                return Ok(Duration::ZERO);
            };
            let tc = Instant::now();
            let mut writer = shared.store.writer().await;
            writer.add_many(adds, STORE_ADDS_IN_FLIGHT).await?;
            writer.commit().await?;
            let t_barrier = tc.elapsed();
            let db_shared = shared.clone();
            let result = tokio::task::spawn_blocking(move || db::write_rows(&db_shared.db, rows))
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))
                .and_then(|r| r);
            // GC may look at the new blobs only now that the index referencing them is durable.
            drop(writer);
            tracing::debug!(
                store_ms = t_barrier.as_millis() as u64,
                index_ms = (tc.elapsed() - t_barrier).as_millis() as u64,
                "ledger commit"
            );
            result.map(|()| tc.elapsed())
        });
        InFlight { task, prepared }
    }

    /// Waits for a batch's commit, then publishes its checkpoint and events and answers its
    /// jobs. Returns whether it committed.
    async fn land(&mut self, f: InFlight) -> bool {
        let committed = match f.task.await {
            Ok(r) => r,
            Err(e) => Err(Error::Unavailable(format!("commit task failed: {e}"))),
        };
        let p = f.prepared;
        match committed {
            Ok(t_commit) => {
                tracing::debug!(
                    events = p.jobs.len(),
                    verify_ms = p.t_verify.as_millis() as u64,
                    apply_ms = p.t_apply.as_millis() as u64,
                    commit_ms = t_commit.as_millis() as u64,
                    "ledger batch"
                );
                // Counters first: a caller that sees its reply must also see the new state.
                self.update_pending_count();
                if !p.overlay.accepted.is_empty() {
                    let mut ids = self
                        .shared
                        .ids
                        .write()
                        .expect("invariant: id map lock is never poisoned");
                    for id in &p.overlay.accepted {
                        if let Some(record) = p.overlay.events.get(id) {
                            ids.insert(*id, record.index);
                        }
                    }
                }
                if let Some(note) = p.note {
                    *self
                        .shared
                        .checkpoint
                        .write()
                        .expect("invariant: checkpoint lock is never poisoned") = note;
                }
                for event in p.accepted_events {
                    if let Some(record) = p.overlay.events.get(&event.id) {
                        let _ = self.shared.feed.send(Arc::new(Accepted {
                            record: record.clone(),
                            event,
                        }));
                    }
                }
                for proof in p.fork_proofs {
                    let _ = self.shared.fork_feed.send(proof);
                }
                for (job, outcome) in p.jobs.into_iter().zip(p.outcomes) {
                    let Some(reply) = job.reply else { continue };
                    let body = &job.event.body;
                    let answer = match outcome {
                        Outcome::Accepted(r) => Ok(Submitted {
                            id: r.id,
                            blob: r.envelope,
                            seq: r.seq,
                            index: Some(r.index),
                            status: Status::Accepted,
                        }),
                        Outcome::Duplicate(r) => Ok(Submitted {
                            id: r.id,
                            blob: r.envelope,
                            seq: r.seq,
                            index: Some(r.index),
                            status: Status::Duplicate,
                        }),
                        Outcome::Pending(w, blob) => Ok(Submitted {
                            id: job.event.id,
                            blob,
                            seq: body.seq,
                            index: None,
                            status: Status::Pending(w),
                        }),
                        Outcome::Rejected(e) => Err(e),
                    };
                    let _ = reply.send(answer);
                }
                true
            }
            Err(e) => {
                tracing::error!("ledger commit failed: {e}");
                for job in p.jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(Error::Unavailable(format!("commit failed: {e}"))));
                    }
                }
                false
            }
        }
    }

    async fn reload(&mut self) {
        let shared = self.shared.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let state = db::load_state(&shared.db)?;
            let tx = shared.db.begin_read()?;
            let ids = shared
                .ids
                .read()
                .expect("invariant: id map lock is never poisoned");
            let noop = |_: &BlobHash| Ok(None);
            let view = DbView::new(&tx, &ids, &noop)?;
            let frontier = Frontier::load(&view, state.n_events)?;
            Ok::<_, Error>((state, frontier))
        })
        .await;
        match loaded {
            Ok(Ok((state, frontier))) => {
                self.state = state;
                self.frontier = frontier;
            }
            _ => tracing::error!("ledger state could not be reloaded; restart the node"),
        }
    }
}

type BatchResult = (
    Vec<Job>,
    Vec<Outcome>,
    Overlay,
    Vec<(u8, u64, TreeHash)>,
    Vec<(EventId, BlobHash, u64, Vec<u8>)>,
    Vec<EventId>,
    Vec<Arc<SignedEvent>>,
);

/// A batch applied in memory: its answers, and everything its commit writes and publishes.
struct Prepared {
    jobs: Vec<Job>,
    outcomes: Vec<Outcome>,
    /// What the batch added; the next batch looks here before the database.
    overlay: Arc<Overlay>,
    /// Index rows; `None` when the batch changed nothing durable.
    rows: Option<db::BatchRows>,
    /// Envelopes to store before the rows commit.
    adds: Vec<Bytes>,
    /// The signed checkpoint after this batch, published once it commits.
    note: Option<String>,
    accepted_events: Vec<Arc<SignedEvent>>,
    fork_proofs: Vec<ForkProof>,
    t_verify: Duration,
    t_apply: Duration,
}

/// A batch whose commit runs in the background.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Duration>>,
    prepared: Prepared,
}

/// Encodes what a batch writes (rows, envelopes, checkpoint) while the state is exactly the
/// state after it.
fn encode_batch(
    shared: &Shared,
    state: &State,
    frontier: &Frontier,
    parts: BatchResult,
) -> Result<Prepared> {
    let (jobs, outcomes, overlay, tree_nodes, new_pending, woken_pending, accepted_events) = parts;
    let fork_proofs = overlay
        .touched
        .forks
        .iter()
        .filter_map(|key| state.forks.get(key).cloned())
        .collect();
    let changed = !(overlay.accepted.is_empty()
        && overlay.events.is_empty()
        && new_pending.is_empty()
        && woken_pending.is_empty()
        && overlay.touched.forks.is_empty());
    let mut adds = Vec::new();
    let mut rows = None;
    let mut note = None;
    if changed {
        adds = overlay
            .accepted
            .iter()
            .filter_map(|id| overlay.envelopes.get(id).cloned())
            .chain(new_pending.iter().map(|(_, _, _, bytes)| bytes.clone()))
            .map(Bytes::from)
            .collect();
        let mut r = db::batch_rows(state, &overlay, &tree_nodes)?;
        for (id, blob, since, _) in &new_pending {
            r.pending_add
                .push((*id.as_bytes(), (*blob.as_bytes(), *since)));
        }
        r.pending_remove = woken_pending.iter().map(|id| *id.as_bytes()).collect();
        if !overlay.accepted.is_empty() {
            let size = frontier.size();
            let signed = tlog::sign_checkpoint(
                &Checkpoint {
                    origin: shared.origin.clone(),
                    size,
                    root: frontier.root(),
                },
                &shared.origin,
                &shared.key,
            );
            r.checkpoint = Some((size, signed.clone()));
            note = Some(signed);
        }
        rows = Some(r);
    }
    Ok(Prepared {
        jobs,
        outcomes,
        overlay: Arc::new(overlay),
        rows,
        adds,
        note,
        accepted_events,
        fork_proofs,
        t_verify: Duration::ZERO,
        t_apply: Duration::ZERO,
    })
}

#[allow(clippy::too_many_arguments)]
fn apply_batch(
    shared: &Shared,
    prev: &Overlay,
    state: &mut State,
    frontier: &mut Frontier,
    pending: &mut Pending,
    pending_max: usize,
    jobs: Vec<Job>,
    verified: Vec<Option<AuthorKey>>,
) -> Result<BatchResult> {
    let tx = shared.db.begin_read()?;
    let store = shared.store.clone();
    let fetch = move |hash: &BlobHash| read_envelope(&store, hash);
    let ids = shared
        .ids
        .read()
        .expect("invariant: id map lock is never poisoned");
    let db_view = DbView::new(&tx, &ids, &fetch)?;
    // The batch still committing is not in the database yet.
    let view = Layered {
        base: &db_view,
        overlay: prev,
    };
    let mut overlay = Overlay::default();
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut tree_nodes = Vec::new();
    let mut new_pending: Vec<(EventId, BlobHash, u64, Vec<u8>)> = Vec::new();
    let mut woken_ids: Vec<EventId> = Vec::new();
    let mut seen_in_batch: HashSet<EventId> = HashSet::new();
    let mut queue: std::collections::VecDeque<Arc<SignedEvent>> = Default::default();
    let mut accepted_events: Vec<Arc<SignedEvent>> = Vec::new();

    let apply_one = |event: &Arc<SignedEvent>,
                     verified_with: Option<AuthorKey>,
                     state: &mut State,
                     overlay: &mut Overlay,
                     frontier: &mut Frontier,
                     tree_nodes: &mut Vec<(u8, u64, TreeHash)>|
     -> Outcome {
        let blob = BlobHash::of(&event.envelope);
        match state.apply(&shared.rules, &view, overlay, event, blob, verified_with) {
            Ok(Applied::Accepted(record)) => {
                tree_nodes.extend(frontier.push(tlog::leaf_hash(&record.id)));
                Outcome::Accepted(record)
            }
            Ok(Applied::Duplicate(record)) => Outcome::Duplicate(record),
            Ok(Applied::Waiting(w)) => Outcome::Pending(w, blob),
            Err(e) => Outcome::Rejected(e),
        }
    };

    for (job, verified_with) in jobs.iter().zip(verified) {
        let event = &job.event;
        if !seen_in_batch.insert(event.id) {
            // The same event twice in one batch: the second is a duplicate of the first.
            match overlay.events.get(&event.id).cloned() {
                Some(record) => outcomes.push(Outcome::Duplicate(record)),
                None => outcomes.push(Outcome::Rejected(reject(
                    "duplicate_submission",
                    "the same event was submitted twice at once; retry",
                ))),
            }
            continue;
        }
        let mut outcome = apply_one(
            event,
            verified_with,
            state,
            &mut overlay,
            frontier,
            &mut tree_nodes,
        );
        if let Outcome::Pending(w, blob) = &outcome {
            if pending.entries.contains_key(&event.id) {
                // Already waiting: same answer, nothing new stored.
            } else if pending.entries.len() >= pending_max {
                outcome = Outcome::Rejected(reject(
                    "pending_full",
                    format!(
                        "{pending_max} events already wait for their prev or deps; submit \
                         those first"
                    ),
                ));
            } else {
                let since = now_ms();
                pending.insert(event.clone(), w);
                new_pending.push((event.id, *blob, since, event.envelope.clone()));
            }
        }
        if let Outcome::Accepted(record) = &outcome {
            accepted_events.push(event.clone());
            queue.extend(pending.woken_by(record).into_iter().map(|e| {
                woken_ids.push(e.event.id);
                e.event
            }));
        }
        outcomes.push(outcome);
        // Waiting events woken by this one apply right after it, in this batch.
        while let Some(event) = queue.pop_front() {
            match apply_one(&event, None, state, &mut overlay, frontier, &mut tree_nodes) {
                Outcome::Accepted(record) => {
                    accepted_events.push(event.clone());
                    queue.extend(pending.woken_by(&record).into_iter().map(|e| {
                        woken_ids.push(e.event.id);
                        e.event
                    }));
                }
                Outcome::Pending(w, _) => {
                    // Still missing something else: wait again (its envelope is stored).
                    pending.insert(event.clone(), &w);
                    woken_ids.retain(|id| *id != event.id);
                }
                Outcome::Duplicate(_) => {}
                Outcome::Rejected(e) => {
                    tracing::info!(id = %event.id, "pending event rejected: {e}");
                }
            }
        }
    }
    drop(db_view);
    drop(ids);
    Ok((
        jobs,
        outcomes,
        overlay,
        tree_nodes,
        new_pending,
        woken_ids,
        accepted_events,
    ))
}

/// The ledger's GC roots: every accepted and pending envelope, and the blobs this node hosts
/// (its `blob.host` announcements and the weights of its own skills).
struct LedgerRoots {
    /// Weak: the store must not keep the ledger alive. A ledger that is gone aborts GC.
    shared: std::sync::Weak<Shared>,
}

impl GcRoots for LedgerRoots {
    fn add_roots(
        &self,
        roots: &mut std::collections::HashSet<BlobHash>,
    ) -> std::result::Result<(), String> {
        let Some(shared) = self.shared.upgrade() else {
            return Err("the ledger is closed; its roots are unknown".into());
        };
        let mut collect = || -> Result<()> {
            let tx = shared.db.begin_read()?;
            for entry in tx.open_table(db::EVENTS)?.iter()? {
                let (_, v) = entry?;
                let record: EventRecord = db::decode(v.value())?;
                roots.insert(record.envelope);
            }
            for entry in tx.open_table(db::PENDING)?.iter()? {
                let (_, v) = entry?;
                roots.insert(BlobHash::from_bytes(v.value().0));
            }
            for entry in tx.open_table(db::HOSTS)?.iter()? {
                let (blob, host) = entry?.0.value();
                if host == *shared.node.as_bytes() {
                    roots.insert(BlobHash::from_bytes(blob));
                }
            }
            for entry in tx.open_table(db::SKILLS)?.iter()? {
                let (_, v) = entry?;
                let skill: SkillState = db::decode(v.value())?;
                if skill.author == shared.node {
                    roots.insert(skill.blob);
                }
            }
            Ok(())
        };
        collect().map_err(|e| e.to_string())
    }
}
