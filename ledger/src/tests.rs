//! Unit tests for the ledger: every kind and rule, forks, pending events, the transparency
//! log, audit and bundles, restart.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use meshnode_schemas::*;
use meshnode_store::{Store, StoreConfig};

use crate::Result;
use crate::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A test network: one issuer, a store and a ledger in a temp dir.
struct Net {
    dir: tempfile::TempDir,
    store: Store,
    ledger: Ledger,
    genesis: Genesis,
    net: BlobHash,
    heads: BTreeMap<AuthorKey, (u64, Option<EventId>)>,
}

const ISSUER: u8 = 1;

impl Net {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let genesis = Genesis::new("test", author_of(&key(ISSUER)), 1);
        let net = genesis.net().expect("net");
        let (store, ledger) = Self::open(dir.path(), &genesis, net).await;
        Self {
            dir,
            store,
            ledger,
            genesis,
            net,
            heads: BTreeMap::new(),
        }
    }

    async fn open(path: &std::path::Path, genesis: &Genesis, net: BlobHash) -> (Store, Ledger) {
        let store = Store::open(&path.join("blobs"), StoreConfig::default())
            .await
            .expect("store");
        let ledger = Ledger::open(
            &path.join("ledger"),
            store.clone(),
            genesis.clone(),
            net,
            key(200),
            LedgerConfig::default(),
        )
        .await
        .expect("ledger");
        (store, ledger)
    }

    async fn reopen(self) -> Self {
        self.ledger.shutdown().await;
        self.store.shutdown().await.expect("shutdown");
        let Net {
            dir,
            store,
            ledger,
            genesis,
            net,
            heads,
        } = self;
        drop(ledger);
        drop(store);
        let (store, ledger) = Self::open(dir.path(), &genesis, net).await;
        Net {
            dir,
            store,
            ledger,
            genesis,
            net,
            heads,
        }
    }

    /// Signs the next event of `signer`'s log (or of `author` when given, e.g. after a key
    /// rotation) without submitting it.
    fn sign(
        &mut self,
        signer: &SigningKey,
        author: Option<AuthorKey>,
        deps: &[EventId],
        payload: Payload,
    ) -> SignedEvent {
        let author = author.unwrap_or_else(|| author_of(signer));
        let (seq, prev) = self.heads.get(&author).copied().unwrap_or((0, None));
        let mut deps = deps.to_vec();
        deps.sort();
        deps.dedup();
        let body = EventBody {
            net: self.net,
            author,
            seq: seq + 1,
            prev,
            deps,
            ts: 1_700_000_000_000 + seq as i64,
            payload,
        };
        let event = SignedEvent::sign(body, signer).expect("sign");
        self.heads.insert(author, (seq + 1, Some(event.id)));
        event
    }

    async fn submit(&mut self, event: &SignedEvent) -> Result<Submitted> {
        self.ledger
            .submit(Bytes::from(event.envelope.clone()))
            .await
    }

    /// Signs and submits; expects acceptance; returns the id.
    async fn accept(&mut self, signer: &SigningKey, deps: &[EventId], payload: Payload) -> EventId {
        let event = self.sign(signer, None, deps, payload);
        let result = self.submit(&event).await.expect("accepted");
        assert_eq!(result.status, Status::Accepted, "{result:?}");
        event.id
    }

    /// Signs and submits; expects rejection with `code`; rolls the local head back.
    async fn refuse(
        &mut self,
        signer: &SigningKey,
        deps: &[EventId],
        payload: Payload,
        code: &str,
    ) {
        let author = author_of(signer);
        let before = self.heads.get(&author).copied();
        let event = self.sign(signer, None, deps, payload);
        match self.submit(&event).await {
            Err(e) => assert_eq!(e.code(), code, "{e}"),
            Ok(s) => panic!("expected {code}, got {s:?}"),
        }
        match before {
            Some(h) => self.heads.insert(author, h),
            None => self.heads.remove(&author),
        };
    }
}

fn mint(to: &SigningKey, amount: u64) -> Payload {
    Payload::TokenMint(TokenMint {
        to: author_of(to),
        amount,
        reason: "grant".into(),
    })
}

fn transfer(to: &SigningKey, amount: u64) -> Payload {
    Payload::TokenTransfer(TokenTransfer {
        to: author_of(to),
        amount,
        memo: String::new(),
    })
}

fn vector(values: &[f32]) -> Vector {
    Vector::new(values).expect("vector")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_follow_the_causal_past() {
    let mut net = Net::new().await;
    let (issuer, alice, bob, carol) = (key(ISSUER), key(2), key(3), key(4));
    let m1 = net.accept(&issuer, &[], mint(&alice, 100)).await;
    // A non-issuer cannot mint.
    net.refuse(&alice, &[], mint(&alice, 5), "not_issuer").await;
    // Alice cannot spend a credit that is not in her event's causal past.
    net.refuse(&alice, &[], transfer(&bob, 10), "insufficient_balance")
        .await;
    // Naming it in deps makes it spendable; not more than it holds.
    net.refuse(&alice, &[m1], transfer(&bob, 101), "insufficient_balance")
        .await;
    let t1 = net.accept(&alice, &[m1], transfer(&bob, 60)).await;
    // Already covered credits stay spendable without naming them again.
    net.accept(&alice, &[], transfer(&carol, 40)).await;
    net.refuse(&alice, &[], transfer(&carol, 1), "insufficient_balance")
        .await;
    // Bob reaches the credit through a later event of its log that depends on it.
    let b1 = net
        .accept(
            &bob,
            &[t1],
            Payload::BlobHost(BlobHost {
                blob: BlobHash::of(b"x"),
                pinned: true,
            }),
        )
        .await;
    let _ = b1;
    net.accept(&bob, &[], transfer(&carol, 60)).await;
    // Carol's 40 from Alice is reachable transitively: Alice's second transfer is after m1/t1
    // in Alice's log; naming Bob's transfer (whose past contains Alice's log up to t1) does
    // not include Alice's second transfer, so only the 60 from Bob is spendable.
    let bob_to_carol = net.heads[&author_of(&bob)].1.expect("head");
    net.refuse(
        &carol,
        &[bob_to_carol],
        transfer(&alice, 61),
        "insufficient_balance",
    )
    .await;
    net.accept(&carol, &[bob_to_carol], transfer(&alice, 60))
        .await;

    let alice_account = net.ledger.account(&author_of(&alice)).expect("account");
    assert_eq!(alice_account.balance, 60);
    assert_eq!(alice_account.received, 160);
    assert_eq!(alice_account.sent, 100);
    assert_eq!(alice_account.unreferenced_credits.len(), 1);
    let carol_account = net.ledger.account(&author_of(&carol)).expect("account");
    assert_eq!(carol_account.balance, 40, "{carol_account:?}");
    assert_eq!(net.ledger.supply().expect("supply"), 100);
    let held: u128 = net
        .ledger
        .accounts()
        .expect("accounts")
        .iter()
        .map(|(_, a)| a.balance())
        .sum();
    assert_eq!(held, 100);

    // Unreferenced credits survive a restart: Alice can still name and spend hers.
    let credit = alice_account.unreferenced_credits[0];
    let mut net = net.reopen().await;
    net.refuse(&alice, &[], transfer(&bob, 60), "insufficient_balance")
        .await;
    net.accept(&alice, &[credit], transfer(&bob, 60)).await;
    let alice_account = net.ledger.account(&author_of(&alice)).expect("account");
    assert!(alice_account.unreferenced_credits.is_empty());
    assert_eq!(alice_account.balance, 0);
    // The stored state (credits table included) matches a replay from the blobs.
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(report.ok, "{:?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_return_the_original_result() {
    let mut net = Net::new().await;
    let issuer = key(ISSUER);
    let event = net.sign(&issuer, None, &[], mint(&key(2), 5));
    let first = net.submit(&event).await.expect("first");
    let again = net.submit(&event).await.expect("again");
    assert_eq!(first.status, Status::Accepted);
    assert_eq!(again.status, Status::Duplicate);
    assert_eq!(
        (first.id, first.blob, first.seq, first.index),
        (again.id, again.blob, again.seq, again.index)
    );
    assert_eq!(net.ledger.tree_size().expect("size"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_prev_and_deps() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    let e1 = net.sign(&issuer, None, &[], mint(&alice, 10));
    let e2 = net.sign(&issuer, None, &[], mint(&alice, 20));
    // Seq 2 before seq 1: it waits.
    let early = net.submit(&e2).await.expect("pending");
    assert!(
        matches!(&early.status, Status::Pending(w) if w.reason == "seq_gap"),
        "{early:?}"
    );
    assert_eq!(net.ledger.n_pending(), 1);
    // A transfer depending on the missing mint waits too.
    let t = net.sign(&alice, None, &[e2.id], transfer(&issuer, 15));
    let waiting = net.submit(&t).await.expect("pending");
    assert!(
        matches!(&waiting.status, Status::Pending(w) if w.reason == "missing_deps"),
        "{waiting:?}"
    );
    // Seq 1 arrives: everything applies, in order.
    net.submit(&e1).await.expect("accepted");
    assert_eq!(net.ledger.tree_size().expect("size"), 3);
    assert_eq!(net.ledger.n_pending(), 0);
    assert_eq!(
        net.ledger
            .account(&author_of(&alice))
            .expect("account")
            .balance,
        15
    );
    // Resubmitting the once-pending event reports the original acceptance.
    let again = net.submit(&t).await.expect("dup");
    assert_eq!(again.status, Status::Duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_events_expire_and_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let genesis = Genesis::new("test", author_of(&key(ISSUER)), 1);
    let net_id = genesis.net().expect("net");
    let store = Store::open(&dir.path().join("blobs"), StoreConfig::default())
        .await
        .expect("store");
    let ledger = Ledger::open(
        &dir.path().join("ledger"),
        store.clone(),
        genesis.clone(),
        net_id,
        key(200),
        LedgerConfig {
            pending_ttl: Duration::from_millis(300),
            pending_max: 2,
        },
    )
    .await
    .expect("ledger");
    let issuer = key(ISSUER);
    let body = |seq: u64, prev: Option<EventId>| EventBody {
        net: net_id,
        author: author_of(&issuer),
        seq,
        prev,
        deps: vec![],
        ts: 0,
        payload: mint(&key(2), seq),
    };
    // A known log (untrusted waiting events, of unknown authors, have a smaller share).
    let e1 = SignedEvent::sign(body(1, None), &issuer).expect("sign");
    ledger
        .submit(Bytes::from(e1.envelope.clone()))
        .await
        .expect("accepted");
    let e2 = SignedEvent::sign(body(2, Some(EventId::from_bytes([1; 32]))), &issuer).expect("sign");
    let e3 = SignedEvent::sign(body(3, Some(EventId::from_bytes([2; 32]))), &issuer).expect("sign");
    let e4 = SignedEvent::sign(body(4, Some(EventId::from_bytes([3; 32]))), &issuer).expect("sign");
    for e in [&e2, &e3] {
        let s = ledger
            .submit(Bytes::from(e.envelope.clone()))
            .await
            .expect("pending");
        assert!(matches!(s.status, Status::Pending(_)));
    }
    // The pending queue is bounded.
    let full = ledger.submit(Bytes::from(e4.envelope.clone())).await;
    assert_eq!(full.map_err(|e| e.code()), Err("pending_full"));
    // Pending events are dropped after their time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ledger.n_pending(), 0);
    assert_eq!(ledger.tree_size().expect("size"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_and_signature_rules() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    let other_log = net.accept(&issuer, &[], mint(&alice, 1)).await;
    net.accept(
        &alice,
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"a"),
            pinned: true,
        }),
    )
    .await;
    // A prev that is not this log's event at seq - 1.
    let body = EventBody {
        net: net.net,
        author: author_of(&alice),
        seq: 2,
        prev: Some(other_log),
        deps: vec![],
        ts: 0,
        payload: Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"b"),
            pinned: true,
        }),
    };
    let wrong_prev = SignedEvent::sign(body.clone(), &alice).expect("sign");
    assert_eq!(
        net.submit(&wrong_prev).await.map_err(|e| e.code()).err(),
        Some("wrong_prev")
    );
    // Wrong network.
    let mut other = body.clone();
    other.net = BlobHash::of(b"another network");
    other.prev = net.heads[&author_of(&alice)].1;
    let wrong_net = SignedEvent::sign(other, &alice).expect("sign");
    assert_eq!(
        net.submit(&wrong_net).await.map_err(|e| e.code()).err(),
        Some("wrong_net")
    );
    // Signed by someone else.
    let mut forged = body.clone();
    forged.prev = net.heads[&author_of(&alice)].1;
    let forged = SignedEvent::sign(forged, &issuer).expect("sign");
    assert_eq!(
        net.submit(&forged).await.map_err(|e| e.code()).err(),
        Some("bad_signature")
    );
    // Malformed bytes.
    let garbage = net
        .ledger
        .submit(Bytes::from_static(b"\xa1\x61x\x01"))
        .await;
    assert!(garbage.is_err_and(|e| e.is_rejection()));

    // Key rotation: the old key can no longer append; the new key can.
    let new_key = key(77);
    net.accept(
        &alice,
        &[],
        Payload::KeyRotate(KeyRotate {
            new_key: author_of(&new_key),
        }),
    )
    .await;
    net.refuse(
        &alice,
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"c"),
            pinned: false,
        }),
        "key_rotated",
    )
    .await;
    let event = net.sign(
        &new_key,
        Some(author_of(&alice)),
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"c"),
            pinned: false,
        }),
    );
    assert_eq!(
        net.submit(&event).await.expect("new key").status,
        Status::Accepted
    );
    let account = net.ledger.account(&author_of(&alice)).expect("account");
    assert_eq!(account.signing_key, author_of(&new_key));
    assert_eq!(account.head_seq, 3);

    // An event signed by a rotated-to key that arrives before its key.rotate waits for it.
    let newer = key(78);
    let rotate = net.sign(
        &new_key,
        Some(author_of(&alice)),
        &[],
        Payload::KeyRotate(KeyRotate {
            new_key: author_of(&newer),
        }),
    );
    let after = net.sign(
        &newer,
        Some(author_of(&alice)),
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"d"),
            pinned: true,
        }),
    );
    let early = net.submit(&after).await.expect("waits");
    assert!(matches!(early.status, Status::Pending(_)), "{early:?}");
    net.submit(&rotate).await.expect("rotation");
    let record = net.ledger.event_record(&after.id).expect("record");
    assert!(
        record.is_some(),
        "the waiting event applied after its key.rotate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_keep_both_branches_and_contest_what_follows() {
    let mut net = Net::new().await;
    let (issuer, alice, bob, carol) = (key(ISSUER), key(2), key(3), key(4));
    let m = net.accept(&issuer, &[], mint(&alice, 100)).await;
    // Alice pays Bob, then signs a different event at the same seq: both are accepted.
    let pay = net.accept(&alice, &[m], transfer(&bob, 50)).await;
    net.heads.remove(&author_of(&alice));
    let twin = net.accept(&alice, &[m], transfer(&bob, 70)).await;
    let forks = net.ledger.forks().expect("forks");
    assert_eq!(forks.len(), 1);
    // Canonical: the lowest forked seq, the two envelopes ordered by EventId.
    let (a, b) = forks[0]
        .verify(&net.net)
        .expect("the proof verifies on its own");
    assert_eq!((a, b), (pay.min(twin), pay.max(twin)));
    assert_eq!(forks[0].seq, 1);
    let mut swapped = forks[0].clone();
    swapped.envelopes.swap(0, 1);
    assert!(
        swapped.verify(&net.net).is_err(),
        "order is part of the proof"
    );
    assert!(forks[0].verify(&BlobHash::of(b"another net")).is_err());
    // Alice's log grows on the first branch: accepted, and contested like the rest of it.
    net.heads.insert(author_of(&alice), (1, Some(pay)));
    let next = net
        .accept(
            &alice,
            &[],
            Payload::BlobHost(BlobHost {
                blob: BlobHash::of(b"a"),
                pinned: true,
            }),
        )
        .await;
    // Bob spends the contested credit: accepted, contested, counted on neither side.
    let spend = net.accept(&bob, &[pay], transfer(&carol, 30)).await;
    for id in [pay, twin, next, spend] {
        let record = net
            .ledger
            .event_record(&id)
            .expect("record")
            .expect("present");
        assert!(record.contested, "{id} should be contested");
    }
    let bob_account = net.ledger.account(&author_of(&bob)).expect("account");
    assert_eq!(
        (
            bob_account.received,
            bob_account.received_contested,
            bob_account.sent,
            bob_account.sent_contested,
            bob_account.balance
        ),
        (120, 120, 30, 30, 0)
    );
    let carol_account = net.ledger.account(&author_of(&carol)).expect("account");
    assert_eq!(
        (carol_account.received_contested, carol_account.balance),
        (30, 0)
    );
    assert_eq!(net.ledger.supply().expect("supply"), 100);
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(report.ok, "{:?}", report.findings);
    assert_eq!(report.n_forks, 1);
    let (_, digest) = net.ledger.state_digest().expect("digest");
    assert_eq!(hex::encode(digest), report.state_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basins_average_deltas_reject_outliers_and_keep_history() {
    let mut net = Net::new().await;
    let (alice, bob) = (key(2), key(3));
    let basin = net
        .accept(
            &alice,
            &[],
            Payload::BasinPublish(BasinPublish {
                basin_id: "mind".into(),
                coordinates: vector(&[0.0, 0.0, 0.0]),
                metadata: [("model".to_string(), "m1".to_string())].into(),
                writers: vec![author_of(&bob)],
            }),
        )
        .await;
    let delta = |parent: EventId, indices: Vec<u64>, values: &[f32], weight_ppm: u64| {
        Payload::BasinDelta(BasinDelta {
            basin_id: "mind".into(),
            parent,
            indices,
            values: vector(values),
            weight_ppm,
        })
    };
    let d1 = net
        .accept(
            &bob,
            &[basin],
            delta(basin, vec![], &[1.0, 2.0, 3.0], 1_000_000),
        )
        .await;
    let d2 = net
        .accept(&alice, &[d1], delta(d1, vec![0], &[4.0], 500_000))
        .await;
    // Only the owner and the writers its publish names send deltas.
    net.refuse(
        &key(4),
        &[d2],
        delta(d2, vec![], &[2.5, 2.0, 3.0], 1_000_000),
        "not_a_writer",
    )
    .await;
    // Outliers are measured from the latest version the owner signed (d2): a chain of
    // writer deltas, each within the bound of its parent, cannot walk the basin away.
    let step = net
        .accept(&bob, &[d2], delta(d2, vec![0], &[2.5 + 9.9], 1_000_000))
        .await;
    net.refuse(
        &bob,
        &[step],
        delta(step, vec![0], &[2.5 + 19.8], 1_000_000),
        "basin_outlier",
    )
    .await;
    // Outliers (distance > basin_outlier_max = 10) are rejected.
    net.refuse(
        &bob,
        &[d2],
        delta(d2, vec![], &[100.0, 0.0, 0.0], 1_000_000),
        "basin_outlier",
    )
    .await;
    // Unknown parent, wrong basin id, wrong dimension.
    net.refuse(
        &bob,
        &[],
        delta(EventId::from_bytes([5; 32]), vec![], &[1.0, 1.0, 1.0], 1),
        "unknown_parent",
    )
    .await;
    net.refuse(
        &bob,
        &[d2],
        Payload::BasinDelta(BasinDelta {
            basin_id: "other".into(),
            parent: d2,
            indices: vec![],
            values: vector(&[1.0, 1.0, 1.0]),
            weight_ppm: 1,
        }),
        "basin_mismatch",
    )
    .await;
    net.refuse(
        &bob,
        &[d2],
        delta(d2, vec![], &[1.0, 1.0], 1),
        "dimension_mismatch",
    )
    .await;
    net.refuse(
        &bob,
        &[d2],
        delta(d2, vec![7], &[1.0], 1),
        "dimension_mismatch",
    )
    .await;

    let state = net.ledger.basin(&basin).expect("basin").expect("present");
    // Weighted average: coordinate 0 = (0·1 + 1·1 + 4·0.5 + 12.4·1) / 3.5 = 4.4.
    let c = state.coordinates();
    assert!((c[0] - 4.4).abs() < 1e-5, "{c:?}");
    assert!((c[1] - 1.0).abs() < 1e-6, "{c:?}");
    assert!((c[2] - 1.5).abs() < 1e-6, "{c:?}");
    assert_eq!((state.head, state.n_versions), (step, 4));
    let history = net.ledger.basin_history(&basin).expect("history");
    assert_eq!(
        history.iter().map(|v| v.id).collect::<Vec<_>>(),
        vec![basin, d1, d2, step]
    );
    assert_eq!((history[3].anchor, history[2].anchor), (d2, d2));
    assert_eq!(history[2].parent, Some(d1));
    // Version coordinates move the parent toward the values by the weight.
    assert_eq!(history[1].coordinates, vec![1.0, 2.0, 3.0]);
    assert_eq!(history[2].coordinates, vec![2.5, 2.0, 3.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skills_reputation_and_nodes() {
    let mut net = Net::new().await;
    let (alice, bob) = (key(2), key(3));
    let weights = BlobHash::of(b"weights");
    let skill = net
        .accept(
            &alice,
            &[],
            Payload::SkillPublish(SkillPublish {
                skill_id: "pinot".into(),
                name: "Pinot classifier".into(),
                version: "1.0".into(),
                description: "grapes".into(),
                domain: "viticulture".into(),
                capabilities: vec!["classify".into()],
                specializations: vec![],
                embedding: vector(&[0.1, 0.2]),
                blob: weights,
                size: 7,
                base_model: "llama".into(),
                license: "MIT".into(),
                price: 3,
            }),
        )
        .await;
    net.refuse(
        &bob,
        &[],
        Payload::SkillEndorse(SkillEndorse {
            skill: EventId::from_bytes([4; 32]),
            verdict: "valid".into(),
            score: 900,
            note: String::new(),
        }),
        "unknown_skill",
    )
    .await;
    net.refuse(
        &bob,
        &[],
        Payload::SkillEndorse(SkillEndorse {
            skill,
            verdict: "valid".into(),
            score: 900,
            note: String::new(),
        }),
        "not_in_causal_past",
    )
    .await;
    net.accept(
        &bob,
        &[skill],
        Payload::SkillEndorse(SkillEndorse {
            skill,
            verdict: "valid".into(),
            score: 900,
            note: "works".into(),
        }),
    )
    .await;
    net.accept(
        &bob,
        &[],
        Payload::BlobHost(BlobHost {
            blob: weights,
            pinned: true,
        }),
    )
    .await;
    net.accept(
        &bob,
        &[],
        Payload::ReputationDelta(ReputationDelta {
            subject: author_of(&alice),
            delta: 25,
            reason: "good skill".into(),
            evidence: Some(Digest32::from_bytes(*skill.as_bytes())),
        }),
    )
    .await;
    net.accept(
        &alice,
        &[],
        Payload::NodeAnnounce(NodeAnnounce {
            service: "agent-host".into(),
            endpoints: vec!["http://127.0.0.1:9000".into()],
            capabilities: vec!["gpu".into()],
            basin_signature: vector(&[1.0, 0.0]),
            addr: "node-addr".into(),
        }),
    )
    .await;
    let skills = net.ledger.skills().expect("skills");
    assert_eq!(skills.len(), 1);
    assert_eq!((skills[0].n_valid, skills[0].score_sum), (1, 900));
    assert_eq!(
        net.ledger.hosts(&weights).expect("hosts"),
        vec![author_of(&bob)]
    );
    assert_eq!(
        net.ledger
            .account(&author_of(&alice))
            .expect("account")
            .reputation,
        25
    );
    let nodes = net.ledger.nodes().expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].service, "agent-host");
    assert_eq!(nodes[0].last_ts, 1_700_000_000_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_log_proofs_and_checkpoints() {
    let mut net = Net::new().await;
    let issuer = key(ISSUER);
    let mut ids = Vec::new();
    for i in 0..37u64 {
        ids.push(net.accept(&issuer, &[], mint(&key(2), i + 1)).await);
    }
    let size = net.ledger.tree_size().expect("size");
    assert_eq!(size, 37);
    let note = net.ledger.checkpoint();
    let vk = key(200).verifying_key();
    let cp = tlog::verify_checkpoint(&note, net.ledger.origin(), &vk).expect("checkpoint verifies");
    assert_eq!(cp.size, 37);
    assert!(
        tlog::verify_checkpoint(&note, net.ledger.origin(), &key(201).verifying_key()).is_err()
    );
    for tree_size in [1u64, 2, 5, 16, 17, 37] {
        let root = net.ledger.root(tree_size).expect("root");
        for (index, id) in ids.iter().enumerate().take(tree_size as usize) {
            let (leaf_index, _, path) = net
                .ledger
                .inclusion_proof(id, Some(tree_size))
                .expect("proof");
            assert_eq!(leaf_index, index as u64);
            assert!(tlog::verify_inclusion(
                &tlog::leaf_hash(id),
                leaf_index,
                tree_size,
                &path,
                &root
            ));
        }
        for old in 1..=tree_size {
            let (_, path) = net
                .ledger
                .consistency_proof(old, Some(tree_size))
                .expect("proof");
            let old_root = net.ledger.root(old).expect("root");
            assert!(
                tlog::verify_consistency(old, tree_size, &old_root, &root, &path),
                "{old}->{tree_size}"
            );
        }
    }
    assert_eq!(cp.root, net.ledger.root(37).expect("root"));
    assert!(net.ledger.inclusion_proof(&ids[0], Some(38)).is_err());
    assert!(net.ledger.consistency_proof(5, Some(99)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_bundles_restart_and_gc() {
    let mut net = Net::new().await;
    let (issuer, alice, bob) = (key(ISSUER), key(2), key(3));
    // An export of the empty log records size 0, a prefix of every later log.
    let empty_dir = net.dir.path().join("empty");
    for _ in 0..2 {
        let empty = net.ledger.audit(Some(&empty_dir)).await.expect("audit");
        assert!(empty.ok, "{:?}", empty.findings);
        assert_eq!(empty.n_events, 0);
    }
    let m = net.accept(&issuer, &[], mint(&alice, 1000)).await;
    let mut last = m;
    for i in 0..20u64 {
        last = net.accept(&alice, &[last], transfer(&bob, i + 1)).await;
    }
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(report.ok, "{:?}", report.findings);
    assert_eq!(report.n_events, 21);
    assert_eq!(report.supply, 1000);
    assert_eq!(report.previous_size, Some(0));
    let checkpoint_21 = net.ledger.checkpoint();

    // GC keeps every envelope the ledger references. A plain audit records nothing.
    net.store.gc().await.expect("gc");
    let again = net.ledger.audit(None).await.expect("audit");
    assert!(again.ok, "{:?}", again.findings);
    assert_eq!(again.previous_size, Some(0));

    // An offline bundle verifies without the node, against the node key or a checkpoint the
    // verifier got from the node earlier, and tampering is found.
    let bundle = net.dir.path().join("bundle");
    net.accept(&issuer, &[], mint(&bob, 5)).await;
    let exported = net.ledger.audit(Some(&bundle)).await.expect("export");
    assert!(exported.ok, "{:?}", exported.findings);
    let node = net.ledger.node();
    let (verified, checked) =
        verify_bundle(&bundle, &BundleTrust::Node(node)).expect("verify bundle");
    assert!(verified.ok, "{:?}", verified.findings);
    assert_eq!(checked, node);
    assert_eq!(
        (verified.tree_size, verified.root.clone()),
        (22, exported.root.clone())
    );
    assert_eq!(verified.previous_size, Some(0));
    let (by_checkpoint, _) =
        verify_bundle(&bundle, &BundleTrust::Checkpoint(checkpoint_21)).expect("verify bundle");
    assert!(by_checkpoint.ok, "{:?}", by_checkpoint.findings);
    // Signed by another key: refused, whatever the bundle says of itself.
    let stranger = author_of(&key(77));
    assert!(verify_bundle(&bundle, &BundleTrust::Node(stranger)).is_err());
    let events = bundle.join("events.bin");
    let mut bytes = std::fs::read(&events).expect("events");
    let len = bytes.len();
    bytes[len - 10] ^= 1;
    std::fs::write(&events, &bytes).expect("write");
    let (tampered, _) = verify_bundle(&bundle, &BundleTrust::Node(node)).expect("verify bundle");
    assert!(!tampered.ok);

    // Restart: the state and the log come back exactly.
    let before = net.ledger.account(&author_of(&bob)).expect("account");
    let root = net.ledger.root(22).expect("root");
    let mut net = net.reopen().await;
    assert_eq!(
        net.ledger.account(&author_of(&bob)).expect("account"),
        before
    );
    assert_eq!(net.ledger.root(22).expect("root"), root);
    net.accept(&alice, &[], transfer(&bob, 1)).await;
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(report.ok, "{:?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_a_tampered_index() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    net.accept(&issuer, &[], mint(&alice, 10)).await;
    // Rewrite Alice's balance in the index behind the ledger's back.
    {
        let db = net.ledger.db();
        let tx = redb::ReadableDatabase::begin_read(db).expect("read");
        let table = tx.open_table(crate::db::AUTHORS).expect("table");
        let mut state: AuthorState = crate::db::decode(
            table
                .get(*author_of(&alice).as_bytes())
                .expect("get")
                .expect("present")
                .value(),
        )
        .expect("decode");
        drop(table);
        drop(tx);
        state.received = 1_000_000;
        let tx = db.begin_write().expect("write");
        tx.open_table(crate::db::AUTHORS)
            .expect("table")
            .insert(
                *author_of(&alice).as_bytes(),
                crate::db::encode(&state).expect("encode").as_slice(),
            )
            .expect("insert");
        tx.commit().expect("commit");
    }
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(!report.ok);
    assert!(
        report.findings.iter().any(|f| f.code == "state_mismatch"),
        "{:?}",
        report.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_loses_nothing() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    let e1 = net.sign(&issuer, None, &[], mint(&alice, 10));
    let e2 = net.sign(&issuer, None, &[], mint(&alice, 20));
    // e2 waits for e1: answered "pending", so it must not be lost.
    let early = net.submit(&e2).await.expect("pending");
    assert!(matches!(early.status, Status::Pending(_)));
    let before = net.ledger.state_digest().expect("digest");
    // The next batch panics while it is applied: its submitter hears an error, nothing of it
    // lands, and the state and pending set are what they were.
    net.ledger.fail_next_batch();
    let other = net.sign(
        &alice,
        None,
        &[],
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b"x"),
            pinned: true,
        }),
    );
    let failed = net.submit(&other).await;
    assert_eq!(failed.map_err(|e| e.code()).err(), Some("unavailable"));
    assert_eq!(net.ledger.state_digest().expect("digest"), before);
    // The waiting event is still waiting and applies when e1 arrives.
    net.submit(&e1).await.expect("accepted");
    net.submit(&other).await.expect("accepted");
    assert_eq!(net.ledger.tree_size().expect("size"), 3);
    assert_eq!(net.ledger.n_pending(), 0);
    assert_eq!(
        net.ledger
            .account(&author_of(&alice))
            .expect("account")
            .received,
        30
    );
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(report.ok, "{:?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_is_bounded_per_author() {
    let net = Net::new().await;
    let waiting_for = |seed: u8, seq: u64| {
        let k = key(seed);
        SignedEvent::sign(
            EventBody {
                net: net.net,
                author: author_of(&k),
                seq,
                prev: Some(EventId::from_bytes([seq as u8; 32])),
                deps: vec![],
                ts: 0,
                payload: Payload::BlobHost(BlobHost {
                    blob: BlobHash::of(&seq.to_le_bytes()),
                    pinned: true,
                }),
            },
            &k,
        )
        .expect("sign")
    };
    let envelopes: Vec<Bytes> = (2..2 + PENDING_PER_AUTHOR_MAX as u64)
        .map(|seq| Bytes::from(waiting_for(9, seq).envelope))
        .collect();
    for result in net.ledger.submit_many(envelopes).await {
        assert!(matches!(
            result.expect("pending").status,
            Status::Pending(_)
        ));
    }
    // One author's quota is full: its next out-of-order event is delayed, not judged...
    let over = waiting_for(9, 2 + PENDING_PER_AUTHOR_MAX as u64);
    let full = net.ledger.submit(Bytes::from(over.envelope)).await;
    assert_eq!(full.map_err(|e| e.code()).err(), Some("pending_full"));
    // ...and other authors' out-of-order events still wait.
    let other = waiting_for(10, 2);
    let ok = net
        .ledger
        .submit(Bytes::from(other.envelope))
        .await
        .expect("pending");
    assert!(matches!(ok.status, Status::Pending(_)));
    assert_eq!(net.ledger.n_pending(), PENDING_PER_AUTHOR_MAX + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_the_weights_of_every_uncontested_skill() {
    let mut net = Net::new().await;
    let bob = key(3);
    let weights = b"lora weights of someone else".to_vec();
    let added = net
        .store
        .add_bytes(weights.clone(), meshnode_store::PinMode::NoPin)
        .await
        .expect("add");
    let orphan = net
        .store
        .add_bytes(
            b"nobody needs this".to_vec(),
            meshnode_store::PinMode::NoPin,
        )
        .await
        .expect("add");
    net.accept(
        &bob,
        &[],
        Payload::SkillPublish(SkillPublish {
            skill_id: "s".into(),
            name: "s".into(),
            version: "1".into(),
            description: String::new(),
            domain: "d".into(),
            capabilities: vec![],
            specializations: vec![],
            embedding: vector(&[1.0]),
            blob: added.hash,
            size: weights.len() as u64,
            base_model: String::new(),
            license: String::new(),
            price: 0,
        }),
    )
    .await;
    net.store.gc().await.expect("gc");
    assert!(
        net.store.has(&added.hash).await.expect("has"),
        "a listed skill's weights"
    );
    assert!(!net.store.has(&orphan.hash).await.expect("has"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_copy_does_not_displace_a_waiting_event() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    let e1 = net.sign(&issuer, None, &[], mint(&alice, 10));
    let e2 = net.sign(&issuer, None, &[], mint(&alice, 20));
    // The same body with a broken signature: until e1 arrives nobody can tell which is real.
    let mut forged = e2.envelope.clone();
    let at = forged
        .windows(64)
        .position(|w| w == e2.sig)
        .expect("the signature is in the envelope");
    forged[at] ^= 1;
    for envelope in [forged, e2.envelope.clone()] {
        let s = net
            .ledger
            .submit(Bytes::from(envelope))
            .await
            .expect("waits");
        assert!(matches!(s.status, Status::Pending(_)), "{s:?}");
    }
    assert_eq!(net.ledger.n_pending(), 2);
    net.submit(&e1).await.expect("accepted");
    assert_eq!(
        net.ledger.tree_size().expect("size"),
        2,
        "the honest copy applied"
    );
    assert_eq!(net.ledger.n_pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_arrival_time_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let genesis = Genesis::new("test", author_of(&key(ISSUER)), 1);
    let net_id = genesis.net().expect("net");
    let ttl = Duration::from_millis(2000);
    let open = |dir: std::path::PathBuf, genesis: Genesis| async move {
        let store = Store::open(&dir.join("blobs"), StoreConfig::default())
            .await
            .expect("store");
        let ledger = Ledger::open(
            &dir.join("ledger"),
            store.clone(),
            genesis,
            net_id,
            key(200),
            LedgerConfig {
                pending_ttl: ttl,
                pending_max: 100,
            },
        )
        .await
        .expect("ledger");
        (store, ledger)
    };
    let (store, ledger) = open(dir.path().to_path_buf(), genesis.clone()).await;
    let issuer = key(ISSUER);
    let waiting = SignedEvent::sign(
        EventBody {
            net: net_id,
            author: author_of(&issuer),
            seq: 2,
            prev: Some(EventId::from_bytes([7; 32])),
            deps: vec![],
            ts: 0,
            payload: mint(&key(2), 1),
        },
        &issuer,
    )
    .expect("sign");
    let s = ledger
        .submit(Bytes::from(waiting.envelope.clone()))
        .await
        .expect("pending");
    assert!(matches!(s.status, Status::Pending(_)));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    ledger.shutdown().await;
    store.shutdown().await.expect("shutdown");
    drop((ledger, store));
    let (_store, ledger) = open(dir.path().to_path_buf(), genesis).await;
    assert_eq!(ledger.n_pending(), 1, "it waits again after the restart");
    // 1.3 s before the restart + 1.3 s after > the 2 s time-to-live: its first arrival counts.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(ledger.n_pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_proof_that_leaves_out_a_rotation_is_refused() {
    let mut net = Net::new().await;
    let alice = key(2);
    let host = |b: &[u8]| {
        Payload::BlobHost(BlobHost {
            blob: BlobHash::of(b),
            pinned: true,
        })
    };
    net.accept(&alice, &[], host(b"a")).await;
    let new_key = key(77);
    net.accept(
        &alice,
        &[],
        Payload::KeyRotate(KeyRotate {
            new_key: author_of(&new_key),
        }),
    )
    .await;
    // Someone holding the retired key signs two events at seq 3 and builds a proof that
    // leaves the rotation out: it verifies on its own...
    let head = net.heads[&author_of(&alice)];
    let mut forged = |b: &[u8]| {
        net.heads.insert(author_of(&alice), head);
        let body = net.sign(&alice, None, &[], host(b)).body;
        assert_eq!(body.seq, 3);
        SignedEvent::sign(body, &alice).expect("sign")
    };
    let (x, y) = (forged(b"x"), forged(b"y"));
    let (first, second) = if x.id < y.id { (x, y) } else { (y, x) };
    let proof = ForkProof {
        author: author_of(&alice),
        seq: 3,
        signer: author_of(&alice),
        envelopes: [first.envelope.clone(), second.envelope.clone()],
        rotations: vec![],
    };
    assert!(proof.verify(&net.net).is_ok());
    // ...but not against the node's history of the log, which says key 77 signs seq 3.
    let refused = net.ledger.check_fork_proof(&proof);
    assert_eq!(
        refused.map_err(|e| e.code()).err(),
        Some("invalid_fork_proof")
    );
    // A real fork (two events at seq 3 signed with the key the log uses) passes the same check.
    for b in [b"r1", b"r2"] {
        net.heads.insert(author_of(&alice), head);
        let event = net.sign(&new_key, Some(author_of(&alice)), &[], host(b));
        assert_eq!(
            net.submit(&event).await.expect("accepted").status,
            Status::Accepted
        );
    }
    let forks = net.ledger.forks().expect("forks");
    assert_eq!(forks.len(), 1);
    assert!(net.ledger.check_fork_proof(&forks[0]).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_a_tampered_record() {
    let mut net = Net::new().await;
    let (issuer, alice, bob) = (key(ISSUER), key(2), key(3));
    let m = net.accept(&issuer, &[], mint(&alice, 10)).await;
    net.accept(&alice, &[m], transfer(&bob, 4)).await;
    // The transfer's record says its branch covered more than it did: later transfers would
    // be judged on it, so the audit must see it.
    {
        let db = net.ledger.db();
        let tx = redb::ReadableDatabase::begin_read(db).expect("read");
        let table = tx.open_table(crate::db::EVENTS).expect("table");
        let mut record: EventRecord =
            crate::db::decode(table.get(1).expect("get").expect("present").value())
                .expect("decode");
        drop(table);
        drop(tx);
        record.covered += 1_000;
        let tx = db.begin_write().expect("write");
        tx.open_table(crate::db::EVENTS)
            .expect("table")
            .insert(1, crate::db::encode(&record).expect("encode").as_slice())
            .expect("insert");
        tx.commit().expect("commit");
    }
    let report = net.ledger.audit(None).await.expect("audit");
    assert!(
        report.findings.iter().any(|f| f.code == "record_mismatch"),
        "{:?}",
        report.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_read_every_item_once_in_key_order() {
    let mut net = Net::new().await;
    let (issuer, alice) = (key(ISSUER), key(2));
    for i in 0..7u8 {
        net.accept(&issuer, &[], mint(&alice, u64::from(i) + 1))
            .await;
        net.accept(
            &issuer,
            &[],
            Payload::ReputationDelta(ReputationDelta {
                subject: author_of(&key(100 + i)),
                delta: i64::from(i),
                reason: "paging".into(),
                evidence: None,
            }),
        )
        .await;
    }
    let alice_key = author_of(&alice);
    let scores = net.ledger.reputation().expect("reputation");
    let credits = net
        .ledger
        .account(&alice_key)
        .expect("account")
        .unreferenced_credits;
    assert_eq!((scores.len(), credits.len()), (7, 7));
    for limit in 1..=8 {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = net
                .ledger
                .reputation_page(after.as_ref(), limit)
                .expect("page");
            assert!(page.items.len() <= limit);
            seen.extend(page.items.iter().cloned());
            match page.next {
                Some(next) => {
                    assert_eq!(page.items.len(), limit);
                    assert_eq!(page.items.last().map(|(k, _)| *k), Some(next));
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, scores, "limit {limit}");

        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = net
                .ledger
                .unreferenced_credits(&alice_key, after.as_ref(), limit)
                .expect("page");
            seen.extend(page.items.iter().copied());
            match page.next {
                Some(next) => {
                    assert_eq!(page.items.last(), Some(&next));
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, credits, "limit {limit}");
    }
    // The account's first page of credits, and the summary without them.
    let (account, next) = net
        .ledger
        .account_page(&alice_key, None, 3)
        .expect("account");
    assert_eq!(account.unreferenced_credits, credits[..3]);
    assert_eq!(next, Some(credits[2]));
    let (account, next) = net
        .ledger
        .account_page(&alice_key, Some(&credits[2]), 1000)
        .expect("account");
    assert_eq!(account.unreferenced_credits, credits[3..]);
    assert_eq!(next, None);
    let summary = net.ledger.account_summary(&alice_key).expect("summary");
    assert!(summary.unreferenced_credits.is_empty());
    assert_eq!(summary.balance, 28);
    assert_eq!(
        summary,
        Account {
            unreferenced_credits: Vec::new(),
            ..net.ledger.account(&alice_key).expect("account")
        }
    );
    // Empty tables, and a cursor after every key: an empty last page.
    let skills = net.ledger.skills_page(None, 10).expect("skills");
    assert!(skills.items.is_empty() && skills.next.is_none());
    let basins = net.ledger.basins_page(None, 10).expect("basins");
    assert!(basins.items.is_empty() && basins.next.is_none());
    let forks = net.ledger.forks_page(None, 1).expect("forks");
    assert!(forks.items.is_empty() && forks.next.is_none());
    let nodes = net.ledger.nodes_page(None, 1).expect("nodes");
    assert!(nodes.items.is_empty() && nodes.next.is_none());
    let last = AuthorKey::from_bytes([0xff; 32]);
    let page = net.ledger.reputation_page(Some(&last), 10).expect("page");
    assert!(page.items.is_empty() && page.next.is_none());
}
