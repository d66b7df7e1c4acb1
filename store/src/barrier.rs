//! The durability barrier: group commit of data-file fsyncs and the metadata database.
//!
//! iroh-blobs acknowledges an import before its metadata transaction commits and renames data
//! files into place without fsyncing them. A write is acknowledged by this crate only after
//! the barrier ran for it: its data and outboard files and the data directory are fsynced, then
//! `sync_db` commits the metadata. Concurrent writers share one barrier run (group commit).

use std::path::PathBuf;

use iroh_blobs::store::fs::FsStore;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result, backend};

/// Requests waiting for the barrier, bounded: writers wait for room rather than queue without end.
const BARRIER_QUEUE_MAX: usize = 4096;

struct Request {
    files: Vec<PathBuf>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the barrier task.
#[derive(Clone, Debug)]
pub(crate) struct Barrier {
    tx: mpsc::Sender<Request>,
}

impl Barrier {
    pub(crate) fn start(store: FsStore, data_dir: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel(BARRIER_QUEUE_MAX);
        tokio::spawn(run(store, data_dir, rx));
        Self { tx }
    }

    /// Returns once `files` (those that exist) and every metadata write issued before this call
    /// are durable.
    pub(crate) async fn sync(&self, files: Vec<PathBuf>) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { files, done })
            .await
            .map_err(|_| Error::Backend("durability barrier stopped".into()))?;
        wait.await
            .map_err(|_| Error::Backend("durability barrier stopped".into()))?
            .map_err(Error::Backend)
    }
}

async fn run(store: FsStore, data_dir: PathBuf, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = rx.try_recv() {
            batch.push(next);
        }
        let files: Vec<PathBuf> = batch.iter().flat_map(|r| r.files.iter().cloned()).collect();
        let dir = data_dir.clone();
        let fsynced = tokio::task::spawn_blocking(move || fsync_all(&files, &dir))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let result = match fsynced {
            Ok(()) => store.sync_db().await.map_err(|e| backend(e).to_string()),
            Err(e) => Err(e),
        };
        for request in batch {
            let _ = request.done.send(result.clone());
        }
    }
}

fn fsync_all(files: &[PathBuf], dir: &std::path::Path) -> std::io::Result<()> {
    let mut any = false;
    for path in files {
        match std::fs::File::open(path) {
            Ok(file) => {
                file.sync_all()?;
                any = true;
            }
            // Small blobs live inline in the metadata database and have no file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if any {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
