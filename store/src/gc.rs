//! Garbage collection: iroh-blobs' mark-and-sweep, driven and protected by our own state.
//!
//! iroh-blobs runs GC in a loop and asks a "protect" callback for extra live hashes before
//! each run. We make that callback the scheduler: it waits for a timer or an explicit
//! request, collects roots from every registered [`GcRoots`] hook, and drops quarantined
//! hashes. The next invocation marks the end of the previous run.
//!
//! No lock is shared with writers. A blob being written is protected by iroh-blobs itself
//! (its temp tag, and its "written since the last mark" set); a writer that recorded the
//! blob's root *retires* its temp tag into the [`Window`] instead of dropping it, and the
//! window keeps it until the pass that might have missed the root has finished. So an upload
//! that takes an hour never delays a GC, and a GC never delays a write for longer than the
//! roots take to record (the snapshot mutex, held only by passes). GC waits, once, for every
//! root hook to be registered ([`GcShared::arm`]): a pass at start-up (say, the purge of a
//! corrupt blob found by the recovery scrub) must not run before the ledger's roots exist.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh_blobs::Hash;
use iroh_blobs::api::TempTag;
use iroh_blobs::store::{GcConfig, ProtectOutcome};
use meshnode_schemas::BlobHash;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Outstanding explicit GC requests, bounded.
const GC_REQUESTS_MAX: usize = 64;

/// Free space a GC pass needs to record its deletions. Below it the pass is skipped and
/// reported, and the next one tries again: iroh-blobs' collector stops for good after an
/// error, and a full disk is when operators run GC.
pub(crate) const GC_FREE_MIN: u64 = 4 << 20;

/// Longest an iroh-blobs pass may run (mark and sweep) before its collector is taken for
/// stopped.
pub(crate) const PASS_MAX: Duration = Duration::from_secs(3600);

/// How long an explicit GC request waits for its run before reporting failure.
pub(crate) const GC_WAIT_MAX: Duration = Duration::from_secs(600);

/// A source of GC roots other than pins, e.g. the ledger (event envelopes and the weights of
/// hosted skills). Called from a blocking thread before each GC run; an error aborts the run,
/// so that nothing is deleted when the set of live blobs is unknown.
pub trait GcRoots: Send + Sync + 'static {
    /// Adds every hash this component needs kept to `roots`.
    fn add_roots(&self, roots: &mut HashSet<BlobHash>) -> std::result::Result<(), String>;
}

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

/// How garbage collection has fared since the store opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcHealth {
    /// Finished runs (iroh-blobs' sweep and the small-blob sweep each count).
    pub runs: u64,
    /// Failed runs.
    pub failures: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Whether iroh-blobs' collector stopped after an error (it does not restart itself;
    /// explicit and scheduled runs then fail until the node restarts).
    pub stopped: bool,
}

/// Protection of blobs whose roots are recorded while a GC pass runs.
///
/// A pass records roots once (under [`GcShared::snapshot`]) and deletes later. A blob whose
/// root is recorded after that snapshot is invisible to the pass, so the writer's hold on
/// it must outlast the pass: writers *retire* their temp tags (and small-blob hashes) here
/// instead of dropping them, and the window keeps them until every open pass finished.
/// Writers never wait for a pass; a pass never waits for a writer.
#[derive(Default)]
struct Window {
    /// Passes that recorded roots and have not finished deleting.
    open: usize,
    /// Temp tags retired while a pass was open.
    tags: Vec<TempTag>,
    /// Small blobs retired while a pass was open.
    small: HashSet<BlobHash>,
    /// Small blobs being written (stored, root not yet recorded), with a count of writers.
    small_in_flight: HashMap<BlobHash, usize>,
}

pub(crate) struct GcShared {
    hooks: Mutex<Vec<Arc<dyn GcRoots>>>,
    /// Hashes that must be deleted on the next run even if something references them, with
    /// whether they were pinned (their pin tag is away while the purge runs).
    pub(crate) quarantined: Mutex<HashMap<BlobHash, bool>>,
    requests_tx: mpsc::Sender<Waiter>,
    requests_rx: tokio::sync::Mutex<mpsc::Receiver<Waiter>>,
    /// The iroh-blobs pass in progress: when it took its roots, and its waiters (answered
    /// when it ends).
    running: Mutex<Option<(std::time::Instant, Vec<Waiter>)>>,
    /// Whether an iroh-blobs pass is between its roots and its end (pins wait for it).
    iroh_pass: tokio::sync::watch::Sender<bool>,
    /// Serializes root snapshots and the small-blob sweep. Writers never take it.
    snapshot: tokio::sync::Mutex<()>,
    window: Mutex<Window>,
    /// GC waits until every root hook is registered ([`GcShared::arm`]).
    armed: tokio::sync::watch::Sender<bool>,
    health: Mutex<GcHealth>,
    /// The store's directory (for its free space).
    root: std::path::PathBuf,
    /// The store is shutting down (the collector's end is not a failure).
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Bumped after every pass that may have deleted something (caches forget on change).
    generation: std::sync::atomic::AtomicU64,
    interval: Duration,
}

impl std::fmt::Debug for GcShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcShared")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// Closes a window pass when dropped (every path out of a pass, errors included).
pub(crate) struct Pass<'a>(&'a GcShared);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A hold on a small blob, released when dropped.
pub(crate) struct SmallHold<'a> {
    gc: &'a GcShared,
    hash: BlobHash,
}

impl Drop for SmallHold<'_> {
    fn drop(&mut self) {
        self.gc.small_end(self.hash);
    }
}

/// Lives inside iroh-blobs' GC configuration: dropped when its collector loop ends, which
/// it only does after an error.
struct LoopAlive(Arc<GcShared>);

impl Drop for LoopAlive {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.collector_stopped(
            "the blob collector stopped after an error (see the node log); restart the node to \
             resume garbage collection",
        );
    }
}

impl GcShared {
    /// The iroh-blobs collector's loop ended (or stopped answering): closes its pass, answers
    /// its waiters, and marks GC stopped.
    fn collector_stopped(&self, message: &str) {
        let shared = self;
        let waiters = lock(&shared.running).take().map(|(_, w)| w);
        if waiters.is_some() {
            shared.iroh_pass.send_replace(false);
            shared.close();
        }
        if shared.closing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        {
            let mut health = lock(&shared.health);
            health.failures += 1;
            health.stopped = true;
            health.last_error = Some(message.into());
        }
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(Err(message.into()));
        }
        tracing::error!("{message}");
    }

    /// Watches the iroh-blobs pass in progress: a healthy collector calls back within
    /// [`PASS_MAX`] of taking its roots. One that does not has stopped (its loop ends after
    /// an error, and iroh-blobs keeps our callback alive, so nothing else tells us): the
    /// pass is closed so that retired holds stop piling up, and GC is reported stopped.
    pub(crate) fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let stuck = lock(&shared.running)
                    .as_ref()
                    .is_some_and(|(at, _)| at.elapsed() > PASS_MAX);
                if stuck {
                    shared.collector_stopped(
                        "the blob collector did not finish a pass in time and is taken for \
                         stopped (see the node log); restart the node to resume garbage \
                         collection",
                    );
                }
            }
        });
    }

    /// Returns with the snapshot mutex held and no iroh-blobs pass open: a pin set while
    /// holding it is seen by the next pass's mark, and no pass can sweep past it.
    pub(crate) async fn hold_off_passes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let mut open = self.iroh_pass.subscribe();
        loop {
            let _ = tokio::time::timeout(PASS_MAX, open.wait_for(|o| !*o)).await;
            let guard = self.snapshot.lock().await;
            if !*self.iroh_pass.borrow() {
                return guard;
            }
        }
    }
}

/// Bytes free for this process on the filesystem holding `path` (`statvfs`).
pub(crate) fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("invariant: GC locks are never poisoned")
}

impl GcShared {
    pub(crate) fn new(interval: Duration, armed: bool, root: std::path::PathBuf) -> Arc<Self> {
        let (requests_tx, requests_rx) = mpsc::channel(GC_REQUESTS_MAX);
        Arc::new(Self {
            hooks: Mutex::new(Vec::new()),
            quarantined: Mutex::new(HashMap::new()),
            requests_tx,
            requests_rx: tokio::sync::Mutex::new(requests_rx),
            running: Mutex::new(None),
            iroh_pass: tokio::sync::watch::Sender::new(false),
            snapshot: tokio::sync::Mutex::new(()),
            window: Mutex::new(Window::default()),
            armed: tokio::sync::watch::Sender::new(armed),
            health: Mutex::new(GcHealth::default()),
            root,
            closing: std::sync::atomic::AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
            interval,
        })
    }

    pub(crate) fn add_hook(&self, hook: Arc<dyn GcRoots>) {
        lock(&self.hooks).push(hook);
    }

    /// Lets GC run: every root hook is registered.
    pub(crate) fn arm(&self) {
        self.armed.send_replace(true);
    }

    async fn wait_armed(&self) {
        let mut armed = self.armed.subscribe();
        // The sender lives in `self`, so this only ends when armed.
        let _ = armed.wait_for(|a| *a).await;
    }

    pub(crate) fn health(&self) -> GcHealth {
        lock(&self.health).clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn finished(&self, result: &std::result::Result<(), String>) {
        let mut health = lock(&self.health);
        match result {
            Ok(()) => health.runs += 1,
            Err(e) => {
                health.failures += 1;
                health.last_error = Some(e.clone());
            }
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Opens a pass: from here until it is dropped, retired holds are kept.
    pub(crate) fn open(&self) -> Pass<'_> {
        lock(&self.window).open += 1;
        Pass(self)
    }

    fn close(&self) {
        let mut window = lock(&self.window);
        debug_assert!(window.open > 0, "a GC pass closed that was never opened");
        window.open = window.open.saturating_sub(1);
        if window.open == 0 {
            window.tags.clear();
            window.small.clear();
        }
    }

    /// A writer is done with `tag`: its root is recorded (or it is not meant to live).
    pub(crate) fn retire(&self, tag: TempTag) {
        let quarantined =
            lock(&self.quarantined).contains_key(&BlobHash::from_bytes(*tag.hash().as_bytes()));
        let mut window = lock(&self.window);
        if window.open > 0 && !quarantined {
            window.tags.push(tag);
        }
    }

    /// Holds a small blob (as [`GcShared::small_begin`]) until the guard is dropped.
    pub(crate) fn hold_small(&self, hash: BlobHash) -> SmallHold<'_> {
        self.small_begin(hash);
        SmallHold { gc: self, hash }
    }

    /// A writer stored a small blob whose root is not recorded yet.
    pub(crate) fn small_begin(&self, hash: BlobHash) {
        self.small_begin_many(std::slice::from_ref(&hash));
    }

    /// [`GcShared::small_begin`] for many, under one lock.
    pub(crate) fn small_begin_many(&self, hashes: &[BlobHash]) {
        let mut window = lock(&self.window);
        for hash in hashes {
            *window.small_in_flight.entry(*hash).or_insert(0) += 1;
        }
    }

    /// The writer of a small blob is done with it.
    pub(crate) fn small_end(&self, hash: BlobHash) {
        self.small_end_many(std::slice::from_ref(&hash));
    }

    /// [`GcShared::small_end`] for many, under one lock.
    pub(crate) fn small_end_many(&self, hashes: &[BlobHash]) {
        let mut window = lock(&self.window);
        for hash in hashes {
            if let std::collections::hash_map::Entry::Occupied(mut e) =
                window.small_in_flight.entry(*hash)
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
            if window.open > 0 {
                window.small.insert(*hash);
            }
        }
    }

    /// Whether a small blob is being written or was retired during an open pass.
    pub(crate) fn small_held(&self, hash: &BlobHash) -> bool {
        let window = lock(&self.window);
        window.small_in_flight.contains_key(hash) || window.small.contains(hash)
    }

    /// The iroh-blobs GC configuration whose callback drives our schedule.
    pub(crate) fn config(self: &Arc<Self>) -> GcConfig {
        let alive = Arc::new(LoopAlive(self.clone()));
        GcConfig {
            // The callback itself waits for the schedule; this only spaces the runs.
            interval: Duration::from_millis(1),
            add_protected: Some(Arc::new(move |live| {
                let shared = alive.0.clone();
                Box::pin(async move { shared.before_run(live).await })
            })),
        }
    }

    /// The roots every hook reports now.
    async fn roots(&self) -> std::result::Result<HashSet<BlobHash>, String> {
        let hooks: Vec<Arc<dyn GcRoots>> = lock(&self.hooks).clone();
        tokio::task::spawn_blocking(move || {
            let mut roots = HashSet::new();
            for hook in hooks {
                hook.add_roots(&mut roots)?;
            }
            Ok(roots)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Opens a pass for the small-blob sweep and records its roots. Holds written or
    /// retired while the returned [`Pass`] lives are kept; report the sweep's result with
    /// [`GcShared::small_done`].
    pub(crate) async fn small_pass(&self) -> Result<(Pass<'_>, HashSet<BlobHash>)> {
        self.wait_armed().await;
        let snapshot = self.snapshot.lock().await;
        let pass = self.open();
        let roots = self.roots().await.map_err(Error::Gc);
        drop(snapshot);
        match roots {
            Ok(roots) => Ok((pass, roots)),
            Err(e) => {
                drop(pass);
                self.finished(&Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Records how a small-blob sweep ended.
    pub(crate) fn small_done<T>(&self, result: &Result<T>) {
        self.finished(&result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    }

    /// An error when the disk is too full for a pass to record its deletions.
    fn enough_space(&self) -> std::result::Result<(), String> {
        let free = free_bytes(&self.root)
            .map_err(|e| format!("cannot read the free space of {}: {e}", self.root.display()))?;
        if free < GC_FREE_MIN {
            return Err(format!(
                "the disk is full ({free} bytes free): a GC pass needs {GC_FREE_MIN} bytes to \
                 record its deletions; free some space (or grow the disk) and run it again"
            ));
        }
        Ok(())
    }

    /// Requests a GC run and waits until it finished.
    pub(crate) async fn run_now(&self) -> Result<()> {
        if let Some(e) = self.health().last_error.filter(|_| self.health().stopped) {
            return Err(Error::Gc(e));
        }
        let (tx, rx) = oneshot::channel();
        self.requests_tx.try_send(tx).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Gc("too many garbage collections are waiting; retry later".into())
            }
            mpsc::error::TrySendError::Closed(_) => Error::Gc("garbage collector stopped".into()),
        })?;
        match tokio::time::timeout(GC_WAIT_MAX, rx).await {
            Ok(Ok(result)) => result.map_err(Error::Gc),
            Ok(Err(_)) => Err(Error::Gc("garbage collector stopped".into())),
            Err(_) => Err(Error::Gc(
                "garbage collection did not finish in time".into(),
            )),
        }
    }

    async fn before_run(&self, live: &mut HashSet<Hash>) -> ProtectOutcome {
        // The collector is alive: a stop the watchdog reported (a pass slower than
        // PASS_MAX) no longer holds.
        {
            let mut health = lock(&self.health);
            if health.stopped
                && health
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("in time"))
            {
                health.stopped = false;
            }
        }
        // Reaching here again means the previous pass (if any) finished its sweep.
        if let Some((_, waiters)) = lock(&self.running).take() {
            self.iroh_pass.send_replace(false);
            self.close();
            self.finished(&Ok(()));
            for waiter in waiters {
                let _ = waiter.send(Ok(()));
            }
        }
        let mut waiters = Vec::new();
        {
            let mut requests = self.requests_rx.lock().await;
            tokio::select! {
                request = requests.recv() => {
                    match request {
                        Some(waiter) => waiters.push(waiter),
                        // Every handle is gone: the store is shutting down.
                        None => return ProtectOutcome::Abort,
                    }
                }
                _ = tokio::time::sleep(self.interval) => {}
            }
            while let Ok(waiter) = requests.try_recv() {
                waiters.push(waiter);
            }
        }
        self.wait_armed().await;
        if let Err(e) = self.enough_space() {
            tracing::warn!("gc run skipped: {e}");
            self.finished(&Err(e.clone()));
            for waiter in waiters {
                let _ = waiter.send(Err(e.clone()));
            }
            return ProtectOutcome::Abort;
        }
        let snapshot = self.snapshot.lock().await;
        let pass = self.open();
        let roots = self.roots().await;
        let roots = match roots {
            Ok(roots) => roots,
            Err(e) => {
                drop(snapshot);
                tracing::warn!("gc run aborted: a root hook failed: {e}");
                let error = format!("a root hook failed: {e}");
                drop(pass);
                self.finished(&Err(error.clone()));
                for waiter in waiters {
                    let _ = waiter.send(Err(error.clone()));
                }
                return ProtectOutcome::Abort;
            }
        };
        let quarantined = lock(&self.quarantined).clone();
        live.extend(
            roots
                .into_iter()
                .filter(|h| !quarantined.contains_key(h))
                .map(|h| Hash::from_bytes(*h.as_bytes())),
        );
        // The pass stays open until iroh-blobs calls back again (or its loop ends); pins
        // wait for it (`hold_off_passes`), so it is marked open before the snapshot mutex
        // is released.
        std::mem::forget(pass);
        *lock(&self.running) = Some((std::time::Instant::now(), waiters));
        self.iroh_pass.send_replace(true);
        drop(snapshot);
        ProtectOutcome::Continue
    }
}
