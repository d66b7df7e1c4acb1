//! Document sessions over `/meshnode/sync/1`: this node's own documents kept up to date
//! from its ledger, served to peers, and its read-only replicas of its peers' documents.
//!
//! Automerge never runs on an async worker: every call (checks included) runs on a blocking
//! thread, at most [`WORKERS`] at once, within [`BUDGET`]; a call past the budget, a panic
//! in one or a message that fails its checks ends the session and scores the peer
//! [`SCORE_DOC`] (a ban at the default threshold).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::sync::SyncDoc;
use iroh::endpoint::{Connection, RecvStream, SendStream};

use crate::amcheck;
use crate::docs::{self, DocKind, HeadsHint, Own, Replica};
use crate::error::{Error, Result};
use crate::mesh::{Inner, lock};
use crate::wire::{self, Header, Request};

/// Automerge calls at once (each on a blocking thread).
const WORKERS: usize = 2;
/// Longest an automerge call may take.
const BUDGET: Duration = Duration::from_secs(2);
/// Score of a peer whose document message fails its checks, panics automerge or runs past
/// the budget.
pub(crate) const SCORE_DOC: u32 = 100;
/// Change bytes one replica may hold.
const REPLICA_BYTES_MAX: usize = 32 << 20;
/// Change bytes all replicas together may hold.
const REPLICAS_BYTES_MAX: usize = 512 << 20;
/// How often the own documents are brought up to date (writes are coalesced to one change
/// per document per interval).
const COALESCE: Duration = Duration::from_millis(250);
/// The catalog is rewritten at most this often.
const CATALOG_EVERY: u32 = 8;
/// An own document's epoch is at least this old before its history can start a new one.
const EPOCH_MIN_AGE: Duration = Duration::from_secs(600);
/// A peer's catalog is synced at most this often.
pub(crate) const CATALOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the hints say of one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerHints {
    pub(crate) heads: Option<HeadsHint>,
    /// (entries, entries whose event this node lacks).
    pub(crate) catalog: Option<(u64, u64)>,
    pub(crate) sessions: u64,
    /// Round trips of those sessions (the request's, and one per message answered).
    pub(crate) round_trips: u64,
}

/// A replica, locked by the session that syncs it and by the hint readers.
type SharedReplica = Arc<Mutex<Replica>>;

/// A replica with what async code reads of it without taking its lock (a blocking thread
/// may hold that for a whole automerge call).
#[derive(Clone)]
struct Slot {
    epoch: u64,
    /// Change bytes taken in (what the caps count).
    bytes: Arc<AtomicUsize>,
    replica: SharedReplica,
}

impl Slot {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            bytes: Arc::default(),
            replica: Arc::new(Mutex::new(Replica::new())),
        }
    }
}

/// The documents of a node: its own, and its replicas of its peers'.
pub(crate) struct Docs {
    pub(crate) own: Mutex<Own>,
    replicas: Mutex<HashMap<(String, DocKind), Slot>>,
    pub(crate) hints: Mutex<HashMap<String, PeerHints>>,
    workers: tokio::sync::Semaphore,
    replica_bytes: AtomicUsize,
}

impl Docs {
    pub(crate) fn new(owner: [u8; 32]) -> Self {
        Self {
            own: Mutex::new(Own::new(owner)),
            replicas: Mutex::default(),
            hints: Mutex::default(),
            workers: tokio::sync::Semaphore::new(WORKERS),
            replica_bytes: AtomicUsize::new(0),
        }
    }

    /// The epoch of our replica of `peer`'s document, if we hold one.
    fn epoch_of(&self, peer: &str, kind: DocKind) -> Option<u64> {
        let replicas = lock(&self.replicas);
        replicas.get(&(peer.to_string(), kind)).map(|s| s.epoch)
    }

    /// The replica of `peer`'s document in `epoch` (a new one when the epoch changed).
    fn replica(&self, peer: &str, kind: DocKind, epoch: u64) -> Slot {
        let mut replicas = lock(&self.replicas);
        let slot = replicas
            .entry((peer.to_string(), kind))
            .or_insert_with(|| Slot::new(epoch));
        if slot.epoch != epoch {
            self.forget(slot);
            *slot = Slot::new(epoch);
        }
        slot.clone()
    }

    /// Counts `took` bytes against `slot` and all replicas, if the slot is still the peer's
    /// (a replica dropped meanwhile is counted no more).
    fn charge(&self, peer: &str, kind: DocKind, slot: &Slot, took: usize) {
        let replicas = lock(&self.replicas);
        if replicas
            .get(&(peer.to_string(), kind))
            .is_some_and(|s| Arc::ptr_eq(&s.bytes, &slot.bytes))
        {
            slot.bytes.fetch_add(took, Ordering::Relaxed);
            self.replica_bytes.fetch_add(took, Ordering::Relaxed);
        }
    }

    fn forget(&self, slot: &Slot) {
        let bytes = slot.bytes.swap(0, Ordering::Relaxed);
        self.replica_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Drops a peer's replicas (a misbehaving or forgotten peer).
    pub(crate) fn drop_peer(&self, peer: &str) {
        let mut replicas = lock(&self.replicas);
        for kind in [DocKind::Heads, DocKind::Catalog] {
            if let Some(r) = replicas.remove(&(peer.to_string(), kind)) {
                self.forget(&r);
            }
        }
        lock(&self.hints).remove(peer);
    }

    /// Runs `f` on a blocking thread within the budget; a panic or an overrun is an error
    /// (the thread of an overrun runs on, but no longer holds a worker slot).
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let _permit = self
            .workers
            .acquire()
            .await
            .map_err(|_| Error::transport("stopping"))?;
        match tokio::time::timeout(BUDGET, tokio::task::spawn_blocking(f)).await {
            Err(_) => Err(Error::protocol("automerge work ran past its time budget")),
            Ok(Err(e)) => Err(Error::protocol(format!("automerge work failed: {e}"))),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

/// Keeps the own documents up to date with the ledger, one change per document per
/// [`COALESCE`] at most, until the mesh is dropped.
pub(crate) async fn write_own(inner: std::sync::Weak<Inner>) {
    let mut tick = 0u32;
    let mut seen = None;
    loop {
        tokio::time::sleep(COALESCE).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        tick = tick.wrapping_add(1);
        let size = inner.ledger.tree_size().ok();
        let catalog = tick % CATALOG_EVERY == 1;
        if size == seen && !catalog {
            continue;
        }
        let i = inner.clone();
        let done = inner
            .docs
            .run(move || {
                let mut own = lock(&i.docs.own);
                let result = own.refresh(&i.ledger, catalog);
                for kind in [DocKind::Heads, DocKind::Catalog] {
                    if own.doc(kind).outgrown(EPOCH_MIN_AGE) {
                        tracing::info!(
                            "own {kind:?} document: history outgrew the data; new epoch"
                        );
                        own.doc(kind).renew();
                    }
                }
                result
            })
            .await;
        match done {
            Ok(Ok(())) => seen = size,
            Ok(Err(e)) => tracing::warn!("own documents not written: {e}"),
            Err(e) => tracing::warn!("own documents not written: {e}"),
        }
    }
}

/// Serves a `Doc` session of the own document `kind` to `id`.
pub(crate) async fn serve(
    inner: &Arc<Inner>,
    id: &str,
    send: &mut SendStream,
    recv: &mut RecvStream,
    kind: DocKind,
) -> Result<()> {
    let epoch = lock(&inner.docs.own).doc(kind).epoch();
    let header = Header {
        size: inner.ledger.tree_size()?,
        epoch: Some(epoch),
        ..Header::default()
    };
    wire::write_json(send, &header).await?;
    let mut state = Some(automerge::sync::State::new());
    for _ in 0..wire::DOC_ROUNDS_MAX {
        let read = wire::read_frame(recv, amcheck::ASK_BYTES_MAX);
        let Some(frame) = tokio::time::timeout(crate::mesh::REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| Error::transport("the peer went quiet in a document session"))??
        else {
            break;
        };
        let (i, mut st) = (inner.clone(), state.take().expect("state is put back"));
        let answered = inner
            .docs
            .run(move || {
                let ask = amcheck::check_ask(&frame).map_err(|e| e.to_string())?;
                let mut own = lock(&i.docs.own);
                let doc = own.doc(kind);
                if doc.epoch() != epoch {
                    return Ok((st, None));
                }
                doc.doc()
                    .receive_sync_message(&mut st, ask)
                    .map_err(|e| format!("automerge refused the message: {e}"))?;
                let reply = doc.doc().generate_sync_message(&mut st).map(|mut m| {
                    m.flags = None;
                    m.encode()
                });
                Ok((st, reply))
            })
            .await
            .and_then(|r: std::result::Result<_, String>| r.map_err(Error::protocol));
        let (st, reply) = match answered {
            Ok(v) => v,
            Err(e) => {
                inner.penalise(id, SCORE_DOC, &e.to_string());
                return Err(e);
            }
        };
        state = Some(st);
        wire::write_frame(send, reply.as_deref().unwrap_or(&[])).await?;
    }
    send.finish().map_err(Error::transport)
}

/// What a heads session says: the hint, and the owner's log size when it answered.
pub(crate) struct HeadsSeen {
    pub(crate) hint: HeadsHint,
    pub(crate) size: u64,
}

/// Syncs our replica of `id`'s document `kind`; for `heads`, what it says against our
/// ledger. A peer that does not serve documents (`Refused`) is not at fault.
pub(crate) async fn pull(
    inner: &Arc<Inner>,
    id: &str,
    conn: &Connection,
    kind: DocKind,
) -> Result<Option<HeadsSeen>> {
    let result = session(inner, id, conn, kind).await;
    if let Err(e @ Error::Protocol(_)) = &result {
        inner.docs.drop_peer(id);
        inner.penalise(id, SCORE_DOC, &e.to_string());
    }
    let (replica, size, round_trips) = result?;
    let i = inner.clone();
    let hint = inner
        .docs
        .run(move || {
            let r = lock(&replica);
            match kind {
                DocKind::Heads => docs::heads_hint(&r.doc, &i.ledger).map(|h| (Some(h), None)),
                DocKind::Catalog => Ok((None, Some(docs::catalog_hint(&r.doc, &i.ledger)))),
            }
        })
        .await
        // Our own work running late is not the peer's fault.
        .map_err(|e| Error::transport(e.to_string()))??;
    let mut hints = lock(&inner.docs.hints);
    let entry = hints.entry(id.to_string()).or_default();
    entry.sessions += 1;
    entry.round_trips += round_trips;
    match hint {
        (Some(h), _) => {
            entry.heads = Some(h);
            Ok(Some(HeadsSeen { hint: h, size }))
        }
        (_, c) => {
            entry.catalog = c;
            Ok(None)
        }
    }
}

/// One session: our replica, brought up to the owner's heads (at most the round cap), the
/// owner's log size, and the round trips it took. Our first message goes with the request
/// when we hold a replica of the owner's document already (the usual case), so a session
/// in which nothing changed is one round trip; if the owner started a new document since
/// (it restarted), the session starts over once without it.
async fn session(
    inner: &Arc<Inner>,
    id: &str,
    conn: &Connection,
    kind: DocKind,
) -> Result<(Arc<Mutex<Replica>>, u64, u64)> {
    let guess = inner.docs.epoch_of(id, kind);
    match session_from(inner, id, conn, kind, guess).await? {
        Some(done) => Ok(done),
        None => session_from(inner, id, conn, kind, None)
            .await?
            .ok_or_else(|| Error::transport("the owner's document changed twice in a session")),
    }
}

/// A session whose first message was generated from our replica of epoch `guess` and sent
/// with the request; `None` when the owner's epoch turned out to be another.
async fn session_from(
    inner: &Arc<Inner>,
    id: &str,
    conn: &Connection,
    kind: DocKind,
    guess: Option<u64>,
) -> Result<Option<(Arc<Mutex<Replica>>, u64, u64)>> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(Error::transport)?;
    let request = Request::Doc {
        net: inner.net.clone(),
        kind,
    };
    wire::write_json(&mut send, &request).await?;
    let mut early = false;
    if let Some(guess) = guess {
        let r = inner.docs.replica(id, kind, guess).replica;
        let ask = inner
            .docs
            .run(move || {
                let mut r = lock(&r);
                r.new_session();
                r.generate()
            })
            .await?;
        if let Some(ask) = ask {
            wire::write_frame(&mut send, &ask).await?;
            early = true;
        }
    }
    let header: Header = wire::read_json(&mut recv, wire::HEADER_BYTES_MAX).await?;
    if let Some(code) = header.error {
        return Err(Error::Refused {
            code,
            message: header.message.unwrap_or_default(),
        });
    }
    let epoch = header
        .epoch
        .ok_or_else(|| Error::protocol("a document session without an epoch"))?;
    if early && guess != Some(epoch) {
        // Our message was about a document the owner no longer has: its answer is not read,
        // and the replica starts over in the owner's new epoch.
        let _ = recv.stop(0u32.into());
        let _ = send.finish();
        inner.docs.replica(id, kind, epoch);
        return Ok(None);
    }
    let mut owner = [0u8; 32];
    hex::decode_to_slice(id, &mut owner).map_err(|_| Error::transport("bad peer id"))?;
    let actor = docs::actor(&owner, kind, epoch);
    let slot = inner.docs.replica(id, kind, epoch);
    let replica = slot.replica.clone();
    if !early {
        let r = replica.clone();
        inner.docs.run(move || lock(&r).new_session()).await?;
    }
    // The header's round trip; with an early message, its answer comes in the same one.
    let mut round_trips = 1;
    for round in 0..wire::DOC_ROUNDS_MAX {
        if !(early && round == 0) {
            let r = replica.clone();
            let Some(ask) = inner.docs.run(move || lock(&r).generate()).await? else {
                break;
            };
            wire::write_frame(&mut send, &ask).await?;
        }
        let read = wire::read_frame(&mut recv, amcheck::ANSWER_BYTES_MAX);
        let Some(answer) = tokio::time::timeout(crate::mesh::RESPONSE_TIMEOUT, read)
            .await
            .map_err(|_| Error::transport("the peer's answer timed out"))??
        else {
            break;
        };
        if !(early && round == 0) {
            round_trips += 1;
        }
        let n = answer.len();
        let total = inner.docs.replica_bytes.load(Ordering::Relaxed);
        if slot.bytes.load(Ordering::Relaxed) + n > REPLICA_BYTES_MAX
            || total + n > REPLICAS_BYTES_MAX
        {
            return Err(Error::protocol(format!(
                "the peer's {kind:?} document passes {REPLICA_BYTES_MAX} bytes (or all \
                 replicas {REPLICAS_BYTES_MAX})"
            )));
        }
        let (r, a) = (replica.clone(), actor.clone());
        let (took, in_step) = inner
            .docs
            .run(move || -> std::result::Result<(usize, bool), String> {
                let m = amcheck::check_answer(&answer, kind, &a).map_err(|e| e.to_string())?;
                let mut theirs = m.heads.clone();
                let took = if m.changes.is_empty() { 0 } else { n };
                let mut guard = lock(&r);
                let replica = &mut *guard;
                replica
                    .doc
                    .receive_sync_message(&mut replica.state, m)
                    .map_err(|e| format!("automerge refused the changes: {e}"))?;
                let mut ours = replica.heads();
                theirs.sort();
                ours.sort();
                Ok((took, theirs == ours))
            })
            .await?
            .map_err(Error::protocol)?;
        inner.docs.charge(id, kind, &slot, took);
        // The owner's heads come with every message: once ours equal them, we are in step.
        if in_step {
            break;
        }
    }
    wire::write_frame(&mut send, &[]).await?;
    send.finish().map_err(Error::transport)?;
    Ok(Some((replica, header.size, round_trips)))
}
