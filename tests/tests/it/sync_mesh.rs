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
