//! The blob store: iroh-blobs `FsStore` with durable adds, verified reads, pins, GC, quarantine.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bao_tree::ChunkRanges;
use bao_tree::io::EncodeError;
use bao_tree::io::mixed::EncodedItem;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use iroh_blobs::api::blobs::{AddPathOptions, AddProgressItem, BlobStatus, ImportMode};
use iroh_blobs::protocol::ChunkRangesExt;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::fs::options::{Options, PathOptions};
use iroh_blobs::{BlobFormat, Hash, HashAndFormat};
use meshnode_schemas::BlobHash;

use crate::barrier::Barrier;
use crate::error::{Error, Result, backend};
use crate::gc::{GcHealth, GcRoots, GcShared};
use crate::quarantine::Journal;
use crate::small::{SMALL_BYTES_MAX, SmallBlobs};

/// Tag-name prefix of pins. A pin of blob `h` is the iroh-blobs tag `pin/<hex of h>`.
const PIN_PREFIX: &str = "pin/";

/// Reads being started at once (each holds a permit only until its first item arrives).
const READS_STARTING_MAX: usize = 16;

/// Attempts to start a read that iroh-blobs refuses as busy.
const READ_BUSY_RETRIES: u32 = 20;

fn is_busy(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ResourceBusy | std::io::ErrorKind::WouldBlock
    )
}

/// Largest blob [`Store::get_bytes`] returns in memory by default.
pub const GET_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Time between scheduled GC runs. Default: 10 minutes.
    pub gc_interval: Duration,
    /// GC waits for [`Store::enable_gc`], called once every [`GcRoots`] hook is registered
    /// (a node sets this: nothing may be collected before the ledger's roots are known).
    /// Default: false (GC may run at once).
    pub gc_waits_for_roots: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            gc_interval: Duration::from_secs(600),
            gc_waits_for_roots: false,
        }
    }
}

/// What an add stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Added {
    /// BLAKE3 of the bytes.
    pub hash: BlobHash,
    /// Size in bytes.
    pub size: u64,
}

/// Whether an add pins the blob (GC never removes pinned blobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinMode {
    /// Pin the blob (tag `pin/<hex>`), durably, before acknowledging.
    Pin,
    /// Do not pin; the caller protects the blob some other way (e.g. a ledger root) or lets
    /// GC collect it.
    NoPin,
}

/// What the store knows about one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobStat {
    /// Size in bytes (for a partial blob, the size if known, else 0).
    pub size: u64,
    /// Whether every byte is present.
    pub complete: bool,
    /// Whether the blob is pinned.
    pub pinned: bool,
}

/// A verified byte stream of (part of) a blob.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// A readable blob range: total size, the range served, and a stream of verified bytes.
pub struct BlobRead {
    /// The blob's size.
    pub size: u64,
    /// The byte range the stream yields.
    pub range: Range<u64>,
    /// The bytes, each piece verified against the hash before it is yielded. A mismatch ends
    /// the stream with [`Error::Corrupt`] and quarantines the blob.
    pub stream: ByteStream,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead")
            .field("size", &self.size)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

struct Inner {
    fs: FsStore,
    root: PathBuf,
    paths: PathOptions,
    barrier: Barrier,
    gc: Arc<GcShared>,
    journal: Journal,
    n_corrupt: AtomicU64,
    /// Bounds concurrent starts of reads: iroh-blobs refuses commands beyond a per-blob inbox.
    read_permits: tokio::sync::Semaphore,
    /// Blobs that failed one read and are being re-checked; not served meanwhile.
    suspect: std::sync::Mutex<HashSet<BlobHash>>,
    /// Small blobs written in groups (ledger envelopes).
    small: SmallBlobs,
    /// The data-dir lock, released by `shutdown` (or when the last handle drops).
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

/// The content-addressed blob store of a node. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn to_iroh(hash: &BlobHash) -> Hash {
    Hash::from_bytes(*hash.as_bytes())
}

fn from_iroh(hash: &Hash) -> BlobHash {
    BlobHash::from_bytes(*hash.as_bytes())
}

fn pin_tag(hash: &BlobHash) -> String {
    format!("{PIN_PREFIX}{}", hash.to_hex())
}

impl Store {
    /// Opens (or creates) the store under `root`, recovering from a crash if the previous
    /// process did not shut down cleanly: quarantines left half-done are completed and a
    /// background scrub verifies every blob.
    ///
    /// Errors with [`Error::Locked`] if another process has the directory open.
    pub async fn open(root: &Path, config: StoreConfig) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))?;
        lock.try_lock()
            .map_err(|_| Error::Locked(root.display().to_string()))?;
        let running_marker = root.join("RUNNING");
        let unclean = running_marker.exists();

        let gc = GcShared::new(
            config.gc_interval,
            !config.gc_waits_for_roots,
            root.to_path_buf(),
        );
        let mut options = Options::new(root);
        options.gc = Some(gc.config());
        let paths = options.path.clone();
        let fs = FsStore::load_with_opts(root.join("blobs.db"), options)
            .await
            .map_err(backend)?;
        let barrier = Barrier::start(fs.clone(), paths.data_path.clone());
        let journal = Journal::open(&root.join("quarantine.log"))?;
        let small = SmallBlobs::open(&root.join("small.redb"))?;
        std::fs::write(&running_marker, b"")?;
        std::fs::File::open(root)?.sync_all()?;
        let store = Store {
            inner: Arc::new(Inner {
                fs,
                root: root.to_path_buf(),
                paths,
                barrier,
                gc,
                journal,
                n_corrupt: AtomicU64::new(0),
                read_permits: tokio::sync::Semaphore::new(READS_STARTING_MAX),
                suspect: std::sync::Mutex::new(HashSet::new()),
                small,
                lock: std::sync::Mutex::new(Some(lock)),
            }),
        };
        store.inner.gc.watch();
        store.finish_pending_quarantines().await?;
        {
            // GC of the small-blob table, on the same schedule as iroh-blobs' GC.
            let sweeper = Arc::downgrade(&store.inner);
            let interval = config.gc_interval;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(inner) = sweeper.upgrade() else {
                        return;
                    };
                    let store = Store { inner };
                    if let Err(e) = store.sweep_small().await {
                        tracing::warn!("small blob GC failed: {e}");
                    }
                }
            });
        }
        if unclean {
            tracing::warn!("store was not shut down cleanly; verifying blobs in the background");
            let scrubber = store.clone();
            tokio::spawn(async move {
                match scrubber.scrub().await {
                    Ok(report) => tracing::info!(
                        n_checked = report.n_checked,
                        n_corrupt = report.n_corrupt,
                        "background scrub finished"
                    ),
                    Err(e) => tracing::warn!("background scrub failed: {e}"),
                }
            });
        }
        Ok(store)
    }

    /// Flushes everything and closes the metadata database; marks the shutdown clean.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner
            .gc
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.fs.sync_db().await.map_err(backend)?;
        self.inner.fs.shutdown().await.map_err(backend)?;
        std::fs::remove_file(self.inner.root.join("RUNNING")).ok();
        // Release the directory for another open even if handles to this store remain.
        self.inner
            .lock
            .lock()
            .expect("invariant: lock-file mutex is never poisoned")
            .take();
        Ok(())
    }

    /// The iroh-blobs store underneath, for the network protocol (sync). Writes through it
    /// are not durable until [`Store::make_durable`] ran for them.
    pub fn iroh(&self) -> &FsStore {
        &self.inner.fs
    }

    /// Bytes free for this process on the filesystem holding the store (`statvfs`).
    pub fn free_bytes(&self) -> Result<u64> {
        Ok(crate::gc::free_bytes(&self.inner.root)?)
    }

    /// Waits until no GC pass is between its roots and its sweep, and keeps a new one from
    /// starting while the guard lives. Hold it while recording a root for a blob that nothing
    /// else holds (not one just written: writers hold theirs), so that no pass that missed
    /// the root can delete the blob.
    pub async fn hold_off_gc(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.gc.hold_off_passes().await
    }

    /// Lets GC run (see [`StoreConfig::gc_waits_for_roots`]).
    pub fn enable_gc(&self) {
        self.inner.gc.arm();
    }

    /// How garbage collection has fared since the store opened.
    pub fn gc_health(&self) -> GcHealth {
        self.inner.gc.health()
    }

    /// A number that changes after every GC pass that may have deleted blobs: a cache of
    /// blob bytes must forget everything when it changes.
    pub fn gc_generation(&self) -> u64 {
        self.inner.gc.generation()
    }

    /// The directory of the store.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Registers a source of GC roots (see [`GcRoots`]).
    pub fn add_gc_roots(&self, hook: Arc<dyn GcRoots>) {
        self.inner.gc.add_hook(hook);
    }

    /// Number of corrupt blobs detected since the store was opened.
    pub fn n_corrupt(&self) -> u64 {
        self.inner.n_corrupt.load(Ordering::Relaxed)
    }

    fn data_files(&self, hash: &BlobHash) -> Vec<PathBuf> {
        let h = to_iroh(hash);
        vec![
            self.inner.paths.data_path(&h),
            self.inner.paths.outboard_path(&h),
        ]
    }

    /// Protects `hash` from GC while it is downloaded through [`Store::iroh`] (iroh-blobs'
    /// fetch takes no temp tag of its own): partial data is kept while the hold lives and,
    /// after, until the GC passes that started meanwhile have finished, so that the caller
    /// can pin the finished blob without a pass deleting it in between.
    pub async fn hold_download(&self, hash: &BlobHash) -> Result<DownloadHold> {
        let tag = self
            .inner
            .fs
            .tags()
            .temp_tag(HashAndFormat::raw(to_iroh(hash)))
            .await
            .map_err(backend)?;
        Ok(DownloadHold {
            store: self.clone(),
            tag: Some(tag),
        })
    }

    /// Makes blobs written through [`Store::iroh`] (e.g. downloads) durable. Returns after
    /// their bytes and metadata survive a crash.
    pub async fn make_durable(&self, hashes: &[BlobHash]) -> Result<()> {
        let files = hashes.iter().flat_map(|h| self.data_files(h)).collect();
        self.inner.barrier.sync(files).await
    }

    /// Stores `data`. Returns after the blob (and its pin, if requested) is durable. If the
    /// blob is being quarantined, waits (up to 30 s) for that to finish first, so that the
    /// good bytes replace the bad ones.
    pub async fn add_bytes(&self, data: impl Into<Bytes>, pin: PinMode) -> Result<Added> {
        let data: Bytes = data.into();
        let expected = BlobHash::of(&data);
        self.wait_quarantine(&expected).await?;
        let size = data.len() as u64;
        let tag = self
            .inner
            .fs
            .blobs()
            .add_bytes(data)
            .temp_tag()
            .await
            .map_err(backend)?;
        let hash = from_iroh(&tag.hash());
        self.finish_add(hash, size, pin).await?;
        self.inner.gc.retire(tag);
        Ok(Added { hash, size })
    }

    /// Stores the bytes of `stream`, refusing more than `limit_bytes` (nothing is kept then).
    /// Returns after the blob (and its pin, if requested) is durable.
    pub async fn add_stream<S>(&self, stream: S, limit_bytes: u64, pin: PinMode) -> Result<Added>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + Unpin + 'static,
    {
        // No GC lock: the bytes in progress are iroh-blobs' own (not yet a blob), and the
        // finished blob is held by its temp tag until the pin is recorded.
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let capped = stream.map(move |item| {
            let chunk = item?;
            let total =
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if total > limit_bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    format!("more than {limit_bytes} bytes"),
                ));
            }
            Ok(chunk)
        });
        let progress = self.inner.fs.blobs().add_stream(capped).await;
        let result = progress.temp_tag().await;
        let tag = match result {
            Ok(tag) => tag,
            Err(e) => {
                if seen.load(Ordering::Relaxed) > limit_bytes {
                    return Err(Error::TooLarge { limit_bytes });
                }
                return Err(backend(e));
            }
        };
        let hash = from_iroh(&tag.hash());
        let size = seen.load(Ordering::Relaxed);
        self.finish_add(hash, size, pin).await?;
        self.inner.gc.retire(tag);
        Ok(Added { hash, size })
    }

    /// Stores a copy of the file at `path` (which must be absolute), reporting progress in
    /// bytes to `progress`. Returns after the blob (and its pin) is durable.
    pub async fn add_file(
        &self,
        path: &Path,
        pin: PinMode,
        progress: impl Fn(AddPhase, u64) + Send,
    ) -> Result<Added> {
        let path = std::path::absolute(path)?;
        let mut stream = self
            .inner
            .fs
            .blobs()
            .add_path_with_opts(AddPathOptions {
                path,
                mode: ImportMode::Copy,
                format: BlobFormat::Raw,
            })
            .stream()
            .await;
        let mut size = 0;
        let mut tag = None;
        while let Some(item) = stream.next().await {
            match item {
                AddProgressItem::Size(s) => size = s,
                AddProgressItem::CopyProgress(offset) => progress(AddPhase::Copy, offset),
                AddProgressItem::OutboardProgress(offset) => progress(AddPhase::Hash, offset),
                AddProgressItem::Done(t) => {
                    tag = Some(t);
                    break;
                }
                AddProgressItem::Error(e) => return Err(backend(e)),
                AddProgressItem::CopyDone => {}
            }
        }
        let tag = tag.ok_or_else(|| Error::Backend("add ended without a result".into()))?;
        let hash = from_iroh(&tag.hash());
        progress(AddPhase::Sync, size);
        self.finish_add(hash, size, pin).await?;
        self.inner.gc.retire(tag);
        Ok(Added { hash, size })
    }

    async fn finish_add(&self, hash: BlobHash, _size: u64, pin: PinMode) -> Result<()> {
        if self.is_quarantined(&hash) {
            return Err(Error::Quarantined(hash));
        }
        if pin == PinMode::Pin {
            self.inner
                .fs
                .tags()
                .set(pin_tag(&hash), HashAndFormat::raw(to_iroh(&hash)))
                .await
                .map_err(backend)?;
        }
        self.inner.barrier.sync(self.data_files(&hash)).await
    }

    async fn wait_quarantine(&self, hash: &BlobHash) -> Result<()> {
        for _ in 0..3000 {
            if !self.is_quarantined(hash) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(Error::Quarantined(*hash))
    }

    /// Whether the blob failed verification and is being re-checked or purged (it is not
    /// served meanwhile).
    pub fn is_quarantined(&self, hash: &BlobHash) -> bool {
        if self
            .inner
            .suspect
            .lock()
            .expect("invariant: suspect lock is never poisoned")
            .contains(hash)
        {
            return true;
        }
        self.inner
            .gc
            .quarantined
            .lock()
            .expect("invariant: quarantine lock is never poisoned")
            .contains_key(hash)
    }

    /// Starts a group of writes that become durable together with [`Writer::commit`]. Its
    /// blobs are protected from GC while the writer lives and until every GC pass that
    /// started meanwhile has finished, so the caller can add blobs, record what keeps them
    /// alive (e.g. commit a ledger index), then drop the writer. GC never waits for it.
    pub async fn writer(&self) -> Writer {
        Writer {
            store: self.clone(),
            files: Vec::new(),
            small: Vec::new(),
            tags: Vec::new(),
            small_held: Vec::new(),
        }
    }

    /// Size, completeness and pin state, or `None` if nothing of the blob is stored.
    pub async fn stat(&self, hash: &BlobHash) -> Result<Option<BlobStat>> {
        if self.is_quarantined(hash) {
            return Ok(None);
        }
        if let Some(size) = self.inner.small.size(hash)? {
            return Ok(Some(BlobStat {
                size,
                complete: true,
                pinned: self.is_pinned(hash).await?,
            }));
        }
        let status = self
            .inner
            .fs
            .blobs()
            .status(to_iroh(hash))
            .await
            .map_err(backend)?;
        let (size, complete) = match status {
            BlobStatus::NotFound => return Ok(None),
            BlobStatus::Partial { size } => (size.unwrap_or(0), false),
            BlobStatus::Complete { size } => (size, true),
        };
        let pinned = self.is_pinned(hash).await?;
        Ok(Some(BlobStat {
            size,
            complete,
            pinned,
        }))
    }

    /// Whether the complete blob is stored (and not quarantined).
    pub async fn has(&self, hash: &BlobHash) -> Result<bool> {
        if self.is_quarantined(hash) {
            return Ok(false);
        }
        if self.inner.small.contains(hash)? {
            return Ok(true);
        }
        self.inner
            .fs
            .blobs()
            .has(to_iroh(hash))
            .await
            .map_err(backend)
    }

    /// Every stored blob hash (complete or partial).
    pub async fn list(&self) -> Result<Vec<BlobHash>> {
        let hashes = self
            .inner
            .fs
            .blobs()
            .list()
            .hashes()
            .await
            .map_err(backend)?;
        let mut out: Vec<BlobHash> = hashes.iter().map(from_iroh).collect();
        out.extend(self.inner.small.list()?);
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Opens a verified read of `range` (the whole blob if `None`). Errors with
    /// [`Error::NotFound`] if the blob is not complete here, [`Error::InvalidRange`] if the
    /// range does not lie within it.
    pub async fn read(&self, hash: &BlobHash, range: Option<Range<u64>>) -> Result<BlobRead> {
        if self.is_quarantined(hash) {
            return Err(Error::Quarantined(*hash));
        }
        if let Some(bytes) = self.inner.small.get(hash)? {
            let bytes = self.verify_small(hash, bytes)?;
            let size = bytes.len() as u64;
            let range = range.unwrap_or(0..size);
            if range.start > range.end || range.end > size || (range.start == size && size > 0) {
                return Err(Error::InvalidRange {
                    start: range.start,
                    end: range.end,
                    size,
                });
            }
            let piece = bytes.slice(range.start as usize..range.end as usize);
            let pieces: Vec<Result<Bytes>> = if piece.is_empty() {
                vec![]
            } else {
                vec![Ok(piece)]
            };
            return Ok(BlobRead {
                size,
                range,
                stream: Box::pin(futures::stream::iter(pieces)),
            });
        }
        let status = self
            .inner
            .fs
            .blobs()
            .status(to_iroh(hash))
            .await
            .map_err(backend)?;
        let BlobStatus::Complete { size } = status else {
            return Err(Error::NotFound(*hash));
        };
        let range = range.unwrap_or(0..size);
        if range.start > range.end || range.end > size || (range.start == size && size > 0) {
            return Err(Error::InvalidRange {
                start: range.start,
                end: range.end,
                size,
            });
        }
        let chunks = if range.start == 0 && range.end == size {
            ChunkRanges::all()
        } else {
            ChunkRanges::bytes(range.start..range.end)
        };
        // Start the read, retrying while iroh-blobs reports the blob's inbox as full.
        let mut attempt = 0;
        let (first, items) = loop {
            let permit = self
                .inner
                .read_permits
                .acquire()
                .await
                .map_err(|_| Error::Backend("store closed".into()))?;
            let mut items = Box::pin(
                self.inner
                    .fs
                    .blobs()
                    .export_bao(to_iroh(hash), chunks.clone())
                    .stream(),
            );
            let first = items.next().await;
            drop(permit);
            match &first {
                Some(EncodedItem::Error(EncodeError::Io(e))) if is_busy(e) => {
                    attempt += 1;
                    if attempt > READ_BUSY_RETRIES {
                        return Err(Error::Busy);
                    }
                    tokio::time::sleep(Duration::from_millis(2 * u64::from(attempt))).await;
                }
                _ => break (first, items),
            }
        };
        let items = futures::stream::iter(first).chain(items);
        let store = self.clone();
        let hash = *hash;
        let wanted = range.clone();
        let stream = items.filter_map(move |item| {
            let out = match item {
                EncodedItem::Leaf(leaf) => {
                    let start = leaf.offset;
                    let end = start + leaf.data.len() as u64;
                    let lo = wanted.start.max(start);
                    let hi = wanted.end.min(end);
                    if lo < hi {
                        Some(Ok(leaf
                            .data
                            .slice((lo - start) as usize..(hi - start) as usize)))
                    } else {
                        None
                    }
                }
                EncodedItem::Error(e) => Some(Err(store.on_read_error(hash, e))),
                EncodedItem::Size(_) | EncodedItem::Parent(_) | EncodedItem::Done => None,
            };
            std::future::ready(out)
        });
        // A quarantine started from inside the stream is asynchronous (see `on_read_error`).
        Ok(BlobRead {
            size,
            range,
            stream: Box::pin(stream),
        })
    }

    /// Checks a small blob's bytes against its hash; a mismatch removes it (it is never
    /// served) and counts it as corrupt.
    fn verify_small(&self, hash: &BlobHash, bytes: Bytes) -> Result<Bytes> {
        if BlobHash::of(&bytes) == *hash {
            return Ok(bytes);
        }
        tracing::error!(%hash, "small blob failed verification; removed");
        self.inner.n_corrupt.fetch_add(1, Ordering::Relaxed);
        self.inner.small.remove(hash)?;
        Err(Error::Corrupt(*hash))
    }

    /// Reads many whole blobs (verified), small ones in one database read; results in order.
    pub async fn get_many(&self, hashes: &[BlobHash], limit_bytes: u64) -> Vec<Result<Bytes>> {
        let small = match self.inner.small.get_many(hashes) {
            Ok(found) => found,
            Err(e) => {
                return hashes
                    .iter()
                    .map(|_| Err(Error::Backend(e.to_string())))
                    .collect();
            }
        };
        let mut out = Vec::with_capacity(hashes.len());
        for (hash, found) in hashes.iter().zip(small) {
            out.push(match found {
                Some(bytes) if !self.is_quarantined(hash) => self.verify_small(hash, bytes),
                _ => self.get_bytes(hash, limit_bytes).await,
            });
        }
        out
    }

    /// Deletes small blobs that nothing pins or references (GC of the small-blob table).
    pub async fn sweep_small(&self) -> Result<u64> {
        let gc = &self.inner.gc;
        let (pass, roots) = gc.small_pass().await?;
        // Pins are read after the pass opened: one set later is held by its writer
        // (`pin` registers small blobs) until the pass ends.
        let result = match self.pins().await {
            Ok(pins) => {
                let pins: HashSet<BlobHash> = pins.into_iter().collect();
                self.inner
                    .small
                    .sweep(|h| roots.contains(h) || pins.contains(h) || gc.small_held(h))
            }
            Err(e) => Err(e),
        };
        drop(pass);
        gc.small_done(&result);
        result
    }

    /// Reads a whole blob into memory, verified. Refuses blobs larger than `limit_bytes`.
    pub async fn get_bytes(&self, hash: &BlobHash, limit_bytes: u64) -> Result<Bytes> {
        let read = self.read(hash, None).await?;
        if read.size > limit_bytes {
            return Err(Error::TooLarge { limit_bytes });
        }
        collect(read).await
    }

    fn on_read_error(&self, hash: BlobHash, error: EncodeError) -> Error {
        match error {
            EncodeError::Io(ref e) if e.kind() == std::io::ErrorKind::NotFound => {
                Error::NotFound(hash)
            }
            EncodeError::Io(ref e) if is_busy(e) => Error::Busy,
            EncodeError::Io(ref e) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
                Error::Backend(format!("read of {hash} failed: {error}"))
            }
            EncodeError::ParentWrite(_) | EncodeError::LeafWrite(_) => {
                Error::Backend(format!("read of {hash} interrupted: {error}"))
            }
            // A hash mismatch, a size mismatch or a data file shorter than the blob: the bytes
            // on disk are not the blob. Never serve them; confirm with a second read, then
            // quarantine.
            other => {
                tracing::error!(%hash, "blob failed verification: {other}");
                let first = self
                    .inner
                    .suspect
                    .lock()
                    .expect("invariant: suspect lock is never poisoned")
                    .insert(hash);
                if first {
                    let store = self.clone();
                    let reason = other.to_string();
                    tokio::spawn(async move {
                        let confirmed = store.confirm_corrupt(&hash).await;
                        if let Ok(true) = confirmed {
                            store.inner.n_corrupt.fetch_add(1, Ordering::Relaxed);
                            // Marked quarantined before the suspicion is lifted: never served.
                            if let Err(e) = store.quarantine(hash, &reason).await {
                                tracing::error!(%hash, "quarantine failed: {e}");
                            }
                        }
                        store
                            .inner
                            .suspect
                            .lock()
                            .expect("invariant: suspect lock is never poisoned")
                            .remove(&hash);
                        match confirmed {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(%hash, "a second read verified; not quarantined")
                            }
                            Err(e) => tracing::warn!(%hash, "could not re-check the blob: {e}"),
                        }
                    });
                }
                Error::Corrupt(hash)
            }
        }
    }

    /// Reads a whole blob again: whether it fails verification (true) or verifies (false).
    async fn confirm_corrupt(&self, hash: &BlobHash) -> Result<bool> {
        let items = self
            .inner
            .fs
            .blobs()
            .export_bao(to_iroh(hash), ChunkRanges::all())
            .stream();
        tokio::pin!(items);
        while let Some(item) = items.next().await {
            match item {
                EncodedItem::Error(
                    EncodeError::ParentHashMismatch(_)
                    | EncodeError::LeafHashMismatch(_)
                    | EncodeError::SizeMismatch,
                ) => return Ok(true),
                EncodedItem::Error(EncodeError::Io(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    return Ok(true);
                }
                EncodedItem::Error(e) => return Err(Error::Backend(e.to_string())),
                _ => {}
            }
        }
        Ok(false)
    }

    /// Quarantines a blob whose bytes failed verification: it is no longer served, its data is
    /// deleted (pins stay, pointing at the now missing blob, so a re-add or re-fetch restores
    /// it), and a journal entry makes the procedure finish after a crash.
    pub async fn quarantine(&self, hash: BlobHash, reason: &str) -> Result<()> {
        let pinned = self.is_pinned(&hash).await?;
        {
            let mut set = self
                .inner
                .gc
                .quarantined
                .lock()
                .expect("invariant: quarantine lock is never poisoned");
            if set.insert(hash, pinned).is_some() {
                return Ok(());
            }
        }
        self.inner.journal.begin(&hash, pinned, reason)?;
        self.purge(hash, pinned).await
    }

    async fn purge(&self, hash: BlobHash, pinned: bool) -> Result<()> {
        if pinned {
            self.inner
                .fs
                .tags()
                .delete(pin_tag(&hash))
                .await
                .map_err(backend)?;
        }
        // A writer may hold a temp tag on the hash during one run (it then learns that the
        // hash is quarantined and lets go), so run until the bytes are really gone.
        let mut gc_result = Ok(());
        for _ in 0..10 {
            gc_result = self.inner.gc.run_now().await;
            if gc_result.is_err()
                || !self
                    .inner
                    .fs
                    .blobs()
                    .has(to_iroh(&hash))
                    .await
                    .map_err(backend)?
            {
                break;
            }
        }
        if pinned {
            self.inner
                .fs
                .tags()
                .set(pin_tag(&hash), HashAndFormat::raw(to_iroh(&hash)))
                .await
                .map_err(backend)?;
        }
        self.inner.barrier.sync(Vec::new()).await?;
        gc_result?;
        self.inner.journal.end(&hash)?;
        self.inner
            .gc
            .quarantined
            .lock()
            .expect("invariant: quarantine lock is never poisoned")
            .remove(&hash);
        tracing::warn!(%hash, "corrupt blob removed; re-add or fetch it from a peer");
        Ok(())
    }

    async fn finish_pending_quarantines(&self) -> Result<()> {
        for (hash, pinned) in self.inner.journal.pending()? {
            self.inner
                .gc
                .quarantined
                .lock()
                .expect("invariant: quarantine lock is never poisoned")
                .insert(hash, pinned);
            let store = self.clone();
            tokio::spawn(async move {
                if let Err(e) = store.purge(hash, pinned).await {
                    tracing::error!(%hash, "finishing quarantine failed: {e}");
                }
            });
        }
        Ok(())
    }

    /// Verifies every complete blob, quarantining those whose bytes do not match their hash.
    pub async fn scrub(&self) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for hash in self.list().await? {
            let read = match self.read(&hash, None).await {
                Ok(read) => read,
                // Small blobs are verified whole when read.
                Err(Error::Corrupt(_)) => {
                    report.n_checked += 1;
                    report.n_corrupt += 1;
                    report.corrupt.push(hash);
                    continue;
                }
                Err(_) => continue,
            };
            report.n_checked += 1;
            let mut stream = read.stream;
            while let Some(item) = stream.next().await {
                if let Err(Error::Corrupt(_)) = item {
                    report.n_corrupt += 1;
                    report.corrupt.push(hash);
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Pins a stored blob so that GC never removes it. Durable on return.
    ///
    /// A pin never races a GC pass: it is set while no iroh-blobs pass is between its roots
    /// and its sweep (it waits for one in progress), and a small blob is held until any
    /// small-blob pass that might have missed the pin has ended.
    pub async fn pin(&self, hash: &BlobHash) -> Result<()> {
        let gc = &self.inner.gc;
        // Released however this ends (a cancelled request included).
        let _held = gc.hold_small(*hash);
        let result = async {
            let _no_pass = gc.hold_off_passes().await;
            if !self.has(hash).await? {
                return Err(Error::NotFound(*hash));
            }
            self.inner
                .fs
                .tags()
                .set(pin_tag(hash), HashAndFormat::raw(to_iroh(hash)))
                .await
                .map_err(backend)
        }
        .await;
        result?;
        self.inner.barrier.sync(Vec::new()).await
    }

    /// Removes a pin. Returns whether the blob was pinned. Durable on return.
    ///
    /// Waits for a GC pass between its roots and its sweep: a root recorded for the blob after
    /// the pass took its roots (say, a skill published with these weights) is then seen by
    /// the next pass, while the pin still holds the blob through this one.
    pub async fn unpin(&self, hash: &BlobHash) -> Result<bool> {
        let no_pass = self.inner.gc.hold_off_passes().await;
        let n = self
            .inner
            .fs
            .tags()
            .delete(pin_tag(hash))
            .await
            .map_err(backend)?;
        drop(no_pass);
        self.inner.barrier.sync(Vec::new()).await?;
        Ok(n > 0)
    }

    /// Whether a blob is pinned.
    pub async fn is_pinned(&self, hash: &BlobHash) -> Result<bool> {
        if let Some(pinned) = self
            .inner
            .gc
            .quarantined
            .lock()
            .expect("invariant: quarantine lock is never poisoned")
            .get(hash)
        {
            return Ok(*pinned);
        }
        Ok(self
            .inner
            .fs
            .tags()
            .get(pin_tag(hash))
            .await
            .map_err(backend)?
            .is_some())
    }

    /// Every pinned hash, in hash order.
    pub async fn pins(&self) -> Result<Vec<BlobHash>> {
        let mut stream = self
            .inner
            .fs
            .tags()
            .list_prefix(PIN_PREFIX)
            .await
            .map_err(backend)?;
        let mut out = std::collections::BTreeSet::new();
        while let Some(tag) = stream.next().await {
            let tag = tag.map_err(backend)?;
            out.insert(from_iroh(&tag.hash));
        }
        // A pin is lifted for the moment its corrupt blob is purged; it is still a pin.
        out.extend(
            self.inner
                .gc
                .quarantined
                .lock()
                .expect("invariant: quarantine lock is never poisoned")
                .iter()
                .filter(|(_, pinned)| **pinned)
                .map(|(hash, _)| *hash),
        );
        Ok(out.into_iter().collect())
    }

    /// A page of the pins in hash order: at most `limit` (> 0) hashes strictly after `after`,
    /// and the hash to continue after (`None` when this page is the last). A pin lifted for
    /// the moment its corrupt blob is purged counts, as in [`Store::pins`].
    ///
    /// iroh-blobs answers a tag listing with its whole range at once, so this lists windows of
    /// the hash space (by the 64-bit prefix of the hash, which the tag names sort by) that
    /// double in width from 1/65536 of the space until they hold more than `limit` pins:
    /// hashes are uniform, so a page reads about O(limit) tags in at most 17 listings,
    /// whatever the number of pins.
    pub async fn pins_page(
        &self,
        after: Option<BlobHash>,
        limit: usize,
    ) -> Result<(Vec<BlobHash>, Option<BlobHash>)> {
        use std::ops::Bound;
        /// Width of the first window in the space of 64-bit hash prefixes.
        const FIRST_WINDOW: u64 = 1 << 48;
        debug_assert!(limit > 0, "a page holds at least one pin");
        let prefix_of = |hash: &BlobHash| -> u64 {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&hash.as_bytes()[..8]);
            u64::from_be_bytes(bytes)
        };
        // Tag names are `pin/` and 64 lowercase hex digits, so they sort as the hashes do, and
        // `pin/` with 16 hex digits is the first name of the hashes with that prefix.
        let window_tag = |prefix: u64| format!("{PIN_PREFIX}{prefix:016x}").into_bytes();
        // The first name after every `pin/…` name.
        let mut names_end = PIN_PREFIX.as_bytes().to_vec();
        if let Some(last) = names_end.last_mut() {
            *last += 1;
        }
        let mut from: Bound<Vec<u8>> = match &after {
            Some(hash) => Bound::Excluded(pin_tag(hash).into_bytes()),
            None => Bound::Included(PIN_PREFIX.as_bytes().to_vec()),
        };
        let mut start = after.as_ref().map_or(0, prefix_of);
        let mut width = FIRST_WINDOW;
        let mut found = std::collections::BTreeSet::new();
        // The (exclusive) prefix up to which the space after `after` is listed; `None`: all.
        let listed_to = loop {
            let end = start.checked_add(width);
            let to = match end {
                Some(end) => window_tag(end),
                None => names_end.clone(),
            };
            let mut stream = self
                .inner
                .fs
                .tags()
                .list_range((from, Bound::Excluded(to)))
                .await
                .map_err(backend)?;
            while let Some(tag) = stream.next().await {
                let tag = tag.map_err(backend)?;
                found.insert(from_iroh(&tag.hash));
            }
            match end {
                Some(end) if found.len() <= limit => {
                    from = Bound::Included(window_tag(end));
                    start = end;
                    width = width.saturating_mul(2);
                }
                _ => break end,
            }
        };
        // A pin is lifted for the moment its corrupt blob is purged; it is still a pin.
        found.extend(
            self.inner
                .gc
                .quarantined
                .lock()
                .expect("invariant: quarantine lock is never poisoned")
                .iter()
                .filter(|(hash, pinned)| {
                    **pinned
                        && after.is_none_or(|a| **hash > a)
                        && listed_to.is_none_or(|end| prefix_of(hash) < end)
                })
                .map(|(hash, _)| *hash),
        );
        let mut pins: Vec<BlobHash> = found.into_iter().collect();
        debug_assert!(
            after.is_none_or(|a| pins.first().is_none_or(|first| *first > a)),
            "pins are strictly after the cursor"
        );
        let next = if pins.len() > limit {
            pins.truncate(limit);
            pins.last().copied()
        } else {
            None
        };
        Ok((pins, next))
    }

    /// Runs garbage collection now and waits for it: deletes every blob that is not pinned,
    /// not a root of a registered [`GcRoots`] hook and not being written.
    pub async fn gc(&self) -> Result<GcReport> {
        let before: HashSet<BlobHash> = self.list().await?.into_iter().collect();
        self.inner.gc.run_now().await?;
        self.sweep_small().await?;
        let after: HashSet<BlobHash> = self.list().await?.into_iter().collect();
        Ok(GcReport {
            n_deleted: before.difference(&after).count() as u64,
            n_kept: after.len() as u64,
        })
    }
}

/// See [`Store::hold_download`]. Retires its temp tag into the GC window on drop.
pub struct DownloadHold {
    store: Store,
    tag: Option<iroh_blobs::api::TempTag>,
}

impl Drop for DownloadHold {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            self.store.inner.gc.retire(tag);
        }
    }
}

impl std::fmt::Debug for DownloadHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadHold").finish_non_exhaustive()
    }
}

/// A group of blob writes made durable together; protects its blobs from GC while it lives
/// (and, after, until the GC passes that started meanwhile have finished).
pub struct Writer {
    store: Store,
    files: Vec<PathBuf>,
    small: Vec<(BlobHash, Bytes)>,
    /// Temp tags of the blobs added to iroh-blobs, retired on drop.
    tags: Vec<iroh_blobs::api::TempTag>,
    /// Small blobs registered as being written, released on drop.
    small_held: Vec<BlobHash>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        let gc = &self.store.inner.gc;
        for tag in self.tags.drain(..) {
            gc.retire(tag);
        }
        gc.small_end_many(&self.small_held);
        self.small_held.clear();
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("n_files", &self.files.len())
            .finish()
    }
}

impl Writer {
    /// Stores `data` (not pinned; the caller protects it through a [`GcRoots`] hook). Not
    /// durable until [`Writer::commit`].
    pub async fn add_bytes(&mut self, data: impl Into<Bytes>) -> Result<Added> {
        let data: Bytes = data.into();
        let size = data.len() as u64;
        let tag = self
            .store
            .inner
            .fs
            .blobs()
            .add_bytes(data)
            .temp_tag()
            .await
            .map_err(backend)?;
        let hash = from_iroh(&tag.hash());
        if self.store.is_quarantined(&hash) {
            return Err(Error::Quarantined(hash));
        }
        if size > INLINE_BYTES_MAX {
            self.files.extend(self.store.data_files(&hash));
        }
        self.tags.push(tag);
        Ok(Added { hash, size })
    }

    /// Stores many blobs concurrently (up to `concurrency` in flight); results in input order.
    /// Not durable until [`Writer::commit`].
    pub async fn add_many(&mut self, items: Vec<Bytes>, concurrency: usize) -> Result<Vec<Added>> {
        if items.iter().all(|b| b.len() <= SMALL_BYTES_MAX) {
            // Small blobs go to the grouped table, written in one transaction by `commit`.
            let mut out = Vec::with_capacity(items.len());
            let mut rows = Vec::with_capacity(items.len());
            for data in items {
                let hash = BlobHash::of(&data);
                if self.store.is_quarantined(&hash) {
                    return Err(Error::Quarantined(hash));
                }
                out.push(Added {
                    hash,
                    size: data.len() as u64,
                });
                rows.push((hash, data));
            }
            // Held from here until the writer is dropped (one lock for the whole group).
            let hashes: Vec<BlobHash> = rows.iter().map(|(h, _)| *h).collect();
            self.store.inner.gc.small_begin_many(&hashes);
            self.small_held.extend(hashes);
            self.small.extend(rows);
            return Ok(out);
        }
        let store = self.store.clone();
        let results: Vec<Result<(Added, iroh_blobs::api::TempTag)>> =
            futures::stream::iter(items.into_iter().map(|data| {
                let store = store.clone();
                async move {
                    let size = data.len() as u64;
                    let tag = store
                        .inner
                        .fs
                        .blobs()
                        .add_bytes(data)
                        .temp_tag()
                        .await
                        .map_err(backend)?;
                    let hash = from_iroh(&tag.hash());
                    if store.is_quarantined(&hash) {
                        return Err(Error::Quarantined(hash));
                    }
                    Ok((Added { hash, size }, tag))
                }
            }))
            .buffered(concurrency.max(1))
            .collect()
            .await;
        let mut out = Vec::with_capacity(results.len());
        for result in results {
            let (added, tag) = result?;
            self.tags.push(tag);
            if added.size > INLINE_BYTES_MAX {
                self.files.extend(self.store.data_files(&added.hash));
            }
            out.push(added);
        }
        Ok(out)
    }

    /// Makes every blob added through this writer durable (one barrier for all of them).
    /// GC stays held off until the writer is dropped.
    pub async fn commit(&mut self) -> Result<()> {
        let small = std::mem::take(&mut self.small);
        if !small.is_empty() {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.inner.small.put_many(&small))
                .await
                .map_err(|e| Error::Backend(e.to_string()))??;
        }
        let files = std::mem::take(&mut self.files);
        if files.is_empty() {
            return Ok(());
        }
        self.store.inner.barrier.sync(files).await
    }
}

/// Blobs up to this size live inline in the metadata database (no data file to fsync).
const INLINE_BYTES_MAX: u64 = 16 * 1024;

/// Phases of a file add, for progress reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddPhase {
    /// Copying into the store; the number is bytes copied.
    Copy,
    /// Computing the hash tree; the number is bytes hashed.
    Hash,
    /// Making the blob durable; the number is the size.
    Sync,
}

/// Result of [`Store::gc`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs deleted by this run (including ones deleted concurrently by other means).
    pub n_deleted: u64,
    /// Blobs left.
    pub n_kept: u64,
}

/// Result of [`Store::scrub`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blobs verified.
    pub n_checked: u64,
    /// Blobs that failed and were quarantined.
    pub n_corrupt: u64,
    /// Their hashes.
    pub corrupt: Vec<BlobHash>,
}

/// Joins small pieces of a byte stream into pieces of about `target_bytes` (fewer, larger
/// writes downstream). Errors are passed through after the bytes before them.
pub fn coalesce<S, E>(
    stream: S,
    target_bytes: usize,
) -> impl Stream<Item = std::result::Result<Bytes, E>> + Send
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
    E: Send,
{
    futures::stream::unfold(
        (stream, Some(bytes::BytesMut::new()), None::<E>),
        move |(mut stream, buffer, pending_error)| async move {
            if let Some(error) = pending_error {
                return Some((Err(error), (stream, None, None)));
            }
            let mut buffer = buffer?;
            loop {
                match stream.next().await {
                    Some(Ok(piece)) => {
                        if buffer.is_empty() && piece.len() >= target_bytes {
                            return Some((Ok(piece), (stream, Some(buffer), None)));
                        }
                        buffer.extend_from_slice(&piece);
                        if buffer.len() >= target_bytes {
                            let out = buffer.split().freeze();
                            return Some((Ok(out), (stream, Some(buffer), None)));
                        }
                    }
                    Some(Err(e)) => {
                        if buffer.is_empty() {
                            return Some((Err(e), (stream, None, None)));
                        }
                        let out = buffer.split().freeze();
                        return Some((Ok(out), (stream, None, Some(e))));
                    }
                    None => {
                        if buffer.is_empty() {
                            return None;
                        }
                        let out = buffer.split().freeze();
                        return Some((Ok(out), (stream, None, None)));
                    }
                }
            }
        },
    )
}

/// Collects a verified read into memory.
pub async fn collect(read: BlobRead) -> Result<Bytes> {
    let mut stream = read.stream;
    let mut first: Option<Bytes> = None;
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        match first.take() {
            None if buffer.is_empty() => first = Some(piece),
            None => buffer.extend_from_slice(&piece),
            Some(previous) => {
                buffer.reserve((read.range.end - read.range.start) as usize);
                buffer.extend_from_slice(&previous);
                buffer.extend_from_slice(&piece);
            }
        }
    }
    Ok(match first {
        Some(only) => only,
        None => Bytes::from(buffer),
    })
}
