//! The ledger service: opening, submission (the ingest API), the event feed. The worker that
//! applies batches is in `worker.rs`, the pending set in `pending.rs`, reads of the committed
//! index in `reads.rs`, GC roots in `roots.rs`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshnode_schemas::{AuthorKey, BlobHash, EventId, Genesis, SignedEvent, SigningKey, author_of};
use meshnode_store::Store;
use rayon::prelude::*;
use redb::{Database, ReadableDatabase};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::db::{self, DbView};
use crate::error::{Error, Result, Waiting};
use crate::fold::{EventRecord, ForkProof, Rules};
use crate::pending::load_pending_jobs;
use crate::roots::LedgerRoots;
use crate::tlog::{self, Checkpoint, Frontier};
use crate::worker::{Job, Worker};

/// Most events applied in one batch (one transaction, one fsync).
pub const BATCH_EVENTS_MAX: usize = 4096;
/// Submissions queued for the worker; submitters wait for room beyond this.
pub const QUEUE_EVENTS_MAX: usize = 16_384;
/// Most events waiting for their prev or deps.
pub const PENDING_EVENTS_MAX: usize = 10_000;
/// How often waiting events are checked against their time-to-live.
pub(crate) const PENDING_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Envelope writes to the blob store in flight at once during a commit.
pub(crate) const STORE_ADDS_IN_FLIGHT: usize = 64;

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
    /// Credits not yet in the causal past of the log, in EventId order; name them in `deps`
    /// to spend them. [`Ledger::account`] gives all of them, [`Ledger::account_page`] the
    /// first page and [`Ledger::account_summary`] none.
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

pub(crate) struct Shared {
    pub(crate) db: Database,
    pub(crate) store: Store,
    pub(crate) rules: Rules,
    pub(crate) key: SigningKey,
    pub(crate) node: AuthorKey,
    pub(crate) origin: String,
    pub(crate) checkpoint: RwLock<String>,
    /// EventId → leaf index of every committed event (the `events` table is keyed by leaf).
    pub(crate) ids: RwLock<db::EventIds>,
    pub(crate) feed: broadcast::Sender<Arc<Accepted>>,
    pub(crate) fork_feed: broadcast::Sender<ForkProof>,
    pub(crate) tx: mpsc::Sender<Job>,
    pub(crate) n_pending: Mutex<usize>,
    /// The last state digest computed: (tree size, digest).
    pub(crate) digest: Mutex<Option<(u64, crate::StateDigest)>>,
    /// Tests: make the next batch panic while it is applied.
    #[cfg(test)]
    pub(crate) fail_next_batch: std::sync::atomic::AtomicBool,
    pub(crate) dir: PathBuf,
    pub(crate) stop: Mutex<Option<oneshot::Sender<()>>>,
    pub(crate) worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads an envelope blob synchronously (from a blocking thread).
pub(crate) fn read_envelope(store: &Store, hash: &BlobHash) -> Result<Option<Vec<u8>>> {
    let handle = tokio::runtime::Handle::current();
    match handle.block_on(store.get_bytes(hash, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)) {
        Ok(bytes) => Ok(Some(bytes.to_vec())),
        Err(meshnode_store::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
        let worker = Worker::new(shared, state, frontier, config);
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
                from: None,
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
        self.enqueue_many_from(envelopes, None).await
    }

    /// [`Ledger::enqueue_many`] for envelopes read from a peer's log: `from` (the peer's
    /// endpoint id) is recorded for the events accepted from them ([`Ledger::delivered_by`]).
    pub async fn enqueue_many_from(
        &self,
        envelopes: Vec<Bytes>,
        from: Option<[u8; 32]>,
    ) -> Vec<Receipt> {
        // Decoding (canonical checks) is CPU work: spread it over the cores.
        let n = envelopes.len();
        let decoded: Vec<Result<SignedEvent>> = tokio::task::spawn_blocking(move || {
            envelopes
                .par_iter()
                .map(|e| SignedEvent::decode(e).map_err(Error::from))
                .collect()
        })
        .await
        .unwrap_or_else(|e| {
            // One answer per envelope even then: callers count on it.
            (0..n)
                .map(|_| Err(Error::Unavailable(format!("decoding failed: {e}"))))
                .collect()
        });
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
                            from,
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
}
