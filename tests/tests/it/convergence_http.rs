//! Convergence across real nodes: two node processes of one network, fed the same events
//! over HTTP in different orders (forks, transfers built on a forked credit, a key rotation,
//! basin deltas, late prevs and deps), end with the same state digest, accounts, fork proofs
//! and SQL answers.

use meshnode_schemas::{
    AuthorKey, BasinDelta, BasinPublish, BlobHash, BlobHost, EventBody, EventId, KeyRotate,
    Payload, SignedEvent, SigningKey, TokenMint, TokenTransfer, Vector, author_of,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestNode, client};

struct Events {
    net: BlobHash,
    list: Vec<SignedEvent>,
}

impl Events {
    fn sign(
        &mut self,
        key: &SigningKey,
        author: AuthorKey,
        seq: u64,
        prev: Option<EventId>,
        deps: &[EventId],
        payload: Payload,
    ) -> EventId {
        let mut deps = deps.to_vec();
        deps.sort();
        let body = EventBody {
            net: self.net,
            author,
            seq,
            prev,
            deps,
            ts: 1_700_000_000_000 + self.list.len() as i64,
            payload,
        };
        let event = SignedEvent::sign(body, key).expect("sign");
        let id = event.id;
        self.list.push(event);
        id
    }
}

fn pay(to: &SigningKey, amount: u64) -> Payload {
    Payload::TokenTransfer(TokenTransfer {
        to: author_of(to),
        amount,
        memo: String::new(),
    })
}

fn mint(to: &SigningKey, amount: u64) -> Payload {
    Payload::TokenMint(TokenMint {
        to: author_of(to),
        amount,
        reason: String::new(),
    })
}

/// The events: the five-event fork case of issue #9 and a little of everything else.
fn events(net: BlobHash, issuer: &SigningKey) -> Vec<SignedEvent> {
    let key = |seed: u8| SigningKey::from_bytes(&[seed; 32]);
    let (mallory, hank, vic, alice, bob) = (key(11), key(12), key(13), key(14), key(15));
    let mut e = Events {
        net,
        list: Vec::new(),
    };
    let issuer_author = author_of(issuer);
    let m = e.sign(issuer, issuer_author, 1, None, &[], mint(&mallory, 100));
    let t = e.sign(
        &mallory,
        author_of(&mallory),
        1,
        None,
        &[m],
        pay(&hank, 100),
    );
    e.sign(&mallory, author_of(&mallory), 1, None, &[m], pay(&vic, 100));
    let s = e.sign(&hank, author_of(&hank), 1, None, &[t], pay(&vic, 60));
    e.sign(&hank, author_of(&hank), 2, Some(s), &[], pay(&vic, 40));
    // An honest payment chain.
    let m2 = e.sign(issuer, issuer_author, 2, Some(m), &[], mint(&alice, 500));
    let a1 = e.sign(&alice, author_of(&alice), 1, None, &[m2], pay(&bob, 120));
    e.sign(&bob, author_of(&bob), 1, None, &[a1], pay(&vic, 20));
    // A key rotation and an event signed by the new key.
    let new_key = key(16);
    let r = e.sign(
        &alice,
        author_of(&alice),
        2,
        Some(a1),
        &[],
        Payload::KeyRotate(KeyRotate {
            new_key: author_of(&new_key),
        }),
    );
    e.sign(&new_key, author_of(&alice), 3, Some(r), &[], pay(&hank, 30));
    // A basin with a named writer; a stranger's delta is refused everywhere.
    let basin = e.sign(
        &bob,
        author_of(&bob),
        2,
        e.list
            .iter()
            .rev()
            .find(|x| x.body.author == author_of(&bob))
            .map(|x| x.id),
        &[],
        Payload::BasinPublish(BasinPublish {
            basin_id: "mind".into(),
            coordinates: Vector::new(&[0.25, 0.5]).expect("vector"),
            metadata: Default::default(),
            writers: vec![author_of(&vic)],
        }),
    );
    let delta = |parent, value: f32| {
        Payload::BasinDelta(BasinDelta {
            basin_id: "mind".into(),
            parent,
            indices: vec![],
            values: Vector::new(&[value, value]).expect("vector"),
            weight_ppm: 300_000,
        })
    };
    let v1 = e.sign(&vic, author_of(&vic), 1, None, &[basin], delta(basin, 1.5));
    e.sign(&vic, author_of(&vic), 2, Some(v1), &[], delta(v1, 2.5));
    e.sign(
        &mallory,
        author_of(&mallory),
        2,
        Some(t),
        &[basin],
        delta(basin, 0.1),
    );
    e.sign(
        &hank,
        author_of(&hank),
        3,
        e.list
            .iter()
            .rev()
            .find(|x| x.body.author == author_of(&hank))
            .map(|x| x.id),
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"weights"),
            pinned: true,
        }),
    );
    e.list
}

async fn submit(http: &reqwest::Client, node: &TestNode, event: &SignedEvent) -> StatusCode {
    http.post(format!("{}/v1/events", node.url))
        .bearer_auth(&node.token)
        .header("content-type", "application/cbor")
        .body(event.envelope.clone())
        .send()
        .await
        .expect("post")
        .status()
}

async fn get(http: &reqwest::Client, node: &TestNode, path: &str) -> Value {
    http.get(format!("{}{path}", node.url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn sql(http: &reqwest::Client, node: &TestNode, text: &str) -> Value {
    let (status, body) = {
        let r = http
            .post(format!("{}/v1/query", node.url))
            .bearer_auth(&node.token)
            .json(&json!({"action": "sync"}))
            .send()
            .await
            .expect("sync");
        (r.status(), r.text().await.unwrap_or_default())
    };
    assert!(status.is_success(), "sync: {status} {body}");
    http.post(format!("{}/v1/sql", node.url))
        .json(&json!({ "sql": text }))
        .send()
        .await
        .expect("sql")
        .json::<Value>()
        .await
        .expect("json")["rows"]
        .clone()
}

/// Every row of the query table `balances` in `view` equals the ledger's account of its key.
fn assert_balances_are_the_accounts(view: &Value, context: &str) {
    for row in view["balances"].as_array().expect("rows") {
        let account = view["accounts"]
            .as_array()
            .and_then(|all| all.iter().find(|a| a["key"] == row[0]))
            .unwrap_or_else(|| panic!("{context}: no account for {row}"));
        let fields = [
            "balance",
            "received",
            "received_contested",
            "sent",
            "sent_contested",
        ];
        for (i, field) in fields.iter().enumerate() {
            assert_eq!(
                row[i + 1],
                account[field],
                "{context}: {field} of {}",
                row[0]
            );
        }
    }
}

/// What two nodes must agree on.
async fn view(http: &reqwest::Client, node: &TestNode, keys: &[String]) -> Value {
    let status = get(http, node, "/v1/status").await;
    let mut accounts = Vec::new();
    for key in keys {
        let mut a = get(http, node, &format!("/v1/accounts/{key}")).await;
        // Which branch of a forked log a node extended first is its own business.
        for local in ["head_seq", "head_id", "signing_key"] {
            a.as_object_mut().expect("object").remove(local);
        }
        accounts.push(a);
    }
    let forks = get(http, node, "/v1/forks").await;
    let balances = sql(
        http,
        node,
        "SELECT account, balance, received, received_contested, sent, sent_contested \
         FROM balances ORDER BY account",
    )
    .await;
    let basins = sql(
        http,
        node,
        "SELECT id, coordinates, n_versions, head FROM basins ORDER BY id",
    )
    .await;
    json!({
        "events": status["events"],
        "supply": status["supply"],
        "state_digest": status["state_digest"],
        "accounts": accounts,
        "forks": forks,
        "balances": balances,
        "basins": basins,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_fed_in_different_orders_agree() {
    let a = TestNode::start().expect("node a");
    let b = TestNode::start_joining(&a.data_dir().join("genesis.cbor")).expect("node b");
    let http = client();
    let net = get(&http, &a, "/v1/status").await["net"]
        .as_str()
        .map(|s| BlobHash::from_hex(s).expect("net"))
        .expect("net");
    assert_eq!(get(&http, &b, "/v1/status").await["net"], net.to_hex());
    let issuer = meshnode_schemas::parse_key_file(
        &std::fs::read_to_string(a.data_dir().join("node.key")).expect("node.key"),
    )
    .expect("key");
    let events = events(net, &issuer);

    // Node A in the order they were made; node B in reverse (everything waits for its prev
    // or deps first), with every event delivered twice.
    for e in &events {
        let status = submit(&http, &a, e).await;
        assert!(status.is_success() || status == 422, "{status}");
    }
    for e in events.iter().rev().chain(events.iter()) {
        let status = submit(&http, &b, e).await;
        assert!(status.is_success() || status == 422, "{status}");
    }

    let mut keys: Vec<String> = events.iter().map(|e| e.body.author.to_hex()).collect();
    keys.sort();
    keys.dedup();
    let (va, vb) = (view(&http, &a, &keys).await, view(&http, &b, &keys).await);
    assert_eq!(va, vb, "the nodes disagree");
    // The five-event case: every event accepted, the fork proven, Hank never negative.
    assert_eq!(va["forks"]["forks"].as_array().map(Vec::len), Some(1));
    let hank = author_of(&SigningKey::from_bytes(&[12; 32])).to_hex();
    let hank_account = get(&http, &a, &format!("/v1/accounts/{hank}")).await;
    assert_eq!(hank_account["received_contested"], 100, "{hank_account}");
    // Hank's 30 from Alice (signed with her rotated-to key) is his only spendable credit.
    assert_eq!(hank_account["balance"], 30, "{hank_account}");
    assert_eq!(
        va["events"],
        events.len() as u64 - 1,
        "all but the stranger's delta"
    );
    assert_eq!(
        get(&http, &a, "/v1/audit").await["state_digest"],
        va["state_digest"]
    );

    // The query tables are projections of the ledger's state: the same numbers.
    let balances = va["balances"].as_array().expect("rows");
    assert_eq!(balances.len(), keys.len(), "{balances:?}");
    assert_balances_are_the_accounts(&va, "");
    let ledger_basins = get(&http, &a, "/v1/basins").await;
    for row in va["basins"].as_array().expect("rows") {
        let basin = ledger_basins["basins"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["id"] == row[0]))
            .unwrap_or_else(|| panic!("no basin {row}"));
        assert_eq!(row[1], basin["coordinates"]);
        assert_eq!((&row[2], &row[3]), (&basin["n_versions"], &basin["head"]));
    }
}

/// SplitMix64: a deterministic generator for the random workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random transfers among five authors with forks that grow on both branches, delivered in a
/// random order; after each round every query state table row equals the ledger's account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_tables_equal_the_ledger_after_random_workloads_with_forks() {
    let node = TestNode::start().expect("node");
    let http = client();
    let net = BlobHash::from_hex(
        get(&http, &node, "/v1/status").await["net"]
            .as_str()
            .expect("net"),
    )
    .expect("net");
    let issuer = meshnode_schemas::parse_key_file(
        &std::fs::read_to_string(node.data_dir().join("node.key")).expect("node.key"),
    )
    .expect("key");
    let users: Vec<SigningKey> = (40..45u8)
        .map(|s| SigningKey::from_bytes(&[s; 32]))
        .collect();
    let mut rng = Rng(9);
    let mut e = Events {
        net,
        list: Vec::new(),
    };
    // Branch heads per user: (seq, head); a fork adds a branch.
    let mut heads: Vec<Vec<(u64, Option<EventId>)>> = vec![vec![(0, None)]; users.len()];
    let mut credits: Vec<Vec<EventId>> = vec![Vec::new(); users.len()];
    let (mut issuer_seq, mut issuer_head) = (0u64, None);
    let mut keys: Vec<String> = users.iter().map(|u| author_of(u).to_hex()).collect();
    keys.push(author_of(&issuer).to_hex());
    keys.sort();
    for round in 0..3 {
        let start = e.list.len();
        for u in 0..users.len() {
            issuer_seq += 1;
            let m = e.sign(
                &issuer,
                author_of(&issuer),
                issuer_seq,
                issuer_head,
                &[],
                mint(&users[u], 1000),
            );
            issuer_head = Some(m);
            credits[u].push(m);
        }
        for _ in 0..40 {
            let u = rng.below(users.len());
            let b = rng.below(heads[u].len());
            let (seq, head) = heads[u][b];
            let fork = seq > 0 && rng.below(10) == 0;
            let (seq, prev) = if fork {
                let prev = e
                    .list
                    .iter()
                    .find(|x| Some(x.id) == head)
                    .and_then(|x| x.body.prev);
                (seq, prev)
            } else {
                (seq + 1, head)
            };
            let to = rng.below(users.len());
            let deps: Vec<EventId> = credits[u].iter().rev().take(2).copied().collect();
            let amount = 1 + rng.below(300) as u64;
            let id = e.sign(
                &users[u],
                author_of(&users[u]),
                seq,
                prev,
                &deps,
                pay(&users[to], amount),
            );
            if fork {
                heads[u].push((seq, Some(id)));
            } else {
                heads[u][b] = (seq, Some(id));
            }
            credits[to].push(id);
        }
        let mut order: Vec<usize> = (start..e.list.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        // Twice: what waited for an event refused later is simply refused again.
        for _ in 0..2 {
            for &i in &order {
                let status = submit(&http, &node, &e.list[i]).await;
                assert!(status.is_success() || status == 422, "{status}");
            }
        }
        let v = view(&http, &node, &keys).await;
        assert_balances_are_the_accounts(&v, &format!("round {round}"));
        let accepted = v["events"].as_u64().expect("events");
        assert!(
            accepted >= 30 * (round + 1),
            "round {round}: only {accepted} accepted"
        );
        let audit = get(&http, &node, "/v1/audit").await;
        assert_eq!(audit["ok"], true, "round {round}: {audit}");
        assert_eq!(audit["state_digest"], v["state_digest"]);
    }
    let forks = get(&http, &node, "/v1/forks").await;
    assert!(
        !forks["forks"].as_array().expect("forks").is_empty(),
        "the workload forks"
    );
    let v = view(&http, &node, &keys).await;
    assert!(
        v["balances"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|row| row[3].as_u64() > Some(0)),
        "some credits are contested: {}",
        v["balances"]
    );
}
