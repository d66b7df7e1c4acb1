//! Garbage collection: iroh-blobs' mark-and-sweep, driven and protected by our own state.
//!
//! iroh-blobs runs GC in a loop and asks a "protect" callback for extra live hashes before
//! each run. We make that callback the scheduler: it waits for a timer or an explicit
//! request, then takes the GC write lock (so no writer is between "bytes stored" and "root
//! recorded" while marking), collects roots from every registered [`GcRoots`] hook, and drops
//! quarantined hashes. The next invocation marks the end of the previous run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh_blobs::Hash;
use iroh_blobs::store::{GcConfig, ProtectOutcome};
use meshnode_schemas::BlobHash;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock, mpsc, oneshot};

use crate::error::{Error, Result};

/// Outstanding explicit GC requests, bounded.
const GC_REQUESTS_MAX: usize = 64;

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

pub(crate) struct GcShared {
    /// Writers hold this shared between storing bytes and recording what keeps them alive.
    pub(crate) lock: Arc<RwLock<()>>,
    hooks: Mutex<Vec<Arc<dyn GcRoots>>>,
    /// Hashes that must be deleted on the next run even if something references them, with
    /// whether they were pinned (their pin tag is away while the purge runs).
    pub(crate) quarantined: Mutex<HashMap<BlobHash, bool>>,
    requests_tx: mpsc::Sender<Waiter>,
    requests_rx: tokio::sync::Mutex<mpsc::Receiver<Waiter>>,
    running: tokio::sync::Mutex<Running>,
    interval: Duration,
}

#[derive(Default)]
struct Running {
    guard: Option<OwnedRwLockWriteGuard<()>>,
    waiters: Vec<Waiter>,
}

impl std::fmt::Debug for GcShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcShared")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl GcShared {
    pub(crate) fn new(interval: Duration) -> Arc<Self> {
        let (requests_tx, requests_rx) = mpsc::channel(GC_REQUESTS_MAX);
        Arc::new(Self {
            lock: Arc::new(RwLock::new(())),
            hooks: Mutex::new(Vec::new()),
            quarantined: Mutex::new(HashMap::new()),
            requests_tx,
            requests_rx: tokio::sync::Mutex::new(requests_rx),
            running: tokio::sync::Mutex::new(Running::default()),
            interval,
        })
    }

    pub(crate) fn add_hook(&self, hook: Arc<dyn GcRoots>) {
        self.hooks
            .lock()
            .expect("invariant: hook list lock is never poisoned")
            .push(hook);
    }

    /// The iroh-blobs GC configuration whose callback drives our schedule.
    pub(crate) fn config(self: &Arc<Self>) -> GcConfig {
        let shared = self.clone();
        GcConfig {
            // The callback itself waits for the schedule; this only spaces the runs.
            interval: Duration::from_millis(1),
            add_protected: Some(Arc::new(move |live| {
                let shared = shared.clone();
                Box::pin(async move { shared.before_run(live).await })
            })),
        }
    }

    /// The roots every hook reports now (for the small-blob sweep).
    pub(crate) async fn roots(&self) -> std::result::Result<HashSet<BlobHash>, String> {
        let hooks: Vec<Arc<dyn GcRoots>> = self
            .hooks
            .lock()
            .expect("invariant: hook list lock is never poisoned")
            .clone();
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

    /// Requests a GC run and waits until it finished.
    pub(crate) async fn run_now(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.requests_tx
            .send(tx)
            .await
            .map_err(|_| Error::Gc("garbage collector stopped".into()))?;
        match tokio::time::timeout(GC_WAIT_MAX, rx).await {
            Ok(Ok(result)) => result.map_err(Error::Gc),
            Ok(Err(_)) => Err(Error::Gc("garbage collector stopped".into())),
            Err(_) => Err(Error::Gc(
                "garbage collection did not finish in time".into(),
            )),
        }
    }

    async fn before_run(&self, live: &mut HashSet<Hash>) -> ProtectOutcome {
        let mut running = self.running.lock().await;
        // Reaching here again means the previous run (if any) finished its sweep.
        running.guard = None;
        for waiter in running.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        drop(running);

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

        let guard = self.lock.clone().write_owned().await;
        let hooks: Vec<Arc<dyn GcRoots>> = self
            .hooks
            .lock()
            .expect("invariant: hook list lock is never poisoned")
            .clone();
        let roots = tokio::task::spawn_blocking(move || {
            let mut roots = HashSet::new();
            for hook in hooks {
                hook.add_roots(&mut roots)?;
            }
            Ok::<_, String>(roots)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let roots = match roots {
            Ok(roots) => roots,
            Err(e) => {
                tracing::warn!("gc run aborted: a root hook failed: {e}");
                for waiter in waiters {
                    let _ = waiter.send(Err(format!("a root hook failed: {e}")));
                }
                drop(guard);
                return ProtectOutcome::Abort;
            }
        };
        let quarantined = self
            .quarantined
            .lock()
            .expect("invariant: quarantine lock is never poisoned")
            .clone();
        live.extend(
            roots
                .into_iter()
                .filter(|h| !quarantined.contains_key(h))
                .map(|h| Hash::from_bytes(*h.as_bytes())),
        );
        let mut running = self.running.lock().await;
        running.guard = Some(guard);
        running.waiters = waiters;
        ProtectOutcome::Continue
    }
}
