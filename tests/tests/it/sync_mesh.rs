//! Replication between real node processes on loopback (relays off): peers added by ticket,
//! events pulled in bulk in each peer's acceptance order, every one verified by the ledger.

use std::time::Duration;

use iroh::endpoint::{RecvStream, SendStream};
use meshnode_schemas::{
    BlobHash, BlobHost, EventBody, Payload, SignedEvent, SigningKey, author_of,
};
use meshnode_sync::craft::ask_with_bloom;
use meshnode_sync::wire::{self, Header, Request};
use serde_json::Value;

use crate::harness::{TestNode, client, status};

/// The `seq`th `blob.host` of `blob` by the author of `seed`, after `prev`.
fn hosting(
    net: BlobHash,
    seed: u8,
    seq: u64,
    prev: Option<&SignedEvent>,
    blob: BlobHash,
) -> SignedEvent {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let body = EventBody {
        net,
        author: author_of(&key),
        seq,
        prev: prev.map(|p| p.id),
        deps: Vec::new(),
        ts: 1_700_000_000_000 + i64::try_from(seq).expect("seq"),
        payload: Payload::BlobHost(BlobHost { blob, pinned: true }),
    };
    SignedEvent::sign(body, &key).expect("sign")
}

/// A `blob.host` by a fresh author (its first event): needs no funds.
fn host_event(net: BlobHash, seed: u8) -> SignedEvent {
    hosting(net, seed, 1, None, BlobHash::of(&[seed]))
}

/// The peers `node` lists (`meshnode --json peer ls`).
fn peer_list(node: &TestNode) -> Value {
    let out = node.cli(&["--json", "peer", "ls"]);
    serde_json::from_slice(&out.stdout).expect("peer ls json")
}

/// Waits until `node` lists every peer of `tickets` as banned, at most `limit`.
async fn all_banned(node: &TestNode, tickets: &[&str], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let listed = peer_list(node);
        let banned: Vec<bool> = tickets
            .iter()
            .map(|t| listed_peer(&listed, "ticket", t)["banned_until_ms"].is_u64())
            .collect();
        if banned.iter().all(|b| *b) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all banned ({banned:?}): {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The listed peer whose `field` is `value` (null if none).
fn listed_peer(listed: &Value, field: &str, value: &str) -> Value {
    listed["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p[field] == value)
        .cloned()
        .unwrap_or_default()
}

async fn metrics(node: &TestNode) -> String {
    client()
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

async fn submit(node: &TestNode, event: &SignedEvent) {
    submit_envelope(node, event.envelope.clone()).await;
}

async fn submit_envelope(node: &TestNode, envelope: Vec<u8>) {
    let response = client()
        .post(format!("{}/v1/events", node.url))
        .bearer_auth(&node.token)
        .header("content-type", "application/cbor")
        .body(envelope)
        .send()
        .await
        .expect("post");
    assert!(response.status().is_success(), "{}", response.status());
}

fn ticket(status: &Value) -> String {
    status["ticket"].as_str().expect("ticket").to_string()
}

fn add_peer(node: &TestNode, ticket: &str) {
    let out = node.cli(&["peer", "add", ticket]);
    assert!(
        out.status.success(),
        "peer add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (events, state digest) of a node.
async fn digest(node: &TestNode) -> (u64, String) {
    let s = status(node).await;
    (
        s["events"].as_u64().expect("events"),
        s["state_digest"].as_str().expect("digest").to_string(),
    )
}

/// Waits until every node has `events` events and the same state digest.
async fn converged(nodes: &[&TestNode], events: u64) -> Vec<(u64, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for node in nodes {
            seen.push(digest(node).await);
        }
        if seen.iter().all(|s| s.0 == events && s.1 == seen[0].1) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence in 60 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a node answers to a fixed set of reads over replicated data: SQL over state and
/// append tables, a vector search, `knn()` by text, a node's account, the forks.
async fn mesh_answers(node: &TestNode, origin: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (name, text) in [
        ("balances", "SELECT * FROM balances ORDER BY account"),
        (
            "skills",
            "SELECT id, author, skill_id, name, blob FROM skills ORDER BY id",
        ),
        ("reputation", "SELECT * FROM reputation ORDER BY subject"),
        (
            "hosts",
            "SELECT id, author, blob FROM blob_hosts ORDER BY id",
        ),
        (
            "knn",
            "SELECT k.name FROM knn('skills', 'help me pick the grapes at the right time', 2) k",
        ),
    ] {
        let (_, body) = crate::harness::sql(node, text).await;
        out.insert(name.into(), body["rows"].clone());
    }
    let (_, first) =
        crate::harness::sql(node, "SELECT embedding FROM skills ORDER BY id LIMIT 1").await;
    let (_, search) = crate::harness::post(
        node,
        "/v1/search",
        serde_json::json!({"table": "skills", "vector": first["rows"][0][0], "k": 3}),
        false,
    )
    .await;
    let found: Vec<Value> = search["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["row"]["id"].clone())
        .collect();
    out.insert("search".into(), Value::Array(found));
    let origin_node = origin["node"].as_str().expect("node");
    let account: Value = client()
        .get(format!("{}/v1/accounts/{origin_node}", node.url))
        .send()
        .await
        .expect("account")
        .json()
        .await
        .expect("account json");
    out.insert("account".into(), account);
    out.insert("forks".into(), forks(node).await);
    Value::Object(out)
}

#[tokio::test]
async fn three_nodes_in_a_line_converge_and_a_restarted_node_catches_up() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let genesis = a.data_dir().join("genesis.cbor");
    let mut b = TestNode::start_joining(&genesis).expect("node b");
    let mut c = TestNode::start_joining(&genesis).expect("node c");
    let (sa, sb) = (status(&a).await, status(&b).await);
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    assert!(demo_events > 0);

    // A line: b knows a, c knows only b.
    add_peer(&b, &ticket(&sa));
    add_peer(&c, &ticket(&sb));
    converged(&[&a, &b, &c], demo_events).await;

    // Writes on each end reach the other end through the middle (a learnt b, b learnt c
    // when they dialled).
    submit(&a, &host_event(net, 1)).await;
    submit(&c, &host_event(net, 2)).await;
    submit(&b, &host_event(net, 3)).await;
    converged(&[&a, &b, &c], demo_events + 3).await;

    // Same answers to SQL over the replicated tables.
    // (The tables follow the ledger within a flush.)
    let sql = "SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, on_a) = crate::harness::sql(&a, sql).await;
        let (_, on_c) = crate::harness::sql(&c, sql).await;
        let total: u64 = on_c["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r[1].as_u64())
            .sum();
        if on_a["rows"] == on_c["rows"] && total == demo_events + 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{on_a} vs {on_c}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The same accounts, forks and answers to a fixed set of SQL and vector queries on all
    // three (leaf indexes differ: each node has its own acceptance order).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answers_on_a = loop {
        let mut on = Vec::new();
        for node in [&a, &b, &c] {
            on.push(mesh_answers(node, &sa).await);
        }
        if on.iter().all(|x| *x == on[0]) {
            break on[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{on:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for (what, n) in [("knn", 2), ("search", 3)] {
        assert!(
            answers_on_a[what].as_array().is_some_and(|r| r.len() == n),
            "{what}: {answers_on_a}"
        );
    }
    for what in ["balances", "skills", "hosts", "reputation"] {
        assert!(
            answers_on_a[what].as_array().is_some_and(|r| !r.is_empty()),
            "{what}: {answers_on_a}"
        );
    }
    assert!(
        answers_on_a["account"]["head_seq"].is_u64(),
        "{answers_on_a}"
    );

    // The events table says which peer delivered each event first; on a, where a's write
    // was posted, it has none. (Local, so not in the queries above.) a's write reached c
    let via = |id: String| format!("SELECT via FROM events WHERE id = '{id}'");
    // through b, or straight from a once peer exchange told c about it.
    let from_a = host_event(net, 1).id.to_hex();
    let (_, on_c) = crate::harness::sql(&c, &via(from_a.clone())).await;
    let peer = &on_c["rows"][0][0];
    assert!(*peer == sb["node"] || *peer == sa["node"], "{on_c}");
    let (_, on_a) = crate::harness::sql(&a, &via(from_a)).await;
    assert_eq!(on_a["rows"][0][0], Value::Null, "{on_a}");

    // Peers are listed with their progress; c's peers survive a SIGKILL and it catches up.
    // (c learnt a by peer exchange: the events came from either.)
    let listed = peer_list(&c);
    let peers = listed["peers"].as_array().expect("peers");
    for p in peers {
        assert_eq!(p["connected"], true, "{listed}");
        assert_eq!(p["behind"], 0, "{listed}");
    }
    let events_in: u64 = peers.iter().filter_map(|p| p["events_in"].as_u64()).sum();
    assert!(events_in >= demo_events, "{listed}");
    // a reads b's log too, but b elides the events a delivered: a got only the few writes
    // made on b and c, not the demo events back.
    let on_a = peer_list(&a);
    let from_b = listed_peer(&on_a, "id", sb["node"].as_str().expect("node"));
    let events_in = from_b["events_in"].as_u64().unwrap_or(u64::MAX);
    assert!(
        events_in <= 2 && demo_events > 10,
        "a got {events_in} events from b: {on_a}"
    );
    // /metrics carries the same, per peer.
    let metrics = metrics(&c).await;
    let b_id = sb["node"].as_str().expect("node");
    for line in [
        format!("meshnode_peer{{peer=\"{b_id}\",what=\"connected\"}} 1"),
        format!("meshnode_peer{{peer=\"{b_id}\",what=\"behind\"}} 0"),
    ] {
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    c.kill9();
    submit(&a, &host_event(net, 4)).await;
    c.restart().expect("restart c");
    converged(&[&a, &b, &c], demo_events + 4).await;
    // The middle node restarts on the same p2p port (the system chose it on the first start),
    // so the tickets a and c hold for it still work.
    let b_ticket = ticket(&status(&b).await);
    b.kill9();
    submit(&a, &host_event(net, 5)).await;
    b.restart().expect("restart b");
    assert_eq!(ticket(&status(&b).await), b_ticket);
    submit(&c, &host_event(net, 6)).await;
    converged(&[&a, &b, &c], demo_events + 6).await;

    // A bad ticket and a missing peer get clear errors.
    let out = c.cli(&["peer", "add", "endpointnotaticket"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_peer"));
    let out = c.cli(&["peer", "rm", &"ab".repeat(32)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_peer"));
}

/// How a lying peer answers every `Log` request.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// Events that do not verify: random bytes, and real events whose signature was
    /// tampered with.
    Invalid,
    /// Valid events of 50 fresh authors.
    Flood,
    /// Valid events sent before what they depend on (seq 2 of logs whose seq 1 it never
    /// sends).
    OutOfOrder,
    /// More events than the request asked for.
    Unrequested,
}

/// A peer whose log lies as `lie` says.
#[derive(Debug, Clone)]
struct Liar {
    net: BlobHash,
    lie: Lie,
}

impl Liar {
    /// The frames of its answer to a `Log` request for at most `max` events.
    fn frames(&self, max: u32) -> Vec<Vec<u8>> {
        let net = self.net;
        match self.lie {
            Lie::Flood => (0..50u8)
                .map(|i| host_event(net, 150 + i).envelope)
                .collect(),
            Lie::Invalid => (0..20u8)
                .map(|i| {
                    if i % 2 == 0 {
                        return vec![i; 200];
                    }
                    let mut envelope = host_event(net, 100 + i).envelope;
                    let last = envelope.len() - 1;
                    envelope[last] ^= 0x55;
                    envelope
                })
                .collect(),
            Lie::OutOfOrder => (0..20u8)
                .map(|i| {
                    let first = hosting(net, 200 + i, 1, None, BlobHash::of(&[i]));
                    hosting(net, 200 + i, 2, Some(&first), BlobHash::of(&[i, 2])).envelope
                })
                .collect(),
            Lie::Unrequested => (0..=max).map(|_| vec![0u8]).collect(),
        }
    }
}

impl Answer for Liar {
    async fn answer(&self, request: Request, send: &mut SendStream, _: &mut RecvStream) -> bool {
        let max = match request {
            Request::Log { max_events, .. } => Some(max_events),
            _ => None,
        };
        // No documents: its events are what is under test (they come by its log).
        let is_doc = matches!(request, Request::Doc { .. });
        let header = Header {
            size: if max.is_some() { 1_000_000 } else { 0 },
            error: is_doc.then(|| "bad_request".to_string()),
            ..Header::default()
        };
        if wire::write_json(send, &header).await.is_err() {
            return false;
        }
        for frame in max.map(|max| self.frames(max)).unwrap_or_default() {
            if wire::write_frame(send, &frame).await.is_err() {
                return false;
            }
        }
        let _ = wire::write_frame(send, &[]).await;
        true
    }
}

/// What a test peer answers to one request of `/meshnode/sync/1` (the stream is finished
/// after); `false` stops serving the connection.
trait Answer: std::fmt::Debug + Clone + Send + Sync + 'static {
    fn answer(
        &self,
        request: Request,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> impl std::future::Future<Output = bool> + Send;
}

/// A test peer speaking `/meshnode/sync/1` with `A`'s answers.
#[derive(Debug, Clone)]
struct Fake<A>(A);

impl<A: Answer> iroh::protocol::ProtocolHandler for Fake<A> {
    async fn accept(
        &self,
        conn: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(request) = wire::read_json::<Request>(&mut recv, 4096).await else {
                break;
            };
            let go_on = self.0.answer(request, &mut send, &mut recv).await;
            let _ = send.finish();
            if !go_on {
                break;
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn peers_sending_invalid_unordered_or_unrequested_events_are_banned_while_honest_peers_keep_syncing()
 {
    let a = TestNode::start_demo(&[]).expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let sa = status(&a).await;
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    add_peer(&b, &ticket(&sa));

    let mut liars = Vec::new();
    for (seed, lie) in [
        (42, Lie::Invalid),
        (45, Lie::OutOfOrder),
        (46, Lie::Unrequested),
    ] {
        let (t, router) = fake_peer(Liar { net, lie }, seed).await;
        add_peer(&b, &t);
        liars.push((lie, t, router));
    }

    // Honest writes keep arriving during the attack.
    submit(&a, &host_event(net, 9)).await;
    converged(&[&a, &b], demo_events + 1).await;

    // Every liar is banned (20 bad events at +10, 20 out of order at +20, or one answer
    // past the request at +20 per try pass the limit of 100) and nothing it sent was
    // applied or left waiting.
    let tickets: Vec<&str> = liars.iter().map(|(_, t, _)| t.as_str()).collect();
    all_banned(&b, &tickets, Duration::from_secs(60)).await;
    let listed = peer_list(&b);
    for (lie, t, _) in &liars {
        let why = listed_peer(&listed, "ticket", t)["last_offence"].clone();
        let expected = match lie {
            Lie::OutOfOrder => "before what it depends on",
            Lie::Unrequested => "more events than asked for",
            // Random bytes and tampered signatures: the codes of malformed or badly signed
            // envelopes.
            _ => "malformed",
        };
        let why = why.as_str().unwrap_or("");
        let signature = matches!(lie, Lie::Invalid) && why.contains("signature");
        assert!(why.contains(expected) || signature, "{lie:?}: {why}");
    }
    submit(&a, &host_event(net, 10)).await;
    converged(&[&a, &b], demo_events + 2).await;
    assert_eq!(status(&b).await["pending"], 0);
    for (_, _, router) in liars {
        router.shutdown().await.expect("liar shutdown");
    }
}

/// A peer of our own on loopback speaking the protocol with `answers`; its ticket.
async fn fake_peer<A: Answer>(answers: A, seed: u8) -> (String, iroh::protocol::Router) {
    fake_endpoint(wire::ALPN, Fake(answers), seed).await
}

#[tokio::test]
async fn a_peer_cannot_bring_in_more_fresh_authors_than_its_quota() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let sa = status(&a).await;
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    let genesis = a.data_dir().join("genesis.cbor");
    let b = TestNode::start_joining_with(&genesis, &[("MESHNODE_SYNC_NEW_AUTHORS_PER_HOUR", "20")])
        .expect("node b");
    add_peer(&b, &ticket(&sa));
    converged(&[&a, &b], demo_events).await;

    // 50 valid events of 50 fresh authors: 20 are taken, then the peer is paused.
    let (flood_ticket, router) = fake_peer(
        Liar {
            net,
            lie: Lie::Flood,
        },
        43,
    )
    .await;
    add_peer(&b, &flood_ticket);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while status(&b).await["events"].as_u64() != Some(demo_events + 20) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            status(&b).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&b).await["events"].as_u64(), Some(demo_events + 20));
    // The honest peer's new author still gets through (its own quota).
    submit(&a, &host_event(net, 11)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while status(&b).await["events"].as_u64() != Some(demo_events + 21) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            status(&b).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    router.shutdown().await.expect("flooder shutdown");
}

/// The `seq`th `blob.host` of the author of `seed` after `prev`, hosting the blob of `salt`.
fn host_at(net: BlobHash, seed: u8, seq: u64, prev: Option<&SignedEvent>, salt: u8) -> SignedEvent {
    hosting(net, seed, seq, prev, BlobHash::of(&[seed, salt]))
}

/// An author's log of `len` events whose hosted blobs are salted with `salt`.
fn branch(net: BlobHash, seed: u8, len: u64, salt: u8) -> Vec<SignedEvent> {
    let mut log: Vec<SignedEvent> = Vec::new();
    for seq in 1..=len {
        let event = host_at(net, seed, seq, log.last(), salt);
        log.push(event);
    }
    log
}

async fn forks(node: &TestNode) -> Value {
    let response = client()
        .get(format!("{}/v1/forks", node.url))
        .send()
        .await
        .expect("forks");
    assert!(response.status().is_success());
    response.json().await.expect("forks json")
}

fn remove_peer(node: &TestNode, id: &str) {
    let out = node.cli(&["peer", "rm", id]);
    assert!(
        out.status.success(),
        "peer rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_fork_made_on_both_sides_of_a_partition_ends_in_the_same_proof_everywhere() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let (sa, sb) = (status(&a).await, status(&b).await);
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    add_peer(&b, &ticket(&sa));
    converged(&[&a, &b], demo_events).await;

    // Partition: each side forgets the other (a learnt b when b dialled).
    remove_peer(&b, sa["node"].as_str().expect("a's id"));
    remove_peer(&a, sb["node"].as_str().expect("b's id"));
    // One author signs two branches: 2 events on a's side, 4 on b's.
    let (left, right) = (branch(net, 77, 2, 1), branch(net, 77, 4, 2));
    for event in &left {
        submit(&a, event).await;
    }
    for event in &right {
        submit(&b, event).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(digest(&a).await.0, demo_events + 2, "the partition leaked");
    assert_eq!(digest(&b).await.0, demo_events + 4, "the partition leaked");
    assert_eq!(forks(&a).await["forks"], serde_json::json!([]));

    // The partition heals: both branches are kept everywhere, with one proof and one state.
    add_peer(&b, &ticket(&sa));
    let seen = converged(&[&a, &b], demo_events + 6).await;
    let (on_a, on_b) = (forks(&a).await, forks(&b).await);
    assert_eq!(on_a, on_b);
    let proofs = on_a["forks"].as_array().expect("forks");
    assert_eq!(proofs.len(), 1, "{on_a}");
    assert_eq!(proofs[0]["seq"], 1, "the lowest forked seq: {on_a}");
    assert_eq!(seen[0], seen[1]);
}

/// A `blob.host` of `blob` by the author of `seed` (its first event).
fn announce(net: BlobHash, seed: u8, blob: BlobHash) -> SignedEvent {
    hosting(net, seed, 1, None, blob)
}

/// The node announces that it hosts `hash` (a `blob.host` signed with its own key, which is
/// what makes its blob provider serve the blob).
fn host_on(node: &TestNode, hash: &str) {
    let key = node
        .data_dir()
        .join(meshnode_gateway::node::files::NODE_KEY);
    let payload = format!("{{\"blob\": \"{hash}\", \"pinned\": true}}");
    let out = node.cli(&[
        "event",
        "--key",
        key.to_str().expect("utf-8"),
        "blob.host",
        "--payload",
        &payload,
    ]);
    assert!(
        out.status.success(),
        "blob.host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn fetch(node: &TestNode, hash: &str) -> (reqwest::StatusCode, Value) {
    crate::harness::post(node, &format!("/v1/blobs/{hash}/fetch"), Value::Null, true).await
}

async fn blob_bytes(node: &TestNode, hash: &str) -> Vec<u8> {
    let response = client()
        .get(format!("{}/v1/blobs/{hash}", node.url))
        .send()
        .await
        .expect("get blob");
    assert!(response.status().is_success(), "{}", response.status());
    response.bytes().await.expect("blob bytes").to_vec()
}

/// An iroh-blobs provider that answers every request with the right size and wrong bytes.
#[derive(Debug, Clone)]
struct CorruptProvider;

impl iroh::protocol::ProtocolHandler for CorruptProvider {
    async fn accept(
        &self,
        conn: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            // The request (a hash and ranges); the answer is a blob of one chunk group, sent
            // as its size and its bytes (no tree nodes), wrong ones.
            let _ = recv.read_to_end(64 << 10).await;
            let size: u64 = 4096;
            let mut answer = size.to_le_bytes().to_vec();
            answer.extend(std::iter::repeat_n(0xA5u8, 4096));
            let _ = send.write_all(&answer).await;
            let _ = send.finish();
        }
        Ok(())
    }
}

/// An endpoint of our own on loopback with `alpn` served by `handler`; its ticket.
async fn fake_endpoint<H: iroh::protocol::ProtocolHandler>(
    alpn: &'static [u8],
    handler: H,
    seed: u8,
) -> (String, iroh::protocol::Router) {
    let endpoint = test_endpoint(seed, vec![alpn.to_vec()]).await;
    let mut addr = iroh::EndpointAddr::new(endpoint.id());
    for socket in endpoint.bound_sockets() {
        addr = addr.with_ip_addr(socket);
    }
    let ticket = iroh_tickets::endpoint::EndpointTicket::new(addr).to_string();
    let router = iroh::protocol::Router::builder(endpoint)
        .accept(alpn, handler)
        .spawn();
    (ticket, router)
}

async fn test_endpoint(seed: u8, alpns: Vec<Vec<u8>>) -> iroh::Endpoint {
    iroh::Endpoint::builder(iroh::endpoint::presets::Empty)
        .crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .secret_key(iroh::SecretKey::from_bytes(&[seed; 32]))
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("addr")
        .alpns(alpns)
        .bind()
        .await
        .expect("test endpoint")
}

#[tokio::test]
async fn a_blob_is_fetched_from_a_peer_that_serves_it_and_a_corrupt_host_is_blamed() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let sa = status(&a).await;
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let a_id = sa["node"].as_str().expect("a's id").to_string();
    add_peer(&b, &ticket(&sa));
    let demo_events = sa["events"].as_u64().expect("events");
    converged(&[&a, &b], demo_events).await;

    // A 4 KiB blob on a, not announced by a: a refuses to serve it.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = crate::harness::upload(&a, data.clone()).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let (got, body) = fetch(&b, &hash).await;
    assert_eq!(got, reqwest::StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_available", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&a_id),
        "the message names the peers tried: {body}"
    );

    // Someone else's announcement does not make a serve it.
    let blob = BlobHash::parse(&hash).expect("hash");
    submit(&a, &announce(net, 47, blob)).await;
    converged(&[&a, &b], demo_events + 1).await;
    let (got, body) = fetch(&b, &hash).await;
    assert_eq!(got, reqwest::StatusCode::NOT_FOUND, "{body}");

    // A host that serves wrong bytes, announced as the blob's host: asked first and blamed
    // (a, asked next, has not announced the blob yet).
    let (corrupt_ticket, router) = fake_endpoint(iroh_blobs::ALPN, CorruptProvider, 44).await;
    add_peer(&b, &corrupt_ticket);
    submit(&a, &announce(net, 44, blob)).await;
    converged(&[&a, &b], demo_events + 2).await;
    let (got, body) = fetch(&b, &hash).await;
    assert_eq!(got, reqwest::StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("corrupt data"),
        "{body}"
    );
    // Once a announces it itself, the blob comes from a.
    host_on(&a, &hash);
    converged(&[&a, &b], demo_events + 3).await;
    let (got, body) = fetch(&b, &hash).await;
    assert_eq!(got, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["source"], a_id.as_str(), "{body}");
    assert_eq!(body["size"], 4096);
    assert_eq!(blob_bytes(&b, &hash).await, data);
    let listed = peer_list(&b);
    let corrupt = listed_peer(&listed, "ticket", &corrupt_ticket);
    // Scored +50 per corrupt answer: after the second fetch asked it again, banned.
    assert!(
        corrupt["score"].as_u64().unwrap_or(0) >= 50 || corrupt["banned_until_ms"].is_u64(),
        "{listed}"
    );

    // Fetched means pinned and durable: it survives a GC and a SIGKILL.
    let mut b = b;
    let (got, _) = crate::harness::post(&b, "/v1/gc", Value::Null, true).await;
    assert!(got.is_success());
    b.kill9();
    b.restart().expect("restart b");
    assert_eq!(blob_bytes(&b, &hash).await, data);
    // A second fetch is local; the CLI says where it came from.
    let out = b.cli(&["blob", "fetch", &hash]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from local"));

    // A node whose blob cap is under a blob's size does not download it (the size is asked
    // for first, proven by the blob's last chunk).
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let big_hash = crate::harness::upload(&a, big).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    host_on(&a, &big_hash);
    let c = TestNode::start_joining_with(
        &a.data_dir().join("genesis.cbor"),
        &[("MESHNODE_BLOB_BYTES_MAX", "100000")],
    )
    .expect("node c");
    add_peer(&c, &ticket(&sa));
    converged(
        &[&a, &c],
        status(&a).await["events"].as_u64().expect("events"),
    )
    .await;
    let (got, body) = fetch(&c, &big_hash).await;
    assert_eq!(got, reqwest::StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("the blob is 300000 bytes, more than this fetch may take (100000 bytes"),
        "{body}"
    );

    // A host no one introduced: d knows no peer, only the events (from a's audit bundle),
    // and dials a at the address a announced with its first blob.host.
    let bundle = tempfile::tempdir().expect("bundle dir");
    let out = a.cli(&["audit", "--export", bundle.path().to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node d");
    for envelope in bundle_envelopes(bundle.path()) {
        submit_envelope(&d, envelope).await;
    }
    assert_eq!(peer_list(&d)["peers"], serde_json::json!([]));
    let (got, body) = fetch(&d, &hash).await;
    assert_eq!(got, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["source"], a_id.as_str(), "{body}");
    assert_eq!(blob_bytes(&d, &hash).await, data);
    router.shutdown().await.expect("corrupt provider shutdown");
}

/// The envelopes of an audit bundle, in log order (each a u32 BE length and the bytes).
fn bundle_envelopes(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(dir.join("events.bin")).expect("events.bin");
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    out
}

#[tokio::test]
async fn the_blob_provider_refuses_push_and_blobs_outside_its_allow_list() {
    use iroh_blobs::protocol::{ChunkRanges, ChunkRangesSeq, GetManyRequest, PushRequest};
    use iroh_blobs::store::mem::MemStore;
    let a = TestNode::start_demo(&[]).expect("node a");
    let sa = status(&a).await;
    let (private, public) = (vec![1u8; 3000], vec![2u8; 3000]);
    let private_hash = crate::harness::upload(&a, private).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let public_hash = crate::harness::upload(&a, public.clone()).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    host_on(&a, &public_hash);
    let iroh_hash =
        |h: &str| iroh_blobs::Hash::from_bytes(*BlobHash::parse(h).expect("hash").as_bytes());
    let (addr, _) = meshnode_sync::parse_ticket(&ticket(&sa)).expect("ticket");
    let endpoint = test_endpoint(46, vec![iroh_blobs::ALPN.to_vec()]).await;
    let client_store = iroh_blobs::store::mem::MemStore::new();
    let connect = || async {
        endpoint
            .connect(addr.clone(), iroh_blobs::ALPN)
            .await
            .expect("connect to a's blob provider")
    };

    // get: the announced blob is served, the other is not.
    let got = client_store
        .remote()
        .fetch(connect().await, iroh_hash(&public_hash))
        .complete()
        .await;
    assert!(got.is_ok(), "{got:?}");
    let refused = client_store
        .remote()
        .fetch(connect().await, iroh_hash(&private_hash))
        .complete()
        .await;
    assert!(refused.is_err(), "a blob no event references was served");

    // get-many: served for public blobs only, refused as soon as one hash is outside the list.
    let request = GetManyRequest::builder()
        .hash(iroh_hash(&public_hash), ChunkRanges::all())
        .build();
    let many = client_store
        .remote()
        .execute_get_many(connect().await, request)
        .complete()
        .await;
    assert!(many.is_ok(), "{many:?}");
    let request = GetManyRequest::builder()
        .hash(iroh_hash(&public_hash), ChunkRanges::all())
        .hash(iroh_hash(&private_hash), ChunkRanges::all())
        .build();
    let many = client_store
        .remote()
        .execute_get_many(connect().await, request)
        .complete()
        .await;
    assert!(many.is_err(), "get-many bypassed the allow-list");

    // push: refused; the pushed blob is not on a.
    let pushed = vec![3u8; 2000];
    let tag = client_store.add_bytes(pushed.clone()).await.expect("add");
    let push = client_store
        .remote()
        .execute_push(
            connect().await,
            PushRequest::new(tag.hash, ChunkRangesSeq::root()),
        )
        .complete()
        .await;
    // The client's side of a push may end without error (it only sends); what counts is
    // that nothing reached a's store.
    eprintln!("push answered: {push:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stat = client()
        .head(format!(
            "{}/v1/blobs/{}",
            a.url,
            BlobHash::of(&pushed).to_hex()
        ))
        .send()
        .await
        .expect("head");
    assert_eq!(stat.status(), reqwest::StatusCode::NOT_FOUND);

    // One peer gets at most 4 blob connections at once: a fifth is closed unserved.
    let held = futures::future::join_all((0..4).map(|_| connect())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fifth = MemStore::new()
        .remote()
        .fetch(connect().await, iroh_hash(&public_hash))
        .complete()
        .await;
    assert!(fifth.is_err(), "a fifth connection was served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = MemStore::new()
        .remote()
        .fetch(connect().await, iroh_hash(&public_hash))
        .complete()
        .await;
    assert!(again.is_ok(), "{again:?}");

    // The node still serves and writes after all of it.
    assert_eq!(blob_bytes(&a, &public_hash).await, public);
    crate::harness::upload(&a, vec![4u8; 100]).await;
}

/// How many `blob.host` events `author` has on `node` (as its events table says).
async fn hosts_by(node: &TestNode, author: &str) -> u64 {
    let sql = format!(
        "SELECT count(*) AS n FROM events WHERE kind = 'blob.host' AND author = '{author}'"
    );
    let (_, body) = crate::harness::sql(node, &sql).await;
    body["rows"][0][0].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_node_with_replicate_hosts_weights_of_skills_short_of_hosts_within_its_quota() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let sa = status(&a).await;
    // Demo weights are 64 KiB each: the quota fits one skill's.
    let b = TestNode::start_joining_with(
        &a.data_dir().join("genesis.cbor"),
        &[
            ("MESHNODE_SYNC_REPLICATE", "2"),
            ("MESHNODE_SYNC_REPLICATE_BYTES_MAX", "70000"),
        ],
    )
    .expect("node b");
    let b_node = status(&b).await["node"].as_str().expect("node").to_string();
    add_peer(&b, &ticket(&sa));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while hosts_by(&b, &b_node).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b announced no weights"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The announced weights are on b, and the announcement reached a.
    let (_, row) = crate::harness::sql(
        &b,
        &format!("SELECT id FROM events WHERE kind = 'blob.host' AND author = '{b_node}'"),
    )
    .await;
    let id = row["rows"][0][0].as_str().expect("event id").to_string();
    let event: Value = client()
        .get(format!("{}/v1/events/{id}", b.url))
        .send()
        .await
        .expect("event")
        .json()
        .await
        .expect("event json");
    let blob = event["body"]["payload"]["blob"]
        .as_str()
        .expect("blob")
        .to_string();
    assert_eq!(blob_bytes(&b, &blob).await.len(), 64 * 1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hosts_by(&a, &b_node).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never saw b's host"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Another round (every 10 s) takes on nothing more: the quota is used.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(hosts_by(&b, &b_node).await, 1);
    // Status and metrics say how many blobs the node hosts (counted every 10 s at most).
    assert_eq!(status(&b).await["peers"]["blobs_hosted"], 1);
    let metrics = metrics(&b).await;
    assert!(metrics.contains("meshnode_blobs_hosted 1"), "{metrics}");
}

#[tokio::test]
async fn the_node_signs_its_own_events_one_at_a_time() {
    let a = std::sync::Arc::new(TestNode::start_demo(&[]).expect("node a"));
    let node = status(&a).await["node"].as_str().expect("node").to_string();
    let head = |a: std::sync::Arc<TestNode>, node: String| async move {
        let account: Value = client()
            .get(format!("{}/v1/accounts/{node}", a.url))
            .send()
            .await
            .expect("account")
            .json()
            .await
            .expect("account json");
        account["head_seq"].as_u64().expect("head_seq")
    };
    let before = head(a.clone(), node.clone()).await;
    // Eight requests to the node and two `meshnode event` runs with its key, all at once.
    let mut runs = Vec::new();
    for i in 0..8u8 {
        let a = a.clone();
        runs.push(tokio::spawn(async move {
            let blob = BlobHash::of(&[i, 1]).to_hex();
            let body = serde_json::json!({
                "kind": "blob.host",
                "payload": {"blob": blob, "pinned": true},
            });
            let (got, answer) = crate::harness::post(&a, "/v1/events/own", body, true).await;
            assert_eq!(got, reqwest::StatusCode::CREATED, "{answer}");
        }));
    }
    for i in 0..2u8 {
        let a = a.clone();
        runs.push(tokio::task::spawn_blocking(move || {
            host_on(&a, &BlobHash::of(&[i, 2]).to_hex());
        }));
    }
    for run in runs {
        run.await.expect("join");
    }
    assert_eq!(head(a.clone(), node).await, before + 10);
    assert_eq!(forks(&a).await["forks"], serde_json::json!([]));
    // Bad input gets a clear error and signs nothing.
    let (got, body) = crate::harness::post(
        &a,
        "/v1/events/own",
        serde_json::json!({"kind": "blob.host", "payload": {"blob": "zz"}}),
        true,
    )
    .await;
    assert_eq!(got, reqwest::StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_event", "{body}");
    let (got, body) = crate::harness::post(
        &a,
        "/v1/events/own",
        serde_json::json!({"kind": "blob.host", "payload": {"blob": BlobHash::of(b"x").to_hex(), "pinned": true}, "deps": ["ab".repeat(32)]}),
        true,
    )
    .await;
    assert_eq!(got, reqwest::StatusCode::BAD_REQUEST, "{body}");
    let (got, _) = crate::harness::post(
        &a,
        "/v1/events/own",
        serde_json::json!({"kind": "blob.host", "payload": {}}),
        false,
    )
    .await;
    assert_eq!(got, reqwest::StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_ticket_gives_the_advertised_addresses() {
    let a = TestNode::start_with(&[("MESHNODE_P2P_ADVERTISE", "127.0.0.2:4444, 127.0.0.1:5555")])
        .expect("node a");
    let (addr, id) = meshnode_sync::parse_ticket(&ticket(&status(&a).await)).expect("ticket");
    let mut given: Vec<String> = addr.ip_addrs().map(|s| s.to_string()).collect();
    given.sort();
    assert_eq!(given, ["127.0.0.1:5555", "127.0.0.2:4444"]);
    assert_eq!(id, status(&a).await["node"].as_str().expect("node"));
    // A bad address is refused at start with the variable's name.
    let bad = TestNode::start_with(&[("MESHNODE_P2P_ADVERTISE", "nowhere")]);
    let Err(error) = bad else {
        panic!("a node started with MESHNODE_P2P_ADVERTISE=nowhere");
    };
    let message = format!("{error:#}");
    assert!(message.contains("MESHNODE_P2P_ADVERTISE"), "{message}");

    // Relays are off unless configured; a configured one is named in the ticket, and
    // direct addresses keep working when it cannot be reached (no test leaves loopback).
    let relay = "http://127.0.0.1:9/";
    let r = TestNode::start_joining_with(
        &a.data_dir().join("genesis.cbor"),
        &[("MESHNODE_SYNC_RELAYS", relay)],
    )
    .expect("node with a relay");
    let (addr, _) = meshnode_sync::parse_ticket(&ticket(&status(&r).await)).expect("ticket");
    let relays: Vec<String> = addr.relay_urls().map(|u| u.to_string()).collect();
    assert_eq!(relays, [relay]);
    assert!(addr.ip_addrs().next().is_some());
    let (plain, _) = meshnode_sync::parse_ticket(&ticket(&status(&a).await)).expect("ticket");
    assert_eq!(plain.relay_urls().count(), 0);
    add_peer(&r, &ticket(&status(&a).await));
    let events = status(&a).await["events"].as_u64().expect("events");
    converged(&[&a, &r], events).await;
    // Address lookup is off unless configured; with a pkarr relay set, a node publishes its
    // signed addresses there, and another finds it there from a ticket of its id alone.
    let (pkarr_url, puts) = fake_pkarr_relay().await;
    let env = [("MESHNODE_SYNC_ADDRESS_LOOKUP", pkarr_url.as_str())];
    let l = TestNode::start_demo(&env).expect("node with address lookup");
    let sl = status(&l).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while puts.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut id = [0u8; 32];
    hex::decode_to_slice(sl["node"].as_str().expect("node"), &mut id).expect("hex");
    let bare = iroh::EndpointAddr::new(iroh::PublicKey::from_bytes(&id).expect("key"));
    let id_only = iroh_tickets::endpoint::EndpointTicket::new(bare).to_string();
    // A node without lookup refuses the ticket; one with it dials through the lookup.
    let out = a.cli(&["peer", "add", &id_only]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("address lookup"));
    let m = TestNode::start_joining_with(&l.data_dir().join("genesis.cbor"), &env)
        .expect("second node with address lookup");
    add_peer(&m, &id_only);
    let events = sl["events"].as_u64().expect("events");
    converged(&[&l, &m], events).await;
    let bad = TestNode::start_with(&[("MESHNODE_SYNC_RELAYS", "not a url")]);
    let Err(error) = bad else {
        panic!("a node started with a relay that is not a URL");
    };
    assert!(format!("{error:#}").contains("relays"), "{error:#}");
}

/// A pkarr relay on loopback: keeps the last packet PUT for each key and serves it on GET;
/// its URL and the number of PUTs taken.
async fn fake_pkarr_relay() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("pkarr listener");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let puts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let packets: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let counted = puts.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (packets, puts) = (packets.clone(), counted.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let key = path.trim_start_matches('/').to_string();
                let body = if method == "put" {
                    let packet = buf[head_end..head_end + length].to_vec();
                    packets.lock().expect("lock").insert(key, packet);
                    puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Some(Vec::new())
                } else {
                    packets.lock().expect("lock").get(&key).cloned()
                };
                let answer = match body {
                    Some(body) => {
                        let mut a = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        a.extend(body);
                        a
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = socket.write_all(&answer).await;
            });
        }
    });
    (url, puts)
}

/// How a hostile owner of a document answers a node's first sync message.
#[derive(Debug, Clone, Copy)]
enum BadDoc {
    /// A compressed change that inflates to 64 MiB.
    Bomb,
    /// A change of 79 bytes whose runs declare 2^40 operations (automerge spins on it).
    RunBomb,
    /// A well-formed change by an actor that is not the document's.
    ForeignActor,
    /// A frame announcing 64 MiB.
    Oversized,
}

/// A peer whose documents are hostile (its `Log` is empty and honest).
#[derive(Debug, Clone)]
struct BadOwner(BadDoc);

impl BadOwner {
    fn doc_answer(&self, ask: &[u8]) -> Vec<u8> {
        use automerge::sync::{Message, SyncDoc};
        use automerge::transaction::Transactable;
        use meshnode_sync::craft;
        match self.0 {
            BadDoc::Bomb => craft::message_with_chunk(craft::deflate_bomb_chunk(64)),
            BadDoc::RunBomb => craft::message_with_chunk(craft::run_length_bomb()),
            BadDoc::ForeignActor | BadDoc::Oversized => {
                let mut doc = automerge::Automerge::new()
                    .with_actor(automerge::ActorId::from(&[0x66u8; 16][..]));
                let mut tx = doc.transaction();
                tx.put(
                    automerge::ROOT,
                    hex::encode([1u8; 32]),
                    automerge::ScalarValue::Bytes(vec![0; 72]),
                )
                .expect("put");
                tx.commit();
                let mut state = automerge::sync::State::new();
                let ask = Message::decode(ask).expect("the node's message decodes");
                doc.receive_sync_message(&mut state, ask).expect("receive");
                doc.generate_sync_message(&mut state)
                    .expect("an answer")
                    .encode()
            }
        }
    }
}

impl Answer for BadOwner {
    async fn answer(&self, request: Request, send: &mut SendStream, recv: &mut RecvStream) -> bool {
        let is_doc = matches!(request, Request::Doc { .. });
        let header = Header {
            epoch: is_doc.then_some(1),
            ..Header::default()
        };
        if wire::write_json(send, &header).await.is_err() {
            return false;
        }
        if !is_doc {
            let _ = wire::write_frame(send, &[]).await;
            return true;
        }
        let Ok(Some(ask)) = wire::read_frame(recv, 1 << 20).await else {
            return false;
        };
        if let BadDoc::Oversized = self.0 {
            let _ = send.write_all(&(64u32 << 20).to_le_bytes()).await;
            let _ = send.write_all(&vec![0u8; 1 << 20]).await;
        } else {
            let _ = wire::write_frame(send, &self.doc_answer(&ask)).await;
        }
        true
    }
}

/// Dials `node` as a stranger and sends a `Doc` session's first message as `ask`; whether
/// the node answered it (and not closed the stream).
async fn ask_doc(node_ticket: &str, net: &str, seed: u8, ask: &[u8]) -> bool {
    let endpoint = test_endpoint(seed, vec![]).await;
    let t: iroh_tickets::endpoint::EndpointTicket = node_ticket.parse().expect("ticket");
    let answered = async {
        let conn = endpoint
            .connect(t.endpoint_addr().clone(), wire::ALPN)
            .await
            .ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let request = Request::Doc {
            net: net.to_string(),
            kind: meshnode_sync::DocKind::Heads,
        };
        wire::write_json(&mut send, &request).await.ok()?;
        let _: Header = wire::read_json(&mut recv, 4096).await.ok()?;
        wire::write_frame(&mut send, ask).await.ok()?;
        wire::read_frame(&mut recv, 4 << 20).await.ok()
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), answered)
        .await
        .ok()
        .flatten()
        .is_some();
    endpoint.close().await;
    answered
}

fn rss_kib(node: &TestNode) -> u64 {
    let pid = node.pid().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn hostile_automerge_messages_are_refused_and_their_peers_banned_while_sync_goes_on() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let sa = status(&a).await;
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    add_peer(&b, &ticket(&sa));
    converged(&[&a, &b], demo_events).await;
    let rss_before = rss_kib(&b);

    // Owners b replicates: a deflate bomb, a run-length bomb, a foreign actor, an oversized
    // frame.
    let mut routers = Vec::new();
    let mut tickets = Vec::new();
    let owners = [
        BadDoc::Bomb,
        BadDoc::RunBomb,
        BadDoc::ForeignActor,
        BadDoc::Oversized,
    ];
    for (i, bad) in owners.into_iter().enumerate() {
        let (t, router) = fake_peer(BadOwner(bad), 70 + i as u8).await;
        add_peer(&b, &t);
        tickets.push(t);
        routers.push(router);
    }
    // Replicas asking b with broken bloom filters: zero bits per entry (automerge divides
    // by zero), u32::MAX probes (it reserves 16 GiB). A sane one is answered.
    let b_ticket = ticket(&status(&b).await);
    let net_hex = sa["net"].as_str().expect("net").to_string();
    assert!(ask_doc(&b_ticket, &net_hex, 80, &ask_with_bloom(10, 10, 7, 13)).await);
    assert!(!ask_doc(&b_ticket, &net_hex, 81, &ask_with_bloom(10, 0, 7, 0)).await);
    assert!(
        !ask_doc(
            &b_ticket,
            &net_hex,
            82,
            &ask_with_bloom(10, 10, u32::MAX.into(), 13)
        )
        .await
    );

    // Honest writes keep arriving during the attack.
    submit(&a, &host_event(net, 11)).await;
    converged(&[&a, &b], demo_events + 1).await;

    let banned: Vec<&str> = tickets.iter().map(String::as_str).collect();
    all_banned(&b, &banned, Duration::from_secs(30)).await;
    // The run-length bomb was refused by the checks, not by the time budget after
    // automerge spun on it.
    let listed = peer_list(&b);
    let why = &listed_peer(&listed, "ticket", &tickets[1])["last_offence"];
    assert!(
        why.as_str()
            .unwrap_or("")
            .contains("more than 20000 values"),
        "{why}"
    );
    // The strangers that sent broken filters are banned too: not even a sane message is
    // answered now.
    assert!(!ask_doc(&b_ticket, &net_hex, 81, &ask_with_bloom(10, 10, 7, 13)).await);
    assert!(ask_doc(&b_ticket, &net_hex, 83, &ask_with_bloom(10, 10, 7, 13)).await);

    submit(&a, &host_event(net, 12)).await;
    converged(&[&a, &b], demo_events + 2).await;
    let rss_after = rss_kib(&b);
    assert!(
        rss_after < rss_before + 256 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // b holds a's documents (the catalog is synced every 10 s) and says how far behind
    // them it is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = peer_list(&b);
        let pa = listed_peer(&listed, "ticket", &ticket(&sa));
        if pa["heads_behind"] == 0
            && pa["heads_authors"].as_u64().unwrap_or(0) > 0
            && pa["catalog_entries"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{pa}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for router in routers {
        router.shutdown().await.expect("shutdown");
    }
}

/// iroh's `BlobsProtocol::shutdown` would shut the blob store down under the ledger; the
/// mesh serves blobs through its own handler, so stopping it leaves the store and the
/// ledger working.
#[tokio::test]
async fn shutting_the_mesh_down_leaves_the_store_and_the_ledger_open() {
    use meshnode_gateway::node::{self, Node};
    let dir = tempfile::tempdir().expect("dir");
    node::init(dir.path(), None, "mesh-shutdown").expect("init");
    let mut config = meshnode_gateway::config::Config::load(dir.path()).expect("config");
    config.p2p_addr = "127.0.0.1:0".parse().expect("addr");
    let node = Node::open(dir.path(), config).await.expect("open");
    let mesh = node.start_mesh().await.expect("mesh");
    let ticket = mesh.ticket().to_string();
    mesh.shutdown().await;
    // The endpoint is gone: nothing answers at the ticket.
    let (addr, _) = meshnode_sync::parse_ticket(&ticket).expect("ticket");
    let endpoint = test_endpoint(90, vec![]).await;
    let dialled = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint.connect(addr, iroh_blobs::ALPN),
    )
    .await;
    assert!(!matches!(dialled, Ok(Ok(_))), "the endpoint still answers");
    endpoint.close().await;
    // The store still takes and serves blobs; the ledger still accepts and reads them back.
    let added = node
        .store
        .add_bytes(vec![7u8; 5000], meshnode_store::PinMode::Pin)
        .await
        .expect("the store still takes blobs");
    let bytes = node
        .store
        .get_bytes(&added.hash, 1 << 20)
        .await
        .expect("the store still serves blobs");
    assert_eq!(bytes.len(), 5000);
    let host = Payload::BlobHost(BlobHost {
        blob: added.hash,
        pinned: true,
    });
    let submitted = node.append_own(Vec::new(), host).await.expect("accepted");
    assert!(node.ledger.has_event(&submitted.id));
    // With the endpoint gone the node announces no address (its ticket is dead).
    assert!(node.ledger.node_entry(&node.node).expect("read").is_none());
    assert!(submitted.index.is_some(), "{submitted:?}");
    node.shutdown().await.expect("shutdown");
}
