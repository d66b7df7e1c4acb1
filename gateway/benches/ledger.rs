//! Ledger benchmark: ingest of N signed events (verify + validate + index + durable, in
//! batches) and a full audit, each against raw `verify_strict` of the same events on all
//! cores; then restart-after-SIGKILL time of a real node on the ingested data dir.
//!
//! Usage: cargo bench -p meshnode-gateway --bench ledger -- [N_EVENTS] [SCRATCH_DIR]
//! Prints one JSON object on stdout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshnode_gateway::node::{self, files};
use meshnode_ledger::{Ledger, LedgerConfig, Status};
use meshnode_schemas::*;
use meshnode_store::{Store, StoreConfig};
use rayon::prelude::*;

mod workload;

/// The peer: plain ed25519-dalek, key decoded and `verify_strict` per event (not through
/// `AuthorKey::verifying_key`, whose cache of decoded keys would make the baseline faster).
fn raw_verify(events: &[SignedEvent]) -> Duration {
    let started = Instant::now();
    let ok = events
        .par_iter()
        .filter(|e| {
            let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(e.body.author.as_bytes()) else {
                return false;
            };
            let signature = ed25519_dalek::Signature::from_bytes(&e.sig);
            key.verify_strict(&signing_message(&e.id), &signature)
                .is_ok()
        })
        .count();
    assert_eq!(ok, events.len());
    started.elapsed()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Batch timings: RUST_LOG=meshnode_ledger=debug.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let scratch = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("meshnode-bench-ledger-")
        .tempdir_in(&scratch)?;
    let data = dir.path().join("node");
    let report = node::init(&data, None, "bench")?;
    let issuer = node::read_key_file(&data.join(files::NODE_KEY))?;
    let genesis_bytes = std::fs::read(data.join(files::GENESIS))?;
    let genesis = Genesis::decode(&genesis_bytes)?;
    let net = report.net;
    eprintln!("signing {n} events");
    let events = workload::workload(n, net, &issuer, 1000, None);
    eprintln!("raw verify_strict on all cores");
    let raw = raw_verify(&events);
    let raw_rate = n as f64 / raw.as_secs_f64();

    eprintln!("ingest");
    let store = Store::open(&data.join(files::BLOBS), StoreConfig::default()).await?;
    store
        .add_bytes(genesis_bytes.clone(), meshnode_store::PinMode::Pin)
        .await?;
    let ledger = Ledger::open(
        &data.join(files::LEDGER),
        store.clone(),
        genesis,
        net,
        issuer.clone(),
        LedgerConfig::default(),
    )
    .await?;
    let envelopes: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(e.envelope.clone()))
        .collect();
    drop(events);
    let started = Instant::now();
    let mut accepted = 0usize;
    // Many clients keep the queue full: queue chunk after chunk, collect the answers after.
    let mut receipts = Vec::with_capacity(n);
    for chunk in envelopes.chunks(50_000) {
        receipts.extend(ledger.enqueue_many(chunk.to_vec()).await);
    }
    for receipt in receipts {
        if matches!(receipt.wait().await?.status, Status::Accepted) {
            accepted += 1;
        }
    }
    let ingest = started.elapsed();
    assert_eq!(accepted, n, "every event is accepted");
    let ingest_rate = n as f64 / ingest.as_secs_f64();

    eprintln!("audit");
    let started = Instant::now();
    let audit = ledger.audit(None).await?;
    let audit_time = started.elapsed();
    assert!(audit.ok, "audit findings: {:?}", audit.findings);
    ledger.shutdown().await;
    store.shutdown().await?;
    drop(ledger);
    drop(store);

    println!(
        "{}",
        serde_json::json!({
            "n_events": n,
            "raw_verify_secs": raw.as_secs_f64(),
            "raw_verify_per_sec": raw_rate,
            "ingest_secs": ingest.as_secs_f64(),
            "ingest_per_sec": ingest_rate,
            "ingest_ratio": ingest_rate / raw_rate,
            "audit_secs": audit_time.as_secs_f64(),
            "audit_ratio": audit_time.as_secs_f64() / raw.as_secs_f64(),
            "data_dir": data.display().to_string(),
        })
    );
    // Keep the data dir for the restart measurement when asked.
    if std::env::var_os("BENCH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}
