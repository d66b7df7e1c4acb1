//! Unit tests for the store: round trips, ranges, pins, GC protection, limits, corruption.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meshnode_schemas::BlobHash;

use crate::*;

const INTERESTING_SIZES: [usize; 10] = [
    0,
    1,
    1023,
    1024,
    1025,
    16 * 1024 - 1,
    16 * 1024,
    16 * 1024 + 1,
    1024 * 1024,
    5 * 1024 * 1024 + 3,
];

fn data(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| ((i as u64 * 7919 + u64::from(seed)) % 251) as u8)
        .collect()
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreConfig::default())
        .await
        .expect("open")
}

#[tokio::test]
async fn round_trips_at_interesting_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    for (i, size) in INTERESTING_SIZES.into_iter().enumerate() {
        let bytes = data(size, i as u8);
        let added = store
            .add_bytes(bytes.clone(), PinMode::Pin)
            .await
            .expect("add");
        assert_eq!(added.hash, BlobHash::of(&bytes));
        assert_eq!(added.size, size as u64);
        let back = store.get_bytes(&added.hash, u64::MAX).await.expect("get");
        assert_eq!(back.as_ref(), bytes.as_slice(), "size {size}");
        let stat = store
            .stat(&added.hash)
            .await
            .expect("stat")
            .expect("present");
        assert_eq!(
            stat,
            BlobStat {
                size: size as u64,
                complete: true,
                pinned: true
            }
        );
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn ranges_are_exact_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let bytes = data(100_000, 1);
    let hash = store
        .add_bytes(bytes.clone(), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    for (start, end) in [
        (0, 1),
        (1023, 1025),
        (16_383, 16_385),
        (50_000, 100_000),
        (99_999, 100_000),
        (0, 100_000),
    ] {
        let read = store.read(&hash, Some(start..end)).await.expect("read");
        assert_eq!(read.range, start..end);
        let got = collect(read).await.expect("collect");
        assert_eq!(
            got.as_ref(),
            &bytes[start as usize..end as usize],
            "{start}..{end}"
        );
    }
    for (start, end) in [(100_000, 100_001), (5, 4), (0, 100_001)] {
        assert!(
            matches!(
                store.read(&hash, Some(start..end)).await,
                Err(Error::InvalidRange { .. })
            ),
            "{start}..{end}"
        );
    }
    let missing = BlobHash::of(b"never stored");
    assert!(matches!(
        store.read(&missing, None).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store.get_bytes(&hash, 10).await,
        Err(Error::TooLarge { .. })
    ));
}

#[tokio::test]
async fn streams_over_the_limit_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let bytes = data(200_000, 2);
    let chunks = || -> Vec<std::io::Result<Bytes>> {
        bytes
            .chunks(7_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    };
    let result = store
        .add_stream(futures::stream::iter(chunks()), 100_000, PinMode::Pin)
        .await;
    assert!(
        matches!(
            result,
            Err(Error::TooLarge {
                limit_bytes: 100_000
            })
        ),
        "{result:?}"
    );
    assert!(!store.has(&BlobHash::of(&bytes)).await.expect("has"));
    let added = store
        .add_stream(futures::stream::iter(chunks()), 200_000, PinMode::Pin)
        .await
        .expect("at the limit");
    assert_eq!(added.hash, BlobHash::of(&bytes));
    assert_eq!(added.size, 200_000);
}

struct Roots(Mutex<HashSet<BlobHash>>);

impl GcRoots for Roots {
    fn add_roots(&self, roots: &mut HashSet<BlobHash>) -> Result<(), String> {
        roots.extend(self.0.lock().expect("lock").iter().copied());
        Ok(())
    }
}

struct FailingRoots;

impl GcRoots for FailingRoots {
    fn add_roots(&self, _roots: &mut HashSet<BlobHash>) -> Result<(), String> {
        Err("index unavailable".into())
    }
}

#[tokio::test]
async fn gc_keeps_pins_and_hook_roots_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let roots = Arc::new(Roots(Mutex::new(HashSet::new())));
    store.add_gc_roots(roots.clone());
    let pinned = store
        .add_bytes(data(30_000, 1), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    let rooted = store
        .add_bytes(data(30_000, 2), PinMode::NoPin)
        .await
        .expect("add")
        .hash;
    let garbage = store
        .add_bytes(data(30_000, 3), PinMode::NoPin)
        .await
        .expect("add")
        .hash;
    let small_garbage = store
        .add_bytes(data(10, 4), PinMode::NoPin)
        .await
        .expect("add")
        .hash;
    let unpinned = store
        .add_bytes(data(30_000, 5), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    roots.0.lock().expect("lock").insert(rooted);
    assert!(store.unpin(&unpinned).await.expect("unpin"));
    assert!(!store.unpin(&unpinned).await.expect("unpin twice"));

    let report = store.gc().await.expect("gc");
    assert_eq!(report.n_deleted, 3, "{report:?}");
    assert!(store.has(&pinned).await.expect("has"));
    assert!(store.has(&rooted).await.expect("has"));
    for gone in [garbage, small_garbage, unpinned] {
        assert!(!store.has(&gone).await.expect("has"));
    }
    assert_eq!(store.pins().await.expect("pins"), vec![pinned]);
}

#[tokio::test]
async fn gc_aborts_when_a_root_hook_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store.add_gc_roots(Arc::new(FailingRoots));
    let unprotected = store
        .add_bytes(data(30_000, 3), PinMode::NoPin)
        .await
        .expect("add")
        .hash;
    assert!(matches!(store.gc().await, Err(Error::Gc(_))));
    assert!(
        store.has(&unprotected).await.expect("has"),
        "deleted although roots were unknown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_during_gc_are_never_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut hashes = Vec::new();
            for i in 0..200u32 {
                let bytes = data(20_000 + i as usize, (i % 250) as u8);
                hashes.push(
                    store
                        .add_bytes(bytes, PinMode::Pin)
                        .await
                        .expect("add")
                        .hash,
                );
            }
            hashes
        })
    };
    let collector = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                store.gc().await.expect("gc");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let hashes = writer.await.expect("writer");
    collector.await.expect("gc");
    store.gc().await.expect("gc");
    for hash in hashes {
        assert!(
            store.has(&hash).await.expect("has"),
            "pinned blob {hash} lost to GC"
        );
    }
}

#[tokio::test]
async fn corrupt_files_are_detected_quarantined_and_restorable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = data(100_000, 9);
    let hash = {
        let store = open(dir.path()).await;
        let hash = store
            .add_bytes(bytes.clone(), PinMode::Pin)
            .await
            .expect("add")
            .hash;
        store.shutdown().await.expect("shutdown");
        hash
    };
    let path = dir.path().join(format!("data/{hash}.data"));
    let mut on_disk = std::fs::read(&path).expect("data file");
    on_disk[70_000] ^= 1;
    std::fs::write(&path, on_disk).expect("write");

    let store = open(dir.path()).await;
    // Reading the intact first part is fine: every piece served is verified.
    let head = collect(store.read(&hash, Some(0..1000)).await.expect("read"))
        .await
        .expect("verified prefix");
    assert_eq!(head.as_ref(), &bytes[..1000]);
    // The damaged part is refused.
    let result = store.get_bytes(&hash, u64::MAX).await;
    assert!(matches!(result, Err(Error::Corrupt(_))), "{result:?}");
    // It is purged in the background; the pin stays.
    let mut purged = false;
    for _ in 0..200 {
        if !store.is_quarantined(&hash) && store.stat(&hash).await.expect("stat").is_none() {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(purged, "corrupt blob still present");
    assert_eq!(store.n_corrupt(), 1, "confirmed by a second read");
    assert!(matches!(
        store.read(&hash, None).await,
        Err(Error::NotFound(_) | Error::Quarantined(_))
    ));
    assert_eq!(store.pins().await.expect("pins"), vec![hash]);
    // Re-adding the right bytes restores the blob.
    for _ in 0..100 {
        match store.add_bytes(bytes.clone(), PinMode::Pin).await {
            Ok(_) => break,
            Err(Error::Quarantined(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("re-add failed: {e}"),
        }
    }
    assert_eq!(
        store
            .get_bytes(&hash, u64::MAX)
            .await
            .expect("get")
            .as_ref(),
        bytes.as_slice()
    );
    let report = store.scrub().await.expect("scrub");
    assert_eq!(report.n_corrupt, 0);
}

#[tokio::test]
async fn scrub_finds_damage_and_a_second_open_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let good = store
        .add_bytes(data(50_000, 1), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    let bad = store
        .add_bytes(data(50_000, 2), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    assert!(matches!(
        Store::open(dir.path(), StoreConfig::default()).await,
        Err(Error::Locked(_))
    ));
    store.shutdown().await.expect("shutdown");
    drop(store);
    let path = dir.path().join(format!("data/{bad}.data"));
    let mut on_disk = std::fs::read(&path).expect("data file");
    on_disk[10] ^= 0xff;
    std::fs::write(&path, on_disk).expect("write");
    let store = open(dir.path()).await;
    let report = store.scrub().await.expect("scrub");
    assert_eq!(report.corrupt, vec![bad]);
    assert!(store.has(&good).await.expect("has"));
}

#[tokio::test]
async fn grouped_small_blobs_are_durable_verified_and_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let roots = Arc::new(Roots(Mutex::new(HashSet::new())));
    store.add_gc_roots(roots.clone());
    let items: Vec<Bytes> = (0..50u8)
        .map(|i| Bytes::from(data(300 + i as usize, i)))
        .collect();
    let added = {
        let mut writer = store.writer().await;
        let added = writer.add_many(items.clone(), 8).await.expect("add");
        writer.commit().await.expect("commit");
        added
    };
    for (a, bytes) in added.iter().zip(&items) {
        assert_eq!(a.hash, BlobHash::of(bytes));
        assert_eq!(
            store.get_bytes(&a.hash, u64::MAX).await.expect("get"),
            *bytes
        );
        assert!(store.has(&a.hash).await.expect("has"));
        assert_eq!(
            collect(store.read(&a.hash, Some(1..5)).await.expect("range"))
                .await
                .expect("c")
                .as_ref(),
            &bytes[1..5]
        );
    }
    let hashes: Vec<BlobHash> = added.iter().map(|a| a.hash).collect();
    let many = store.get_many(&hashes, u64::MAX).await;
    assert!(
        many.iter()
            .zip(&items)
            .all(|(r, b)| r.as_ref().ok() == Some(b))
    );
    // Roots keep the first ten, a pin keeps one more, GC removes the rest.
    roots
        .0
        .lock()
        .expect("lock")
        .extend(hashes[..10].iter().copied());
    store.pin(&hashes[10]).await.expect("pin");
    store.gc().await.expect("gc");
    for (i, hash) in hashes.iter().enumerate() {
        assert_eq!(store.has(hash).await.expect("has"), i <= 10, "blob {i}");
    }
    // They survive a restart.
    store.shutdown().await.expect("shutdown");
    drop(store);
    let store = open(dir.path()).await;
    assert!(store.has(&hashes[0]).await.expect("has"));
    // Damage the stored bytes of one: it is detected, never served, and reported by scrub.
    store.shutdown().await.expect("shutdown");
    drop(store);
    let path = dir.path().join("small.redb");
    let mut file = std::fs::read(&path).expect("read table");
    // Copy-on-write pages may hold older copies too: damage every one.
    let at: Vec<usize> = file
        .windows(items[0].len())
        .enumerate()
        .filter(|(_, w)| *w == &items[0][..])
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "blob bytes in the table");
    for i in at {
        file[i + 100] ^= 0x55;
    }
    std::fs::write(&path, &file).expect("write table");
    let store = open(dir.path()).await;
    let got = store.get_bytes(&hashes[0], u64::MAX).await;
    assert!(
        matches!(&got, Err(Error::Corrupt(h)) if *h == hashes[0]),
        "{got:?}"
    );
    assert!(!store.has(&hashes[0]).await.expect("has"));
    assert!(store.get_bytes(&hashes[1], u64::MAX).await.is_ok());
}

#[tokio::test]
async fn pins_page_walks_every_pin_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    for i in 0..50u32 {
        store
            .add_bytes(i.to_le_bytes().repeat(25), PinMode::Pin)
            .await
            .expect("add");
    }
    // Unpinned blobs are not listed.
    store
        .add_bytes(data(100, 9), PinMode::NoPin)
        .await
        .expect("add");
    let all = store.pins().await.expect("pins");
    assert_eq!(all.len(), 50);
    for limit in [1, 3, 7, 49, 50, 51, 1000] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = store.pins_page(after, limit).await.expect("page");
            assert!(page.len() <= limit);
            seen.extend(page.iter().copied());
            match next {
                Some(cursor) => {
                    assert_eq!(page.len(), limit);
                    assert_eq!(page.last(), Some(&cursor));
                    after = Some(cursor);
                }
                None => break,
            }
        }
        assert_eq!(seen, all, "limit {limit}");
    }
    // After the last pin: nothing, and no next page. After a hash that is not pinned: the pins
    // above it.
    let (page, next) = store
        .pins_page(all.last().copied(), 10)
        .await
        .expect("page");
    assert!(page.is_empty() && next.is_none());
    let mut middle = *all[20].as_bytes();
    middle[31] ^= 1;
    let middle = BlobHash::from_bytes(middle);
    let (page, _) = store.pins_page(Some(middle), 1000).await.expect("page");
    let expected: Vec<BlobHash> = all.iter().copied().filter(|h| *h > middle).collect();
    assert_eq!(page, expected);
}

/// Roots read at the start of a call, then a pause: a GC pass that records its roots while a
/// writer is between "stored" and "root recorded".
struct SlowRoots {
    roots: Mutex<HashSet<BlobHash>>,
    pause: Duration,
}

impl GcRoots for SlowRoots {
    fn add_roots(&self, roots: &mut HashSet<BlobHash>) -> std::result::Result<(), String> {
        roots.extend(self.roots.lock().expect("lock").iter().copied());
        std::thread::sleep(self.pause);
        Ok(())
    }
}

/// A byte stream fed by the test, one piece at a time.
struct Receiver(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>);

impl futures::Stream for Receiver {
    type Item = std::io::Result<Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_blocks_neither_gc_nor_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let body = data(3 << 20, 9);
    let upload = {
        let store = store.clone();
        let stream = Receiver(rx);
        tokio::spawn(async move { store.add_stream(stream, u64::MAX, PinMode::Pin).await })
    };
    tx.send(Ok(Bytes::copy_from_slice(&body[..1 << 20])))
        .await
        .expect("send");
    // The upload now waits for the rest of its body. GC and other writes go on.
    let quick = Duration::from_secs(10);
    tokio::time::timeout(quick, store.gc())
        .await
        .expect("GC waited for an upload")
        .expect("gc");
    let other = tokio::time::timeout(quick, store.add_bytes(data(40_000, 1), PinMode::Pin))
        .await
        .expect("a write waited for an upload")
        .expect("add");
    tx.send(Ok(Bytes::copy_from_slice(&body[1 << 20..])))
        .await
        .expect("send");
    drop(tx);
    let added = upload.await.expect("join").expect("upload");
    assert_eq!(added.hash, BlobHash::of(&body));
    store.gc().await.expect("gc");
    assert_eq!(
        store.get_bytes(&added.hash, u64::MAX).await.expect("get"),
        body
    );
    assert!(store.has(&other.hash).await.expect("has"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_recorded_while_a_pass_runs_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let roots = Arc::new(SlowRoots {
        roots: Mutex::new(HashSet::new()),
        pause: Duration::from_millis(500),
    });
    store.add_gc_roots(roots.clone());
    let mut writer = store.writer().await;
    let big = writer.add_bytes(data(100_000, 1)).await.expect("add").hash;
    let small = writer
        .add_many(vec![Bytes::from(data(100, 2))], 1)
        .await
        .expect("add")[0]
        .hash;
    writer.commit().await.expect("commit");
    // A pass records its roots (neither blob is a root yet) and pauses; meanwhile the writer
    // records the roots and lets go.
    let pass = {
        let store = store.clone();
        tokio::spawn(async move { store.gc().await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    roots.roots.lock().expect("lock").extend([big, small]);
    drop(writer);
    pass.await.expect("join").expect("gc");
    for hash in [big, small] {
        assert!(store.has(&hash).await.expect("has"), "{hash} lost");
    }
    store.gc().await.expect("gc");
    for hash in [big, small] {
        assert!(store.has(&hash).await.expect("has"), "{hash} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_waits_for_its_roots_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        gc_waits_for_roots: true,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).await.expect("open");
    let unrooted = store
        .add_bytes(data(30_000, 3), PinMode::NoPin)
        .await
        .expect("add")
        .hash;
    let pass = {
        let store = store.clone();
        tokio::spawn(async move { store.gc().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pass.is_finished(),
        "GC ran before its roots were registered"
    );
    assert!(store.has(&unrooted).await.expect("has"));
    store.enable_gc();
    pass.await.expect("join").expect("gc");
    assert!(!store.has(&unrooted).await.expect("has"));
    assert_eq!(store.gc_health().failures, 0);
    assert!(store.gc_health().runs >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpin_during_a_pass_keeps_a_blob_that_became_a_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let roots = Arc::new(SlowRoots {
        roots: Mutex::new(HashSet::new()),
        pause: Duration::from_millis(500),
    });
    store.add_gc_roots(roots.clone());
    let weights = store
        .add_bytes(data(30_000, 4), PinMode::Pin)
        .await
        .expect("add")
        .hash;
    // A pass records its roots (the blob is only pinned); meanwhile the blob becomes a root
    // (a skill names it) and its pin is removed.
    let pass = {
        let store = store.clone();
        tokio::spawn(async move { store.gc().await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    roots.roots.lock().expect("lock").insert(weights);
    assert!(store.unpin(&weights).await.expect("unpin"));
    pass.await.expect("join").expect("gc");
    assert!(store.has(&weights).await.expect("has"), "lost to the pass");
    store.gc().await.expect("gc");
    assert!(
        store.has(&weights).await.expect("has"),
        "lost to the next pass"
    );
}
