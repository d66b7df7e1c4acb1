//! The ingest worker: takes submissions in batches, verifies signatures on all cores,
//! applies them with the fold on top of the batch still committing, commits each batch in one
//! transaction after the store's durability barrier, and answers submitters only then.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshnode_schemas::{AuthorKey, BlobHash, EventId, SignedEvent};
use rayon::prelude::*;
use redb::ReadableDatabase;
use tokio::sync::{mpsc, oneshot};

use crate::db::{self, DbView};
use crate::error::{Error, Result, Rule, Waiting, reject};
use crate::fold::{Applied, EventRecord, ForkProof, Layered, Overlay, State};
use crate::ledger::{
    Accepted, BATCH_EVENTS_MAX, LedgerConfig, PENDING_SWEEP_INTERVAL, STORE_ADDS_IN_FLIGHT, Shared,
    Status, Submitted, now_ms, read_envelope,
};
use crate::pending::{Pending, PendingEntry, instant_of_ms, load_pending_jobs};
use crate::tlog::{self, Checkpoint, Frontier, TreeHash};

pub(crate) struct Job {
    pub(crate) event: Arc<SignedEvent>,
    pub(crate) reply: Option<oneshot::Sender<Result<Submitted>>>,
    /// When a reloaded pending event first arrived (ms since the epoch); `None` for new ones.
    pub(crate) since_ms: Option<u64>,
    /// The peer (endpoint id) whose log delivered it; `None` for local submissions.
    pub(crate) from: Option<[u8; 32]>,
}

pub(crate) struct Worker {
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
    /// Batches that failed in a row (reset by one that commits).
    failures: u32,
    /// The state could not be reloaded after a failure: the worker stops rather than apply
    /// events to a state it cannot trust.
    stopped: bool,
}

/// After this many failed batches in a row, waiting events are retried one per batch, and one
/// whose batch fails alone is dropped (its submitter or a peer can deliver it again), so that
/// no single event can stop ingest for good.
const FAILURES_BEFORE_ISOLATION: u32 = 2;

/// Outcome of applying one job inside a batch.
enum Outcome {
    Accepted(EventRecord),
    Duplicate(EventRecord),
    Pending(Waiting, BlobHash),
    Rejected(Error),
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        state: State,
        frontier: Frontier,
        config: LedgerConfig,
    ) -> Self {
        Self {
            shared,
            state,
            frontier,
            pending: Pending::default(),
            config,
            in_flight: None,
            retry: Vec::new(),
            last_sweep: Instant::now(),
            failures: 0,
            stopped: false,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        mut stop: oneshot::Receiver<()>,
        initial: Vec<Job>,
    ) {
        let mut carry = initial;
        let mut sweep = tokio::time::interval(PENDING_SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.stopped {
                tracing::error!("ledger worker stopped: its state could not be reloaded");
                return;
            }
            // The time-to-live holds under steady load too, not only when the queue is idle.
            if self.last_sweep.elapsed() >= PENDING_SWEEP_INTERVAL {
                self.expire_pending().await;
            }
            if self.failures >= FAILURES_BEFORE_ISOLATION && !self.retry.is_empty() {
                let job = self.retry.remove(0);
                let blob = BlobHash::of(&job.event.envelope);
                if self.batch(vec![job]).await {
                    if self.retry.is_empty() {
                        self.failures = 0;
                    }
                } else {
                    self.drop_pending_row(blob).await;
                }
                continue;
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
                            self.failures += 1;
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
            if self.batch(jobs).await {
                self.failures = 0;
            }
        }
    }

    /// Drops a waiting event whose batch failed on its own (see
    /// [`FAILURES_BEFORE_ISOLATION`]).
    async fn drop_pending_row(&mut self, blob: BlobHash) {
        tracing::error!(%blob, "a waiting event failed its batch alone; dropped");
        self.retry
            .retain(|job| BlobHash::of(&job.event.envelope) != blob);
        self.pending.remove(&blob);
        let shared = self.shared.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let tx = db::begin_write(&shared.db)?;
            tx.open_table(db::PENDING)?.remove(*blob.as_bytes())?;
            tx.commit()?;
            Ok::<_, Error>(())
        })
        .await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(%blob, "could not remove a dropped pending event from the index");
        }
        self.update_pending_count();
    }

    async fn expire_pending(&mut self) {
        self.last_sweep = Instant::now();
        self.pending.compact();
        let ttl = self.config.pending_ttl;
        let expired: Vec<BlobHash> = self
            .pending
            .entries
            .iter()
            .filter(|(_, e)| e.since.elapsed() > ttl)
            .map(|(blob, _)| *blob)
            .collect();
        if expired.is_empty() {
            return;
        }
        for blob in &expired {
            if let Some(entry) = self.pending.remove(blob) {
                let id = entry.event.id;
                tracing::info!(%id, "pending event dropped: unresolved after {ttl:?}");
            }
        }
        let shared = self.shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let tx = db::begin_write(&shared.db)?;
            {
                let mut table = tx.open_table(db::PENDING)?;
                for blob in &expired {
                    table.remove(*blob.as_bytes())?;
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
    /// Returns whether the batch (and the one committing before it) went through.
    async fn batch(&mut self, jobs: Vec<Job>) -> bool {
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
            Some(prepared) if landed => {
                self.in_flight = Some(self.start_commit(prepared));
                return true;
            }
            Some(prepared) => {
                // It was applied on top of a batch that did not commit.
                for job in prepared.jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(Error::Unavailable(
                            "an earlier batch failed to commit; retry".into(),
                        )));
                    }
                }
            }
            None => {}
        }
        self.failures += 1;
        self.reload().await;
        false
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
        // Skill publishes and blob.host events make blobs that may already be stored GC
        // roots; such a blob that nothing else holds (not pinned) must not be swept by a pass
        // that took its roots before this commit.
        let new_roots = referenced_blobs(&prepared.overlay, &self.shared.node);
        let task = tokio::spawn(async move {
            let Some(rows) = rows else {
                return Ok(Duration::ZERO);
            };
            let tc = Instant::now();
            let mut writer = shared.store.writer().await;
            writer.add_many(adds, STORE_ADDS_IN_FLIGHT).await?;
            writer.commit().await?;
            let t_barrier = tc.elapsed();
            let no_pass = match unheld(&shared.store, &new_roots).await {
                true => Some(shared.store.hold_off_gc().await),
                false => None,
            };
            let db_shared = shared.clone();
            let result = tokio::task::spawn_blocking(move || db::write_rows(&db_shared.db, rows))
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))
                .and_then(|r| r);
            drop(no_pass);
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
            _ => {
                tracing::error!("ledger state could not be reloaded; restart the node");
                self.stopped = true;
                return;
            }
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
    Vec<BlobHash>,
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

/// Blobs that accepted events of a batch make GC roots: the weights of skill publishes (by
/// anyone) and the blobs of this node's own `blob.host` events (see `roots.rs`). Only those
/// envelopes are decoded.
fn referenced_blobs(overlay: &crate::fold::Overlay, node: &AuthorKey) -> Vec<BlobHash> {
    use meshnode_schemas::{Kind, Payload};
    overlay
        .accepted
        .iter()
        .filter(|id| {
            overlay.events.get(id).is_some_and(|r| match r.kind {
                Kind::SkillPublish => true,
                Kind::BlobHost => r.author == *node,
                _ => false,
            })
        })
        .filter_map(|id| overlay.envelopes.get(id))
        .filter_map(|bytes| SignedEvent::decode(bytes).ok())
        .filter_map(|event| match event.body.payload {
            Payload::SkillPublish(p) => Some(p.blob),
            Payload::BlobHost(h) => Some(h.blob),
            _ => None,
        })
        .collect()
}

/// Whether any of `blobs` is stored here: its root is then recorded while no GC pass is
/// sweeping. (Even a pinned one: its pin may be removed between this check and the commit.
/// An absent blob has nothing to lose.)
async fn unheld(store: &meshnode_store::Store, blobs: &[BlobHash]) -> bool {
    for blob in blobs {
        if store.has(blob).await.unwrap_or(true) {
            return true;
        }
    }
    false
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
                .push((*blob.as_bytes(), (*id.as_bytes(), *since)));
        }
        r.pending_remove = woken_pending.iter().map(|b| *b.as_bytes()).collect();
        r.delivered = delivered_rows(&jobs, &overlay);
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

/// (event id, peer) of the jobs that came from a peer's log and were accepted in this batch.
fn delivered_rows(jobs: &[Job], overlay: &crate::fold::Overlay) -> Vec<([u8; 32], [u8; 32])> {
    let mut from: HashMap<EventId, [u8; 32]> = HashMap::new();
    for job in jobs {
        if let Some(peer) = job.from {
            // The first delivery in the batch wins, as across batches.
            from.entry(job.event.id).or_insert(peer);
        }
    }
    if from.is_empty() {
        return Vec::new();
    }
    overlay
        .accepted
        .iter()
        .filter_map(|id| from.get(id).map(|peer| (*id.as_bytes(), *peer)))
        .collect()
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
    // Envelopes whose pending rows go (they applied, or were refused once woken).
    let mut woken: HashSet<BlobHash> = HashSet::new();
    // By envelope: two envelopes of one body (one forged) are both tried.
    let mut seen_in_batch: HashSet<BlobHash> = HashSet::new();
    let mut queue: std::collections::VecDeque<PendingEntry> = Default::default();
    let mut accepted_events: Vec<Arc<SignedEvent>> = Vec::new();

    let apply_one = |event: &Arc<SignedEvent>,
                     verified_with: Option<AuthorKey>,
                     state: &mut State,
                     overlay: &mut Overlay,
                     frontier: &mut Frontier,
                     tree_nodes: &mut Vec<(u8, u64, TreeHash)>|
     -> Result<Outcome> {
        let blob = BlobHash::of(&event.envelope);
        Ok(
            match state.apply(&shared.rules, &view, overlay, event, blob, verified_with) {
                Ok(Applied::Accepted(record)) => {
                    tree_nodes.extend(frontier.push(tlog::leaf_hash(&record.id)));
                    Outcome::Accepted(record)
                }
                Ok(Applied::Duplicate(record)) => Outcome::Duplicate(record),
                Ok(Applied::Waiting(w)) => Outcome::Pending(w, blob),
                Err(e) if e.is_rejection() => Outcome::Rejected(e),
                // A failure of this node (database, store) is not a verdict on the event:
                // the batch fails, and the worker reloads and tries again.
                Err(e) => return Err(e),
            },
        )
    };

    for (job, verified_with) in jobs.iter().zip(verified) {
        let event = &job.event;
        if !seen_in_batch.insert(BlobHash::of(&event.envelope)) {
            // The same event twice in one batch: the second is a duplicate of the first.
            match overlay.events.get(&event.id).cloned() {
                Some(record) => outcomes.push(Outcome::Duplicate(record)),
                None => outcomes.push(Outcome::Rejected(reject(
                    Rule::DuplicateSubmission,
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
        )?;
        if job.from.is_some() && matches!(outcome, Outcome::Pending(..)) {
            // Read from a peer's log, which is in acceptance order: what it names must be
            // here already. Such an event never takes a place in the pending set.
            outcome = Outcome::Rejected(reject(
                Rule::OutOfOrder,
                "the peer sent an event before what it depends on (a log is in acceptance order)",
            ));
        }
        if let Outcome::Pending(w, blob) = &outcome {
            // Trusted: a known log, signed by the key it uses now (the parallel pre-check).
            let trusted = verified_with.is_some() && state.authors.contains_key(&event.body.author);
            if pending.contains(event) {
                // Already waiting: same answer, nothing new stored.
            } else if let Some(since_ms) = job.since_ms {
                // Reloaded from the index: admitted before, its row is there.
                pending.insert(event.clone(), w, instant_of_ms(since_ms), trusted);
            } else if let Err(e) = pending.admit(event, trusted, pending_max) {
                outcome = Outcome::Rejected(e);
            } else {
                pending.insert(event.clone(), w, Instant::now(), trusted);
                new_pending.push((event.id, *blob, now_ms(), event.envelope.clone()));
            }
        }
        if job.since_ms.is_some() && !matches!(outcome, Outcome::Pending(..)) {
            // A reloaded waiting event that applied, was a duplicate or was refused: its row goes.
            woken.insert(BlobHash::of(&event.envelope));
        }
        if let Outcome::Accepted(record) = &outcome {
            accepted_events.push(event.clone());
            for entry in pending.woken_by(record) {
                woken.insert(BlobHash::of(&entry.event.envelope));
                queue.push_back(entry);
            }
        }
        outcomes.push(outcome);
        // Waiting events woken by this one apply right after it, in this batch.
        while let Some(entry) = queue.pop_front() {
            let event = entry.event;
            match apply_one(&event, None, state, &mut overlay, frontier, &mut tree_nodes)? {
                Outcome::Accepted(record) => {
                    accepted_events.push(event.clone());
                    for entry in pending.woken_by(&record) {
                        woken.insert(BlobHash::of(&entry.event.envelope));
                        queue.push_back(entry);
                    }
                }
                Outcome::Pending(w, blob) => {
                    // Still missing something else: wait again (its envelope is stored).
                    pending.insert(event.clone(), &w, entry.since, entry.trusted);
                    woken.remove(&blob);
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
    let woken: Vec<BlobHash> = woken.into_iter().collect();
    Ok((
        jobs,
        outcomes,
        overlay,
        tree_nodes,
        new_pending,
        woken,
        accepted_events,
    ))
}
