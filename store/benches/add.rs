//! Benchmark: durable add of a file into a fresh store. Prints one JSON line.
//! Usage: cargo bench -p meshnode-store --bench add -- FILE [SCRATCH_DIR]

use std::path::PathBuf;
use std::time::Instant;

use meshnode_store::{PinMode, Store, StoreConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let file = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: add FILE [DIR]"))?,
    );
    let scratch = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("meshnode-bench-store-")
        .tempdir_in(scratch)?;
    let store = Store::open(dir.path(), StoreConfig::default()).await?;
    let started = Instant::now();
    let added = store.add_file(&file, PinMode::Pin, |_, _| {}).await?;
    let secs = started.elapsed().as_secs_f64();
    store.shutdown().await?;
    println!(
        "{{\"bytes\": {}, \"secs\": {secs:.4}, \"hash\": \"{}\"}}",
        added.size, added.hash
    );
    Ok(())
}
