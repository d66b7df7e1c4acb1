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
/// How often waiting events are checked against their time-to-live.
const PENDING_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
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
    /// Spendable balance: uncontested credits received minus uncontested debits.
    pub balance: u128,
    /// Credits received (contested included).
    pub received: u128,
    /// Of which contested (they count on neither side).
    pub received_contested: u128,
    /// Sent (contested included).
    pub sent: u128,
    /// Of which contested.
    pub sent_contested: u128,
    /// Minted (issuers; contested included).
    pub minted: u128,
    /// Credits not yet in the causal past of the log; name them in `deps` to spend them.
    pub unreferenced_credits: Vec<EventId>,
    /// Head of the log (of the branch this node extended first, once it forked).
    pub head_seq: u64,
    /// Head event.
    pub head_id: Option<EventId>,
    /// Key that signs the next event.
    pub signing_key: AuthorKey,
    /// Lowest forked seq, if the log forked: its events from there on are contested.
    pub frozen_from: Option<u64>,
    /// Reputation score.
    pub reputation: i128,
}

struct Job {
    event: Arc<SignedEvent>,
    reply: Option<oneshot::Sender<Result<Submitted>>>,
    /// When a reloaded pending event first arrived (ms since the epoch); `None` for new ones.
    since_ms: Option<u64>,
}

/// The pending events stored in the index, as jobs to try again.
async fn load_pending_jobs(shared: &Arc<Shared>) -> Result<Vec<Job>> {
    let rows = {
        let tx = shared.db.begin_read()?;
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
        rows
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for (id, blob, since_ms) in rows {
        match shared
            .store
            .get_bytes(&blob, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
            .await
        {
            Ok(bytes) => match SignedEvent::decode(&bytes) {
                Ok(event) if event.id == id => jobs.push(Job {
                    event: Arc::new(event),
                    reply: None,
                    since_ms: Some(since_ms),
                }),
                _ => tracing::warn!(%id, "dropping an unreadable pending event"),
            },
            Err(e) => tracing::warn!(%id, "pending event envelope unavailable: {e}"),
        }
    }
    Ok(jobs)
}

/// The `Instant` of a wall-clock time in ms since the epoch (for arrival times read back).
fn instant_of_ms(ms: u64) -> Instant {
    let age = Duration::from_millis(now_ms().saturating_sub(ms));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

struct PendingEntry {
    event: Arc<SignedEvent>,
    since: Instant,
}

/// Events waiting for their prev or deps, bounded in count, in bytes and per author.
#[derive(Default)]
struct Pending {
    entries: HashMap<EventId, PendingEntry>,
    /// Missing event → the pending events that wait for it. Lists are cleaned lazily (an id
    /// whose entry is gone is skipped), so waking N waiters costs O(N).
    waiters: HashMap<EventId, Vec<EventId>>,
    /// Envelope bytes held.
    bytes: usize,
    /// Entries per author.
    per_author: HashMap<AuthorKey, usize>,
}

/// Most envelope bytes held by pending events (each entry also holds its decoded form).
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most pending events of one author.
pub const PENDING_PER_AUTHOR_MAX: usize = 512;

impl Pending {
    /// Whether one more event of `author` fits; the error says which limit is reached. A full
    /// pending set delays an event (the submitter or a peer delivers it again later); it is
    /// not a verdict on the event.
    fn admit(&self, event: &SignedEvent, count_max: usize) -> Result<()> {
        let author = event.body.author;
        let full = |what: String| {
            reject(
                "pending_full",
                format!("{what}; deliver the events it waits for first, or retry later"),
            )
        };
        if self.entries.len() >= count_max {
            return Err(full(format!(
                "{count_max} events already wait for their prev or deps"
            )));
        }
        if self.bytes + event.envelope.len() > PENDING_BYTES_MAX {
            return Err(full(format!(
                "waiting events already hold {} MiB",
                PENDING_BYTES_MAX >> 20
            )));
        }
        if self.per_author.get(&author).copied().unwrap_or(0) >= PENDING_PER_AUTHOR_MAX {
            return Err(full(format!(
                "{PENDING_PER_AUTHOR_MAX} events of {author} already wait"
            )));
        }
        Ok(())
    }

    fn insert(&mut self, event: Arc<SignedEvent>, waiting: &Waiting, since: Instant) {
        for key in &waiting.missing {
            self.waiters.entry(*key).or_default().push(event.id);
        }
        self.count(&event);
        if let Some(old) = self.entries.insert(event.id, PendingEntry { event, since }) {
            // Inserted again while still there: counted once.
            self.forget(&old.event);
        }
    }

    fn count(&mut self, event: &SignedEvent) {
        self.bytes += event.envelope.len();
        *self.per_author.entry(event.body.author).or_default() += 1;
    }

    fn forget(&mut self, event: &SignedEvent) {
        self.bytes -= event.envelope.len();
        let author = event.body.author;
        if let Some(n) = self.per_author.get_mut(&author) {
            *n -= 1;
            if *n == 0 {
                self.per_author.remove(&author);
            }
        }
    }

    fn remove(&mut self, id: &EventId) -> Option<PendingEntry> {
        let entry = self.entries.remove(id)?;
        self.forget(&entry.event);
        Some(entry)
    }

    /// Pending events that may now apply because `record` was accepted.
    fn woken_by(&mut self, record: &EventRecord) -> Vec<PendingEntry> {
        let Some(ids) = self.waiters.remove(&record.id) else {
            return Vec::new();
        };
        ids.into_iter().filter_map(|id| self.remove(&id)).collect()
    }

    /// Drops waiter ids whose entries are gone.
    fn compact(&mut self) {
        let entries = &self.entries;
        self.waiters.retain(|_, ids| {
            ids.retain(|id| entries.contains_key(id));
            !ids.is_empty()
        });
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
    /// The last state digest computed: (tree size, digest).
    digest: Mutex<Option<(u64, crate::StateDigest)>>,
    /// Tests: make the next batch panic while it is applied.
    #[cfg(test)]
    fail_next_batch: std::sync::atomic::AtomicBool,
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
    /// Pending events to try again (after a failed batch reloaded them).
    retry: Vec<Job>,
    /// When waiting events were last checked for their time-to-live.
    last_sweep: Instant,
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
            digest: Mutex::new(None),
            #[cfg(test)]
            fail_next_batch: std::sync::atomic::AtomicBool::new(false),
            dir: dir.to_path_buf(),
            stop: Mutex::new(None),
            worker: Mutex::new(None),
        });
        let load = shared.clone();
        let (state, frontier) = tokio::task::spawn_blocking(move || {
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
            Ok::<_, Error>((state, frontier))
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
        // Events that were waiting when the node stopped are tried again (and wait again,
        // with their original arrival time).
        let retry = load_pending_jobs(&shared).await?;
        *ledger
            .shared
            .n_pending
            .lock()
            .expect("invariant: pending counter lock is never poisoned") = retry.len();
        let worker = Worker {
            shared,
            state,
            frontier,
            pending: Pending::default(),
            config,
            in_flight: None,
            retry: Vec::new(),
            last_sweep: Instant::now(),
        };
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
                since_ms: None,
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
                            since_ms: None,
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

    /// An author's log from `after_seq` (exclusive), at most `limit` records, in seq order
    /// (at a forked seq, every event there, by id).
    pub fn log(
        &self,
        author: &AuthorKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>> {
        let Some(from_seq) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let ids = self.ids();
        let tx = self.read()?;
        let log = tx.open_table(db::LOG)?;
        let events = tx.open_table(db::EVENTS)?;
        let mut out = Vec::new();
        let key = *author.as_bytes();
        for entry in log
            .range((key, from_seq, [0; 32])..=(key, u64::MAX, [0xff; 32]))?
            .take(limit)
        {
            let (k, _) = entry?;
            let v = ids
                .get(&EventId::from_bytes(k.value().2))
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
            sent_contested: state.sent_contested,
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

    /// Total supply: uncontested mints (= the sum of spendable balances).
    pub fn supply(&self) -> Result<u128> {
        let tx = self.read()?;
        let meta = tx.open_table(db::META)?;
        Ok(match meta.get("supply")? {
            Some(v) => u128::from_le_bytes(v.value().try_into().unwrap_or([0; 16])),
            None => 0,
        })
    }

    /// The whole derived state as of the last committed batch, read in one transaction.
    pub fn state(&self) -> Result<State> {
        db::load_state_in(&self.read()?)
    }

    /// The state digest (see [`State::digest`]) and the number of events it covers. Computed
    /// from the committed state once per tree size and cached.
    pub fn state_digest(&self) -> Result<(u64, crate::StateDigest)> {
        let size = self.tree_size()?;
        if let Some((n, d)) = *self
            .shared
            .digest
            .lock()
            .expect("invariant: digest lock is never poisoned")
            && n == size
        {
            return Ok((n, d));
        }
        let state = self.state()?;
        let computed = (state.n_events, state.digest());
        *self
            .shared
            .digest
            .lock()
            .expect("invariant: digest lock is never poisoned") = Some(computed);
        Ok(computed)
    }

    /// Canonical fork proofs, one per forked log.
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

    /// Hosts of a blob (authors whose latest `blob.host` for it says pinned).
    pub fn hosts(&self, blob: &BlobHash) -> Result<Vec<AuthorKey>> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::HOSTS)?;
        let from = (*blob.as_bytes(), [0u8; 32]);
        let to = (*blob.as_bytes(), [0xffu8; 32]);
        let mut out = Vec::new();
        for entry in table.range(from..=to)? {
            let (k, v) = entry?;
            if v.value().2 {
                out.push(AuthorKey::from_bytes(k.value().1));
            }
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

    /// One basin version by its event.
    pub fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>> {
        let tx = self.read()?;
        let versions = tx.open_table(db::VERSIONS)?;
        match versions.get(*id.as_bytes())? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Ok(None),
        }
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

    /// Tests: the next batch panics while it is applied.
    #[cfg(test)]
    pub(crate) fn fail_next_batch(&self) {
        self.shared
            .fail_next_batch
            .store(true, std::sync::atomic::Ordering::SeqCst);
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
        let mut sweep = tokio::time::interval(PENDING_SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The time-to-live holds under steady load too, not only when the queue is idle.
            if self.last_sweep.elapsed() >= PENDING_SWEEP_INTERVAL {
                self.expire_pending().await;
            }
            let mut jobs = std::mem::take(&mut carry);
            jobs.append(&mut self.retry);
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
        self.last_sweep = Instant::now();
        self.pending.compact();
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
            .and_then(|parts| {
                assert_eq!(
                    frontier.size(),
                    state.n_events,
                    "invariant: the transparency log holds every accepted event once"
                );
                encode_batch(&shared, &state, &frontier, parts)
            });
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
        // The in-memory pending set may be gone with the failed batch; the index has every
        // event that was answered "pending", so they are tried again.
        self.pending = Pending::default();
        match load_pending_jobs(&self.shared).await {
            Ok(jobs) => self.retry = jobs,
            Err(e) => tracing::error!("pending events could not be reloaded: {e}"),
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
    #[cfg(test)]
    if shared
        .fail_next_batch
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        panic!("injected batch failure");
    }
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
    let mut woken_ids: HashSet<EventId> = HashSet::new();
    let mut seen_in_batch: HashSet<EventId> = HashSet::new();
    let mut queue: std::collections::VecDeque<PendingEntry> = Default::default();
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
            } else if let Some(since_ms) = job.since_ms {
                // Reloaded from the index: admitted before, its row is there.
                pending.insert(event.clone(), w, instant_of_ms(since_ms));
            } else if let Err(e) = pending.admit(event, pending_max) {
                outcome = Outcome::Rejected(e);
            } else {
                pending.insert(event.clone(), w, Instant::now());
                new_pending.push((event.id, *blob, now_ms(), event.envelope.clone()));
            }
        }
        if let Outcome::Accepted(record) = &outcome {
            accepted_events.push(event.clone());
            for entry in pending.woken_by(record) {
                woken_ids.insert(entry.event.id);
                queue.push_back(entry);
            }
        }
        outcomes.push(outcome);
        // Waiting events woken by this one apply right after it, in this batch.
        while let Some(entry) = queue.pop_front() {
            let event = entry.event;
            match apply_one(&event, None, state, &mut overlay, frontier, &mut tree_nodes) {
                Outcome::Accepted(record) => {
                    accepted_events.push(event.clone());
                    for entry in pending.woken_by(&record) {
                        woken_ids.insert(entry.event.id);
                        queue.push_back(entry);
                    }
                }
                Outcome::Pending(w, _) => {
                    // Still missing something else: wait again (its envelope is stored).
                    pending.insert(event.clone(), &w, entry.since);
                    woken_ids.remove(&event.id);
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
    let woken_ids: Vec<EventId> = woken_ids.into_iter().collect();
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

/// The ledger's GC roots: every accepted and pending envelope, the blobs this node hosts (its
/// `blob.host` announcements) and the weights of every uncontested skill.
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
                let (k, v) = entry?;
                let (blob, host) = k.value();
                if host == *shared.node.as_bytes() && v.value().2 {
                    roots.insert(BlobHash::from_bytes(blob));
                }
            }
            // The weights of every uncontested skill, whoever published it: the catalog lists
            // them, so this node keeps what it has of them.
            for entry in tx.open_table(db::SKILLS)?.iter()? {
                let (_, v) = entry?;
                let skill: SkillState = db::decode(v.value())?;
                if !skill.contested {
                    roots.insert(skill.blob);
                }
            }
            Ok(())
        };
        collect().map_err(|e| e.to_string())
    }
}
