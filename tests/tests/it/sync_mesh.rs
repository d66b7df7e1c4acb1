//! Replication between real node processes on loopback (relays off): peers added by ticket,
//! events pulled in bulk in each peer's acceptance order, every one verified by the ledger.

use std::time::Duration;

use meshnode_schemas::{
    BlobHash, BlobHost, EventBody, Payload, SignedEvent, SigningKey, author_of,
};
use serde_json::Value;

use crate::harness::{TestNode, client, status};

/// A `blob.host` by a fresh author (its first event): needs no funds.
fn host_event(net: BlobHash, seed: u8) -> SignedEvent {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let body = EventBody {
        net,
        author: author_of(&key),
        seq: 1,
        prev: None,
        deps: Vec::new(),
        ts: 1_700_000_000_000 + i64::from(seed),
        payload: Payload::BlobHost(BlobHost {
            blob: BlobHash::of(&[seed]),
            pinned: true,
        }),
    };
    SignedEvent::sign(body, &key).expect("sign")
}

async fn submit(node: &TestNode, event: &SignedEvent) {
    let response = client()
        .post(format!("{}/v1/events", node.url))
        .bearer_auth(&node.token)
        .header("content-type", "application/cbor")
        .body(event.envelope.clone())
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

#[tokio::test]
async fn three_nodes_in_a_line_converge_and_a_restarted_node_catches_up() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let genesis = a.data_dir().join("genesis.cbor");
    let b = TestNode::start_joining(&genesis).expect("node b");
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

    // Peers are listed with their progress; c's peers survive a SIGKILL and it catches up.
    let peers = c.cli(&["--json", "peer", "ls"]);
    let listed: Value = serde_json::from_slice(&peers.stdout).expect("peer ls json");
    let first = &listed["peers"][0];
    assert_eq!(first["connected"], true, "{listed}");
    assert_eq!(first["behind"], 0, "{listed}");
    assert!(
        first["events_in"].as_u64().unwrap_or(0) >= demo_events,
        "{listed}"
    );
    // /metrics carries the same, per peer.
    let metrics = client()
        .get(format!("{}/metrics", c.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
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

    // A bad ticket and a missing peer get clear errors.
    let out = c.cli(&["peer", "add", "endpointnotaticket"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_peer"));
    let out = c.cli(&["peer", "rm", &"ab".repeat(32)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_peer"));
}

/// A peer that answers every `Log` request with events that do not verify (random bytes
/// and real events whose signature was tampered with) or, with `flood`, with valid events of
/// 50 fresh authors.
#[derive(Debug, Clone)]
struct Liar {
    net: BlobHash,
    flood: bool,
}

impl iroh::protocol::ProtocolHandler for Liar {
    async fn accept(
        &self,
        conn: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        use meshnode_sync::wire::{self, Header, Request};
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(request) = wire::read_json::<Request>(&mut recv, 4096).await else {
                break;
            };
            let is_log = matches!(request, Request::Log { .. });
            let header = Header {
                size: if is_log { 1_000_000 } else { 0 },
                ..Header::default()
            };
            if wire::write_json(&mut send, &header).await.is_err() {
                break;
            }
            if is_log && self.flood {
                for i in 0..50u8 {
                    let event = host_event(self.net, 150 + i);
                    if wire::write_frame(&mut send, &event.envelope).await.is_err() {
                        break;
                    }
                }
            } else if is_log {
                for i in 0..20u8 {
                    let bytes = if i % 2 == 0 {
                        vec![i; 200]
                    } else {
                        let mut envelope = host_event(self.net, 100 + i).envelope.to_vec();
                        let last = envelope.len() - 1;
                        envelope[last] ^= 0x55;
                        envelope
                    };
                    if wire::write_frame(&mut send, &bytes).await.is_err() {
                        break;
                    }
                }
            }
            let _ = wire::write_frame(&mut send, &[]).await;
            let _ = send.finish();
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_peer_sending_invalid_events_is_banned_while_honest_peers_keep_syncing() {
    let a = TestNode::start_demo(&[]).expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let sa = status(&a).await;
    let net = BlobHash::parse(sa["net"].as_str().expect("net")).expect("net hex");
    let demo_events = sa["events"].as_u64().expect("events");
    add_peer(&b, &ticket(&sa));

    let (liar_ticket, router) = fake_peer(Liar { net, flood: false }, 42).await;
    add_peer(&b, &liar_ticket);

    // Honest writes keep arriving during the attack.
    submit(&a, &host_event(net, 9)).await;
    converged(&[&a, &b], demo_events + 1).await;

    // The liar is banned (20 bad events at +10 each pass the limit of 100) and nothing it
    // sent was applied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = b.cli(&["--json", "peer", "ls"]);
        let listed: Value = serde_json::from_slice(&out.stdout).expect("peer ls json");
        let banned = listed["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["ticket"] == liar_ticket.as_str() && p["banned_until_ms"].is_u64());
        if banned {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not banned: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    submit(&a, &host_event(net, 10)).await;
    converged(&[&a, &b], demo_events + 2).await;
    assert_eq!(status(&b).await["pending"], 0);
    router.shutdown().await.expect("liar shutdown");
}

/// A peer of our own on loopback speaking the protocol with `handler`; its ticket.
async fn fake_peer(handler: Liar, seed: u8) -> (String, iroh::protocol::Router) {
    let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Empty)
        .crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .secret_key(iroh::SecretKey::from_bytes(&[seed; 32]))
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("addr")
        .alpns(vec![meshnode_sync::wire::ALPN.to_vec()])
        .bind()
        .await
        .expect("fake peer endpoint");
    let mut addr = iroh::EndpointAddr::new(endpoint.id());
    for socket in endpoint.bound_sockets() {
        addr = addr.with_ip_addr(socket);
    }
    let ticket = iroh_tickets::endpoint::EndpointTicket::new(addr).to_string();
    let router = iroh::protocol::Router::builder(endpoint)
        .accept(meshnode_sync::wire::ALPN, handler)
        .spawn();
    (ticket, router)
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
    let (flood_ticket, router) = fake_peer(Liar { net, flood: true }, 43).await;
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
