//! Sync benchmark (issue 11, BENCH.md): two real nodes (store, ledger, query tables, mesh
//! endpoint on loopback) in this process.
//!
//! 1. Node A holds N events of M authors (grants, one skill each — their catalog entries —,
//!    transfers and host records), node B is empty: the time from B's `peer add` until B's
//!    state digest equals A's, and the bytes on the wire both ways (QUIC's UDP counts of the
//!    connections), against a raw iroh-blobs transfer of the same envelopes as one collection
//!    (two in-memory stores, one connection) in the same run.
//! 2. Two nodes in sync with BIG events each; each then gets HALF new events of its own: the
//!    time, `Log` round trips and bytes until both digests are equal again.
//!
//! Usage: cargo bench -p meshnode-gateway --bench sync -- [N] [AUTHORS] [BIG] [SCRATCH]
//! Prints one JSON object on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshnode_gateway::config::Config;
use meshnode_gateway::node::{self, Node, files};
use meshnode_ledger::Status;
use meshnode_schemas::*;

mod workload;

/// Author `u`'s catalog entry: its first event.
fn skill(u: usize) -> Payload {
    Payload::SkillPublish(SkillPublish {
        skill_id: format!("bench-skill-{u}"),
        name: format!("Bench skill {u}"),
        version: "1.0.0".into(),
        description: format!("a skill published by bench author {u} for the sync benchmark"),
        domain: ["vision", "speech", "text", "code"][u % 4].into(),
        capabilities: vec!["inference".into()],
        specializations: vec![format!("topic-{}", u % 10)],
        embedding: Vector::new(&[(u % 7) as f32, 1.0, 0.5, 0.25, 0.0, 1.0, 2.0, 3.0])
            .expect("vector"),
        blob: BlobHash::of(format!("weights-{u}").as_bytes()),
        size: 1 << 20,
        base_model: "llama-3-8b".into(),
        license: "Apache-2.0".into(),
        price: 10,
    })
}

/// A `blob.host` by a fresh author (needs no funds).
fn fresh(net: BlobHash, i: u64) -> SignedEvent {
    let k = workload::key(1_000_000 + i);
    let body = EventBody {
        net,
        author: author_of(&k),
        seq: 1,
        prev: None,
        deps: vec![],
        ts: 0,
        payload: Payload::BlobHost(BlobHost {
            blob: BlobHash::of(&i.to_le_bytes()),
            pinned: true,
        }),
    };
    SignedEvent::sign(body, &k).expect("sign")
}

async fn open(dir: &Path, genesis: Option<&Path>) -> anyhow::Result<Node> {
    node::init(dir, genesis, "bench")?;
    let mut config = Config::load(dir)?;
    // Loopback only, ports chosen by the system.
    config.p2p_addr = "127.0.0.1:0".parse()?;
    Node::open(dir, config).await
}

async fn ingest(node: &Node, events: &[SignedEvent]) -> anyhow::Result<()> {
    let envelopes: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(e.envelope.clone()))
        .collect();
    let mut receipts = Vec::new();
    for chunk in envelopes.chunks(20_000) {
        receipts.extend(node.ledger.enqueue_many(chunk.to_vec()).await);
    }
    for receipt in receipts {
        let status = receipt.wait().await?.status;
        anyhow::ensure!(
            matches!(status, Status::Accepted),
            "not accepted: {status:?}"
        );
    }
    Ok(())
}

/// Waits until the two ledgers' state digests are equal; the time it took.
async fn converge(a: &Node, b: &Node, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if a.ledger.state_digest()? == b.ledger.state_digest()? {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < limit, "no convergence in {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// (bytes, round trips) of every connection either node pulls on; a node's round trips are
/// its `Log` requests and its document sessions' round trips, per node (one direction each).
fn wire(nodes: &[&Node]) -> (u64, Vec<u64>) {
    let mut bytes = 0;
    let mut round_trips = Vec::new();
    for node in nodes {
        let mut trips = 0;
        for peer in node.mesh.get().map(|m| m.peers()).unwrap_or_default() {
            bytes += peer.bytes_in + peer.bytes_out;
            trips += peer.requests + peer.doc_round_trips;
        }
        round_trips.push(trips);
    }
    (bytes, round_trips)
}

/// A bare endpoint on loopback with the iroh-blobs ALPN and the mesh's QUIC windows (2 MiB
/// per stream, 16 MiB per connection; with iroh's defaults a 10k-blob collection failed with
/// "too many gaps in stream buffer").
async fn endpoint(seed: u8) -> anyhow::Result<iroh::Endpoint> {
    use iroh::endpoint::QuicTransportConfig;
    Ok(iroh::Endpoint::builder(iroh::endpoint::presets::Empty)
        .crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .secret_key(iroh::SecretKey::from_bytes(&[seed; 32]))
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")?
        .alpns(vec![iroh_blobs::ALPN.to_vec()])
        .transport_config(
            QuicTransportConfig::builder()
                .stream_receive_window((2u32 << 20).into())
                .receive_window((16u32 << 20).into())
                .build(),
        )
        .bind()
        .await?)
}

/// The peer: the same envelopes as one iroh-blobs collection, fetched over one connection
/// between two in-memory stores. (seconds, bytes on the wire both ways).
async fn raw_iroh_blobs(envelopes: &[Vec<u8>]) -> anyhow::Result<(f64, u64)> {
    use iroh_blobs::format::collection::Collection;
    let sender = iroh_blobs::store::mem::MemStore::new();
    let receiver = iroh_blobs::store::mem::MemStore::new();
    let batch = sender.batch().await?;
    let mut items = Vec::with_capacity(envelopes.len());
    let mut tags = Vec::with_capacity(envelopes.len());
    for (i, e) in envelopes.iter().enumerate() {
        let tag = batch.add_bytes(e.clone()).await?;
        items.push((i.to_string(), tag.hash()));
        tags.push(tag);
    }
    let root = Collection::from_iter(items).store(&sender).await?;
    let provider = endpoint(201).await?;
    let mut addr = iroh::EndpointAddr::new(provider.id());
    for socket in provider.bound_sockets() {
        addr = addr.with_ip_addr(socket);
    }
    let router = iroh::protocol::Router::builder(provider)
        .accept(
            iroh_blobs::ALPN,
            iroh_blobs::BlobsProtocol::new(&sender, None),
        )
        .spawn();
    let client = endpoint(202).await?;
    let started = Instant::now();
    let conn = client.connect(addr, iroh_blobs::ALPN).await?;
    receiver
        .remote()
        .fetch(
            conn.clone(),
            iroh_blobs::HashAndFormat::hash_seq(root.hash()),
        )
        .complete()
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let stats = conn.stats();
    let bytes = stats.udp_rx.bytes + stats.udp_tx.bytes;
    conn.close(0u32.into(), b"done");
    router.shutdown().await?;
    drop((tags, batch));
    Ok((secs, bytes))
}

struct Pair {
    a: Node,
    b: Node,
    _dir: tempfile::TempDir,
}

impl Pair {
    async fn close(self) -> anyhow::Result<()> {
        self.a.shutdown().await?;
        self.b.shutdown().await
    }
}

/// Node A with `events` ingested, node B of the same network, empty; both meshes started.
async fn pair(scratch: &Path, n: usize, authors: usize) -> anyhow::Result<(Pair, Vec<Vec<u8>>)> {
    let dir = tempfile::Builder::new()
        .prefix("meshnode-bench-sync-")
        .tempdir_in(scratch)?;
    let a = open(&dir.path().join("a"), None).await?;
    let issuer = node::read_key_file(&dir.path().join("a").join(files::NODE_KEY))?;
    let events = workload::workload(n, a.net, &issuer, authors, Some(skill));
    ingest(&a, &events).await?;
    let b = open(
        &dir.path().join("b"),
        Some(&dir.path().join("a").join(files::GENESIS)),
    )
    .await?;
    a.start_mesh().await?;
    b.start_mesh().await?;
    let envelopes = events.into_iter().map(|e| e.envelope).collect();
    Ok((Pair { a, b, _dir: dir }, envelopes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let number = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(args
            .get(i)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (n, authors, big) = (number(0, 10_000)?, number(1, 100)?, number(2, 100_000)?);
    let scratch = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);

    // 1. An empty node catches up with one that has N events.
    eprintln!("sync: {n} events of {authors} authors on A");
    let (p, envelopes) = pair(&scratch, n, authors).await?;
    let payload: usize = envelopes.iter().map(Vec::len).sum::<usize>();
    // Let A's query tables take the events in before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticket = p.a.mesh.get().expect("mesh").ticket().to_string();
    let started = Instant::now();
    p.b.mesh.get().expect("mesh").add_peer(&ticket)?;
    converge(&p.a, &p.b, Duration::from_secs(300)).await?;
    let catch_up = started.elapsed().as_secs_f64();
    let (bytes, requests) = wire(&[&p.a, &p.b]);
    let requests: u64 = requests.iter().sum();
    eprintln!("sync: B caught up in {catch_up:.3} s, {bytes} bytes, {requests} round trips");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (bytes_settled, _) = wire(&[&p.a, &p.b]);
    let (raw_secs, raw_bytes) = raw_iroh_blobs(&envelopes).await?;
    eprintln!("sync: raw iroh-blobs collection: {raw_secs:.3} s, {raw_bytes} bytes");
    p.close().await?;

    // 2. Two nodes with BIG events each, in sync, then 5 new events on each side.
    eprintln!("sync: {big} events on both sides");
    let (p, _) = pair(&scratch, big, authors).await?;
    let ticket = p.a.mesh.get().expect("mesh").ticket().to_string();
    let started = Instant::now();
    p.b.mesh.get().expect("mesh").add_peer(&ticket)?;
    converge(&p.a, &p.b, Duration::from_secs(600)).await?;
    let big_catch_up = started.elapsed().as_secs_f64();
    let (big_bytes, _) = wire(&[&p.a, &p.b]);
    eprintln!("sync: B caught up with {big} events in {big_catch_up:.1} s");
    // Both pull each other now; let the duplicate reads of each other's logs finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (before_bytes, before_requests) = wire(&[&p.a, &p.b]);
    let half = 5u64;
    let on_a: Vec<SignedEvent> = (0..half).map(|i| fresh(p.a.net, i)).collect();
    let on_b: Vec<SignedEvent> = (half..2 * half).map(|i| fresh(p.a.net, i)).collect();
    let started = Instant::now();
    ingest(&p.a, &on_a).await?;
    ingest(&p.b, &on_b).await?;
    converge(&p.a, &p.b, Duration::from_secs(60)).await?;
    let reconcile = started.elapsed().as_secs_f64();
    let (after_bytes, after_requests) = wire(&[&p.a, &p.b]);
    // Both directions run at once: the slower one's round trips (idle polls in the window
    // included) are the reconciliation's.
    let diff_bytes = after_bytes - before_bytes;
    let diff_requests = after_requests
        .iter()
        .zip(&before_requests)
        .map(|(after, before)| after - before)
        .max()
        .unwrap_or(0);
    eprintln!(
        "sync: reconciled {} events in {reconcile:.3} s, {diff_bytes} bytes, {diff_requests} round trips",
        2 * half
    );
    p.close().await?;
    println!(
        "{}",
        serde_json::json!({
            "n_events": n, "authors": authors, "payload_bytes": payload,
            "catch_up_secs": catch_up, "wire_bytes": bytes, "round_trips": requests,
            "wire_bytes_after_2s": bytes_settled,
            "raw_iroh_blobs_secs": raw_secs, "raw_iroh_blobs_bytes": raw_bytes,
            "big": {
                "n_events": big, "catch_up_secs": big_catch_up, "wire_bytes": big_bytes,
                "differ_by": 2 * half, "reconcile_secs": reconcile,
                "reconcile_bytes": diff_bytes, "reconcile_round_trips": diff_requests,
            },
        })
    );
    Ok(())
}
