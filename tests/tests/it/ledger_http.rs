//! The ledger over HTTP and the CLI against real node processes: every rejection with its
//! code and no change, pending events, forks, the transparency log checked by independent
//! verifiers, audit and offline bundles, GC protection, and SIGKILL during ingest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshnode_schemas::{
    AuthorKey, BlobHash, EventBody, EventId, Payload, SignedEvent, SigningKey, TokenMint,
    TokenTransfer, Vector, author_of,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{TestNode, client, python};

/// A writer of events for one node: knows `net` and tracks each log's head.
struct Writer {
    url: String,
    token: String,
    net: BlobHash,
    heads: BTreeMap<AuthorKey, (u64, Option<EventId>)>,
    http: reqwest::Client,
}

impl Writer {
    async fn new(node: &TestNode) -> Self {
        let http = client();
        let status: Value = http
            .get(format!("{}/v1/status", node.url))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        Self {
            url: node.url.clone(),
            token: node.token.clone(),
            net: BlobHash::from_hex(status["net"].as_str().expect("net")).expect("hex"),
            heads: BTreeMap::new(),
            http,
        }
    }

    fn body(&self, author: AuthorKey, deps: &[EventId], payload: Payload) -> EventBody {
        let (seq, prev) = self.heads.get(&author).copied().unwrap_or((0, None));
        let mut deps = deps.to_vec();
        deps.sort();
        deps.dedup();
        EventBody {
            net: self.net,
            author,
            seq: seq + 1,
            prev,
            deps,
            ts: 1_700_000_000_000,
            payload,
        }
    }

    fn sign(&mut self, key: &SigningKey, deps: &[EventId], payload: Payload) -> SignedEvent {
        let body = self.body(author_of(key), deps, payload);
        let event = SignedEvent::sign(body, key).expect("sign");
        self.heads
            .insert(author_of(key), (event.body.seq, Some(event.id)));
        event
    }

    async fn post(&self, envelope: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/v1/events", self.url))
            .bearer_auth(&self.token)
            .header("content-type", "application/cbor")
            .body(envelope)
            .send()
            .await
            .expect("post");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn accept(&mut self, key: &SigningKey, deps: &[EventId], payload: Payload) -> EventId {
        let event = self.sign(key, deps, payload);
        let (status, body) = self.post(event.envelope.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["id"], event.id.to_hex());
        assert_eq!(body["blob"], BlobHash::of(&event.envelope).to_hex());
        assert_eq!(body["seq"], event.body.seq);
        event.id
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    }
}

fn node_key(node: &TestNode) -> SigningKey {
    meshnode_schemas::parse_key_file(
        &std::fs::read_to_string(node.data_dir().join("node.key")).expect("node.key"),
    )
    .expect("key")
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

/// CBOR byte-string header + bytes.
fn cbor_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = match bytes.len() {
        n if n < 24 => vec![0x40 | n as u8],
        n if n < 256 => vec![0x58, n as u8],
        n if n < 65536 => vec![0x59, (n >> 8) as u8, n as u8],
        n => vec![
            0x5a,
            (n >> 24) as u8,
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
        ],
    };
    out.extend_from_slice(bytes);
    out
}

/// An envelope around arbitrary body bytes, signed as the ledger expects (or with `sig`).
fn envelope(body: &[u8], key: &SigningKey, sig: Option<[u8; 64]>) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let id = blake3::hash(body);
    let mut message = b"meshnode/event/v1".to_vec();
    message.extend_from_slice(id.as_bytes());
    let sig = sig.unwrap_or_else(|| key.sign(&message).to_bytes());
    let mut out = vec![0xa2, 0x63, b's', b'i', b'g'];
    out.extend(cbor_bytes(&sig));
    out.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y']);
    out.extend(cbor_bytes(body));
    out
}

/// A body whose vector bytes are set directly (bypassing the checks of `Vector::new`).
fn body_with_vector_bytes(w: &Writer, key: &SigningKey, raw: &[u8]) -> Vec<u8> {
    let placeholder = Vector::new(&[1.5, 2.5]).expect("vector");
    let body = w.body(
        author_of(key),
        &[],
        Payload::BasinPublish(meshnode_schemas::BasinPublish {
            basin_id: "b".into(),
            coordinates: placeholder.clone(),
            metadata: Default::default(),
            writers: Vec::new(),
        }),
    );
    let bytes = body.encode().expect("encode");
    let needle = cbor_bytes(placeholder.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("vector in body");
    let mut out = bytes[..at].to_vec();
    out.extend(cbor_bytes(raw));
    out.extend_from_slice(&bytes[at + needle.len()..]);
    out
}

#[tokio::test]
async fn bad_events_get_specific_codes_and_change_nothing() {
    let node = TestNode::start().expect("node");
    let mut w = Writer::new(&node).await;
    let issuer = node_key(&node);
    let alice = SigningKey::from_bytes(&[2; 32]);
    let bob = SigningKey::from_bytes(&[3; 32]);
    let m = w.accept(&issuer, &[], mint(&alice, 100)).await;
    let before_size = w.get("/v1/status").await["events"].clone();
    let before_account = w.get(&format!("/v1/accounts/{}", author_of(&alice))).await;

    let mut cases: Vec<(&str, Vec<u8>, u16, &str)> = Vec::new();
    // Invalid signature (signed by someone else).
    let body = w
        .body(author_of(&alice), &[m], transfer(&bob, 1))
        .encode()
        .expect("encode");
    cases.push((
        "signed by another key",
        envelope(&body, &bob, None),
        400,
        "bad_signature",
    ));
    // Non-canonical S (S + L).
    let good = envelope(&body, &alice, None);
    let mut sig: [u8; 64] = SignedEvent::decode(&good).expect("decode").sig;
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(sig[32 + i]) + u16::from(L[i]) + carry;
        sig[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    cases.push((
        "non-canonical S",
        envelope(&body, &alice, Some(sig)),
        400,
        "bad_signature",
    ));
    // Small-order R with S = 0.
    let mut small_r = [0u8; 64];
    small_r[0] = 1;
    cases.push((
        "small-order R",
        envelope(&body, &alice, Some(small_r)),
        400,
        "bad_signature",
    ));
    // A weak (small-order) author key, and a non-canonical key encoding.
    for (what, hex_key) in [
        (
            "small-order key",
            "0100000000000000000000000000000000000000000000000000000000000000",
        ),
        (
            "small-order key",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        ),
        (
            "non-canonical key",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ),
        // y = 3 + p: the same (large-order) point as y = 3, in a non-canonical encoding.
        (
            "non-canonical key of a valid point",
            "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ),
    ] {
        let mut b = w.body(author_of(&alice), &[], transfer(&bob, 1));
        b.author = AuthorKey::from_hex(hex_key).expect("hex");
        cases.push((
            what,
            envelope(&b.encode().expect("encode"), &alice, None),
            400,
            "bad_key",
        ));
    }
    // Non-canonical CBOR: seq (1) as a 2-byte integer.
    let needle = [0x63, b's', b'e', b'q', 0x01];
    let at = body.windows(5).position(|x| x == needle).expect("seq");
    let mut long = body[..at + 4].to_vec();
    long.extend_from_slice(&[0x19, 0x00, 0x01]);
    long.extend_from_slice(&body[at + 5..]);
    cases.push((
        "non-canonical CBOR",
        envelope(&long, &alice, None),
        400,
        "non_canonical",
    ));
    // Garbage.
    cases.push((
        "not CBOR",
        b"not cbor at all".to_vec(),
        400,
        "malformed_encoding",
    ));
    // Wrong network.
    let mut other = w.body(author_of(&alice), &[m], transfer(&bob, 1));
    other.net = BlobHash::of(b"some other network");
    cases.push((
        "wrong net",
        envelope(&other.encode().expect("e"), &alice, None),
        400,
        "wrong_net",
    ));
    // Wrong prev: an accepted event, but not the log's event at seq - 1 (a prev that has not
    // arrived is a gap instead, see below).
    let issuer_author = author_of(&issuer);
    let mut wrong_prev = w.body(issuer_author, &[], mint(&alice, 1));
    wrong_prev.seq += 1;
    cases.push((
        "wrong prev",
        envelope(&wrong_prev.encode().expect("e"), &issuer, None),
        422,
        "wrong_prev",
    ));
    // Mint by a non-issuer.
    let body = w
        .body(author_of(&alice), &[], mint(&alice, 5))
        .encode()
        .expect("e");
    cases.push((
        "mint by non-issuer",
        envelope(&body, &alice, None),
        422,
        "not_issuer",
    ));
    // Overdraft.
    let body = w
        .body(author_of(&alice), &[m], transfer(&bob, 101))
        .encode()
        .expect("e");
    cases.push((
        "overdraft",
        envelope(&body, &alice, None),
        422,
        "insufficient_balance",
    ));
    // NaN, Inf and wrong-length vectors.
    let nan: Vec<u8> = [1.0f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let inf: Vec<u8> = [f32::INFINITY]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    cases.push((
        "NaN vector",
        envelope(&body_with_vector_bytes(&w, &alice, &nan), &alice, None),
        400,
        "invalid_vector",
    ));
    cases.push((
        "Inf vector",
        envelope(&body_with_vector_bytes(&w, &alice, &inf), &alice, None),
        400,
        "invalid_vector",
    ));
    cases.push((
        "7-byte vector",
        envelope(&body_with_vector_bytes(&w, &alice, &[0; 7]), &alice, None),
        400,
        "invalid_vector",
    ));
    // Oversized payload.
    let big = Payload::TokenTransfer(TokenTransfer {
        to: author_of(&bob),
        amount: 1,
        memo: "x".repeat(70_000),
    });
    let body = w.body(author_of(&alice), &[m], big).encode().expect("e");
    cases.push((
        "oversized",
        envelope(&body, &alice, None),
        413,
        "body_too_large",
    ));
    let body = w
        .body(
            author_of(&alice),
            &[m],
            Payload::TokenTransfer(TokenTransfer {
                to: author_of(&bob),
                amount: 1,
                memo: "x".repeat(300),
            }),
        )
        .encode()
        .expect("e");
    cases.push((
        "field over its limit",
        envelope(&body, &alice, None),
        400,
        "invalid_field",
    ));

    for (what, bytes, status, code) in cases {
        let (got, body) = w.post(bytes).await;
        assert_eq!(
            (got.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
    }
    // Nothing changed.
    assert_eq!(w.get("/v1/status").await["events"], before_size);
    assert_eq!(
        w.get(&format!("/v1/accounts/{}", author_of(&alice))).await,
        before_account
    );

    // A replay returns the original result and changes nothing.
    let replay = w.sign(&alice, &[m], transfer(&bob, 10));
    let (first, first_body) = w.post(replay.envelope.clone()).await;
    let (again, again_body) = w.post(replay.envelope.clone()).await;
    assert_eq!((first, again), (StatusCode::CREATED, StatusCode::OK));
    for field in ["id", "blob", "seq", "index"] {
        assert_eq!(first_body[field], again_body[field]);
    }
    assert_eq!(
        w.get(&format!("/v1/accounts/{}", author_of(&bob))).await["received"],
        10
    );

    // A seq gap waits (202) instead of being applied, then applies when the gap closes.
    let e1 = w.sign(&bob, &[replay.id], transfer(&alice, 1));
    let e2 = w.sign(&bob, &[], transfer(&alice, 2));
    let (status, body) = w.post(e2.envelope.clone()).await;
    assert_eq!(
        (status, body["status"].as_str(), body["reason"].as_str()),
        (StatusCode::ACCEPTED, Some("pending"), Some("seq_gap"))
    );
    let (status, _) = w.post(e1.envelope.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let log = w.get(&format!("/v1/logs/{}", author_of(&bob))).await;
    assert_eq!(log["head_seq"], 2);
    // Wrong-method and unknown-event answers.
    let (status, body) = {
        let r = w
            .http
            .get(format!("{}/v1/events/{}", w.url, "ab".repeat(32)))
            .send()
            .await
            .expect("get");
        (r.status(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("event_not_found"))
    );
}

/// RFC 9162 §2.1.3.2, written here independently of the node's code.
fn rfc_verify_inclusion(
    leaf: [u8; 32],
    index: u64,
    size: u64,
    path: &[[u8; 32]],
    root: [u8; 32],
) -> bool {
    let h = |a: &[u8], b: &[u8]| -> [u8; 32] {
        let mut s = Sha256::new();
        s.update([1u8]);
        s.update(a);
        s.update(b);
        s.finalize().into()
    };
    if index >= size {
        return false;
    }
    let (mut fnn, mut sn) = (index, size - 1);
    let mut r = leaf;
    for p in path {
        if sn == 0 {
            return false;
        }
        if fnn % 2 == 1 || fnn == sn {
            r = h(p, &r);
            while fnn % 2 == 0 && fnn != 0 {
                fnn >>= 1;
                sn >>= 1;
            }
        } else {
            r = h(&r, p);
        }
        fnn >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == root
}

/// RFC 9162 §2.1.4.2, written here independently of the node's code.
fn rfc_verify_consistency(
    first: u64,
    second: u64,
    first_hash: [u8; 32],
    second_hash: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    let h = |a: &[u8], b: &[u8]| -> [u8; 32] {
        let mut s = Sha256::new();
        s.update([1u8]);
        s.update(a);
        s.update(b);
        s.finalize().into()
    };
    if first == second {
        return proof.is_empty() && first_hash == second_hash;
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, first_hash);
    }
    let (mut fnn, mut sn) = (first - 1, second - 1);
    while fnn % 2 == 1 {
        fnn >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fnn % 2 == 1 || fnn == sn {
            fr = h(c, &fr);
            sr = h(c, &sr);
            while fnn % 2 == 0 && fnn != 0 {
                fnn >>= 1;
                sn >>= 1;
            }
        } else {
            sr = h(&sr, c);
        }
        fnn >>= 1;
        sn >>= 1;
    }
    fr == first_hash && sr == second_hash && sn == 0
}

fn hashes(value: &Value) -> Vec<[u8; 32]> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|h| {
            hex::decode(h.as_str().expect("hex"))
                .expect("hex")
                .try_into()
                .expect("32")
        })
        .collect()
}

#[tokio::test]
async fn transparency_log_checks_out_with_independent_verifiers() {
    let node = TestNode::start().expect("node");
    let mut w = Writer::new(&node).await;
    let issuer = node_key(&node);
    let mut ids = Vec::new();
    for i in 0..23u64 {
        ids.push(
            w.accept(&issuer, &[], mint(&SigningKey::from_bytes(&[5; 32]), i + 1))
                .await,
        );
    }
    let note = w
        .http
        .get(format!("{}/v1/checkpoint", w.url))
        .send()
        .await
        .expect("cp")
        .text()
        .await
        .expect("text");
    let note_file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(note_file.path(), &note).expect("write");
    let checked = python(
        "tlog_check.py",
        &[
            "note",
            note_file.path().to_str().expect("utf8"),
            &author_of(&issuer).to_hex(),
        ],
    )
    .expect("PyNaCl verifies the checkpoint");
    let parts: Vec<&str> = checked.split_whitespace().collect();
    assert_eq!(parts[1], "23");
    let root: [u8; 32] = hex::decode(parts[2]).expect("hex").try_into().expect("32");

    let ids_file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(
        ids_file.path(),
        ids.iter().map(|i| i.to_hex() + "\n").collect::<String>(),
    )
    .expect("write");
    let sizes: Vec<String> = (1..=23).map(|s| s.to_string()).collect();
    let mut args = vec!["roots", ids_file.path().to_str().expect("utf8")];
    args.extend(sizes.iter().map(String::as_str));
    let py_roots: Vec<[u8; 32]> = python("tlog_check.py", &args)
        .expect("pymerkle")
        .lines()
        .map(|l| hex::decode(l.trim()).expect("hex").try_into().expect("32"))
        .collect();
    assert_eq!(
        py_roots[22], root,
        "pymerkle's root differs from the checkpoint"
    );

    for size in [1u64, 2, 3, 8, 13, 23] {
        for (index, id) in ids.iter().enumerate().take(size as usize) {
            let proof = w
                .get(&format!("/v1/proofs/inclusion?id={id}&tree_size={size}"))
                .await;
            assert_eq!(proof["leaf_index"], index as u64);
            let leaf: [u8; 32] = {
                let mut s = Sha256::new();
                s.update([0u8]);
                s.update(id.as_bytes());
                s.finalize().into()
            };
            assert!(
                rfc_verify_inclusion(
                    leaf,
                    index as u64,
                    size,
                    &hashes(&proof["path"]),
                    py_roots[size as usize - 1]
                ),
                "inclusion of {index} in {size}"
            );
        }
        for old in 1..=size {
            let proof = w
                .get(&format!("/v1/proofs/consistency?from={old}&to={size}"))
                .await;
            assert!(
                rfc_verify_consistency(
                    old,
                    size,
                    py_roots[old as usize - 1],
                    py_roots[size as usize - 1],
                    &hashes(&proof["path"])
                ),
                "consistency {old} -> {size}"
            );
        }
    }
    // Bad parameters are clear 4xx.
    for path in [
        "/v1/proofs/inclusion",
        "/v1/proofs/inclusion?id=zz",
        "/v1/proofs/inclusion?id=00&tree_size=1",
        &format!("/v1/proofs/inclusion?id={}&tree_size=99", ids[0]),
        &format!("/v1/proofs/inclusion?id={}&tree_size=x", ids[0]),
        "/v1/proofs/consistency?from=5&to=99",
        "/v1/proofs/consistency?to=3",
    ] {
        let r = w
            .http
            .get(format!("{}{path}", w.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
    }
}

#[tokio::test]
async fn catalog_audit_bundle_and_gc_through_http_and_cli() {
    let mut node = TestNode::start().expect("node");
    let mut w = Writer::new(&node).await;
    let issuer = node_key(&node);
    let alice = SigningKey::from_bytes(&[2; 32]);
    // The node publishes a skill whose weights were uploaded without a pin.
    let weights: Vec<u8> = (0..50_000u32).map(|i| (i % 199) as u8).collect();
    let uploaded: Value = w
        .http
        .post(format!("{}/v1/blobs?pin=false", w.url))
        .bearer_auth(&w.token)
        .body(weights.clone())
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    let blob = BlobHash::from_hex(uploaded["hash"].as_str().expect("hash")).expect("hex");
    let skill = w
        .accept(
            &issuer,
            &[],
            Payload::SkillPublish(meshnode_schemas::SkillPublish {
                skill_id: "pinot".into(),
                name: "Pinot".into(),
                version: "1".into(),
                description: String::new(),
                domain: "viticulture".into(),
                capabilities: vec![],
                specializations: vec![],
                embedding: Vector::new(&[0.5, 0.25]).expect("v"),
                blob,
                size: weights.len() as u64,
                base_model: "m".into(),
                license: "MIT".into(),
                price: 1,
            }),
        )
        .await;
    let m = w.accept(&issuer, &[], mint(&alice, 50)).await;
    w.accept(
        &alice,
        &[skill],
        Payload::SkillEndorse(meshnode_schemas::SkillEndorse {
            skill,
            verdict: "valid".into(),
            score: 800,
            note: String::new(),
        }),
    )
    .await;
    let skills = w.get("/v1/skills").await;
    assert_eq!(skills["skills"][0]["endorsements"]["valid"], 1);

    // The CLI signs and submits with a key file, adding unreferenced credits as deps.
    let key_file = node.data_dir().join("alice.key");
    std::fs::write(&key_file, meshnode_schemas::key_file_text(&alice)).expect("key");
    let bob = SigningKey::from_bytes(&[3; 32]);
    let out = node.cli(&[
        "--json",
        "event",
        "token.transfer",
        "--key",
        key_file.to_str().expect("utf8"),
        "--payload",
        &json!({"to": author_of(&bob).to_hex(), "amount": 20, "memo": "cli"}).to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(submitted["status"], "accepted");
    let account = node.cli(&["--json", "account", &author_of(&bob).to_hex()]);
    let account: Value = serde_json::from_slice(&account.stdout).expect("json");
    assert_eq!(account["received"], 20);
    let _ = m;
    // A rejected CLI event exits 1 with the rule's code.
    let out = node.cli(&[
        "--json",
        "event",
        "token.transfer",
        "--key",
        key_file.to_str().expect("utf8"),
        "--payload",
        &json!({"to": author_of(&bob).to_hex(), "amount": 1000}).to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(error["error"]["code"], "insufficient_balance");

    // GC keeps envelopes and the weights of the node's own skill.
    let gc: Value = w
        .http
        .post(format!("{}/v1/gc", w.url))
        .bearer_auth(&w.token)
        .send()
        .await
        .expect("gc")
        .json()
        .await
        .expect("json");
    assert!(gc["kept"].as_u64().expect("kept") >= 5, "{gc}");
    let r = w
        .http
        .get(format!("{}/v1/blobs/{blob}", w.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK, "skill weights were collected");
    let audit = w.get("/v1/audit").await;
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["n_events"], 4);

    // Export a bundle through the CLI and verify it offline, with the node stopped.
    let bundle = node.data_dir().join("bundle");
    let out = node.cli(&[
        "--json",
        "audit",
        "--export",
        bundle.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    let node_hex = status["node"].as_str().expect("node").to_string();
    node.stop().expect("stop");
    let bundle_arg = bundle.to_str().expect("utf8");
    // A bundle alone proves only that it is self-consistent: the verifier names the node.
    let out = node.cli(&["--json", "audit", "--bundle", bundle_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node"));
    let other = "ab".repeat(32);
    let out = node.cli(&["--json", "audit", "--bundle", bundle_arg, "--node", &other]);
    assert_eq!(out.status.code(), Some(1));
    let out = node.cli(&[
        "--json", "audit", "--bundle", bundle_arg, "--node", &node_hex,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("checked against node key {node_hex}"))
    );
    let verified: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (verified["ok"].as_bool(), verified["tree_size"].as_u64()),
        (Some(true), Some(4))
    );
    assert_eq!(verified["checked_against"], node_hex.as_str());
    // With the node stopped, `meshnode audit` audits the data directory itself.
    let out = node.cli(&["--json", "audit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A tampered bundle fails.
    let events = bundle.join("events.bin");
    let mut bytes = std::fs::read(&events).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&events, bytes).expect("write");
    let out = node.cli(&[
        "--json", "audit", "--bundle", bundle_arg, "--node", &node_hex,
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_sigkill_during_ingest() {
    let mut node = TestNode::start().expect("node");
    let issuer = node_key(&node);
    let w = Writer::new(&node).await;
    let net = w.net;
    let acked: Arc<Mutex<Vec<(AuthorKey, u64, EventId)>>> = Arc::default();
    let mut tasks = Vec::new();
    // Four authors append concurrently: the issuer mints, three others publish host records.
    for author_seed in [0u8, 11, 12, 13] {
        let key = if author_seed == 0 {
            issuer.clone()
        } else {
            SigningKey::from_bytes(&[author_seed; 32])
        };
        let (url, token, acked) = (node.url.clone(), node.token.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = client();
            let author = author_of(&key);
            let mut prev = None;
            for seq in 1.. {
                let payload = if author_seed == 0 {
                    mint(&SigningKey::from_bytes(&[20; 32]), seq)
                } else {
                    Payload::BlobHost(meshnode_schemas::BlobHost {
                        blob: BlobHash::of(&seq.to_le_bytes()),
                        pinned: true,
                    })
                };
                let body = EventBody {
                    net,
                    author,
                    seq,
                    prev,
                    deps: vec![],
                    ts: 0,
                    payload,
                };
                let event = SignedEvent::sign(body, &key).expect("sign");
                let r = http
                    .post(format!("{url}/v1/events"))
                    .bearer_auth(&token)
                    .header("content-type", "application/cbor")
                    .body(event.envelope.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        acked.lock().expect("lock").push((author, seq, event.id));
                        prev = Some(event.id);
                    }
                    _ => return,
                }
            }
        }));
    }
    for waited in 0.. {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if acked.lock().expect("lock").len() >= 200 {
            break;
        }
        assert!(waited < 1200, "ingest too slow");
    }
    node.kill9();
    for t in tasks {
        t.await.expect("task");
    }
    let acked = acked.lock().expect("lock").clone();
    node.restart().expect("restart");
    let w = Writer::new(&node).await;
    for (_, _, id) in &acked {
        let r = w
            .http
            .get(format!("{}/v1/events/{id}", w.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::OK, "acknowledged event {id} lost");
    }
    // Every chain is intact: contiguous seqs, each prev the event before.
    let mut authors: Vec<AuthorKey> = acked.iter().map(|(a, _, _)| *a).collect();
    authors.dedup();
    for author in authors {
        let log = w.get(&format!("/v1/logs/{author}?limit=1000")).await;
        let events = log["events"].as_array().expect("events");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["seq"], i as u64 + 1);
            if i > 0 {
                assert_eq!(e["prev"], events[i - 1]["id"]);
            }
        }
    }
    let audit = w.get("/v1/audit").await;
    assert_eq!(audit["ok"], true, "{audit}");
}

/// GET with the status and the JSON body (`null` if none).
async fn get_with_status(w: &Writer, path: &str) -> (StatusCode, Value) {
    let r = w
        .http
        .get(format!("{}{path}", w.url))
        .send()
        .await
        .expect("get");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads every page of a list route, `limit` at a time, checking each: at most `limit` items,
/// a `next` that is the last item's cursor (and a full page) when more follow, `null` on the
/// last page, and every item once in strict key order. Returns the items' cursors (their `id`
/// field, or the item itself when `id` is `None`) in order.
async fn all_pages(
    w: &Writer,
    path: &str,
    key: &str,
    id: Option<&str>,
    limit: usize,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let url = match &after {
            Some(after) => format!("{path}?limit={limit}&after={after}"),
            None => format!("{path}?limit={limit}"),
        };
        let page = w.get(&url).await;
        assert!(page.get("next").is_some(), "{url}: no `next` in {page}");
        let items = page[key].as_array().expect("the list");
        assert!(items.len() <= limit, "{url}: {} items", items.len());
        for item in items {
            let cursor = match id {
                Some(field) => &item[field],
                None => item,
            };
            out.push(cursor.as_str().expect("hex cursor").to_string());
        }
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), limit, "{url}: a page before the last is full");
                assert_eq!(
                    out.last().map(String::as_str),
                    Some(next),
                    "{url}: `next` is the last item's cursor"
                );
                after = Some(next.to_string());
            }
            None => {
                assert!(page["next"].is_null(), "{url}: {page}");
                let mut ordered = out.clone();
                ordered.sort();
                ordered.dedup();
                assert_eq!(ordered, out, "{path}: every item once, in key order");
                return out;
            }
        }
    }
    panic!("{path}: paging does not end");
}

/// Every bad `limit` is 400 `invalid_query`, every malformed cursor 400 `invalid_cursor`, and a
/// limit above the maximum is clamped (200).
async fn check_page_parameters(w: &Writer, path: &str) {
    let upper = "AB".repeat(32);
    let short = "ab".repeat(31);
    for (query, code) in [
        ("limit=0".to_string(), "invalid_query"),
        ("limit=000".to_string(), "invalid_query"),
        ("limit=-1".to_string(), "invalid_query"),
        ("limit=ten".to_string(), "invalid_query"),
        ("limit=".to_string(), "invalid_query"),
        ("limit=1.5".to_string(), "invalid_query"),
        ("after=zz".to_string(), "invalid_cursor"),
        ("after=".to_string(), "invalid_cursor"),
        (format!("after={upper}"), "invalid_cursor"),
        (format!("after={short}"), "invalid_cursor"),
        (format!("limit=2&after={short}"), "invalid_cursor"),
    ] {
        let (status, body) = get_with_status(w, &format!("{path}?{query}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{path}?{query}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}?{query}: {body}"
        );
    }
    for query in ["limit=5000", "limit=99999999999999999999999"] {
        let (status, body) = get_with_status(w, &format!("{path}?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{path}?{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_routes_page_by_limit_and_cursor() {
    use futures::StreamExt;

    let node = TestNode::start().expect("node");
    let mut w = Writer::new(&node).await;
    let issuer = node_key(&node);
    let rate = |subject: AuthorKey, delta: i64| {
        Payload::ReputationDelta(meshnode_schemas::ReputationDelta {
            subject,
            delta,
            reason: "paging".into(),
            evidence: None,
        })
    };
    let mut subjects: Vec<String> = Vec::new();
    for i in 0..5u8 {
        let subject = author_of(&SigningKey::from_bytes(&[40 + i; 32]));
        w.accept(&issuer, &[], rate(subject, i64::from(i) + 1))
            .await;
        subjects.push(subject.to_hex());
    }
    subjects.sort();

    // By 2: pages of 2, 2 and 1, every subject once in key order; the last says `next: null`.
    assert_eq!(
        all_pages(&w, "/v1/reputation", "reputation", Some("subject"), 2).await,
        subjects
    );
    let first = w.get("/v1/reputation?limit=2").await;
    assert_eq!(first["next"], subjects[1].as_str());
    let last = w
        .get(&format!("/v1/reputation?limit=2&after={}", subjects[3]))
        .await;
    assert_eq!(last["reputation"].as_array().expect("list").len(), 1);
    assert!(last["next"].is_null(), "{last}");
    // A page that ends exactly at the end is the last one; so is one after the last item.
    let exact = w.get("/v1/reputation?limit=5").await;
    assert_eq!(exact["reputation"].as_array().expect("list").len(), 5);
    assert!(exact["next"].is_null(), "{exact}");
    let beyond = w
        .get(&format!("/v1/reputation?after={}", subjects[4]))
        .await;
    assert_eq!(beyond, json!({"reputation": [], "next": null}));
    // The cursor need not be an item: the items strictly after it.
    let mut between = hex::decode(&subjects[2]).expect("hex");
    between[31] ^= 1;
    let between = hex::encode(between);
    let page = w.get(&format!("/v1/reputation?after={between}")).await;
    let got: Vec<&str> = page["reputation"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["subject"].as_str().expect("subject"))
        .collect();
    let expected: Vec<&str> = subjects
        .iter()
        .map(String::as_str)
        .filter(|s| *s > between.as_str())
        .collect();
    assert_eq!(got, expected);

    // Every list route pages, and paging one by one gives what one default page gives.
    let blob: Value = w
        .http
        .post(format!("{}/v1/blobs", w.url))
        .bearer_auth(&w.token)
        .body(b"a pinned blob".to_vec())
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    for (path, key, id) in [
        ("/v1/skills", "skills", "id"),
        ("/v1/basins", "basins", "id"),
        ("/v1/nodes", "nodes", "author"),
        ("/v1/reputation", "reputation", "subject"),
        ("/v1/forks", "forks", "author"),
        ("/v1/pins", "pins", "hash"),
    ] {
        let whole = w.get(path).await;
        assert!(whole["next"].is_null(), "{path}: {whole}");
        let expected: Vec<String> = whole[key]
            .as_array()
            .expect("list")
            .iter()
            .map(|item| item[id].as_str().expect("cursor").to_string())
            .collect();
        assert_eq!(
            all_pages(&w, path, key, Some(id), 1).await,
            expected,
            "{path}"
        );
        check_page_parameters(&w, path).await;
    }
    let pins = all_pages(&w, "/v1/pins", "pins", Some("hash"), 1).await;
    assert!(pins.iter().any(|h| blob["hash"] == h.as_str()), "{pins:?}");

    // 1000 more subjects, each rated by a log of its own (so they can be sent at once).
    let http = client();
    let posts = (0..1000u32).map(|i| {
        let mut seed = [7u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        let author = SigningKey::from_bytes(&seed);
        seed[4] = 8;
        let subject = author_of(&SigningKey::from_bytes(&seed));
        let body = EventBody {
            net: w.net,
            author: author_of(&author),
            seq: 1,
            prev: None,
            deps: vec![],
            ts: 1_700_000_000_000,
            payload: rate(subject, 1),
        };
        let event = SignedEvent::sign(body, &author).expect("sign");
        let (http, url, token) = (http.clone(), w.url.clone(), w.token.clone());
        async move {
            http.post(format!("{url}/v1/events"))
                .bearer_auth(token)
                .header("content-type", "application/cbor")
                .body(event.envelope)
                .send()
                .await
                .expect("post")
                .status()
        }
    });
    let statuses: Vec<StatusCode> = futures::stream::iter(posts)
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    // The default page is 100; a limit above 1000 is clamped to 1000.
    let page = w.get("/v1/reputation").await;
    assert_eq!(page["reputation"].as_array().expect("list").len(), 100);
    assert_eq!(page["next"], page["reputation"][99]["subject"]);
    let page = w.get("/v1/reputation?limit=5000").await;
    let items = page["reputation"].as_array().expect("list");
    assert_eq!(items.len(), 1000, "limit=5000 is clamped to 1000");
    assert_eq!(page["next"], items[999]["subject"]);
    let rest = w
        .get(&format!(
            "/v1/reputation?limit=5000&after={}",
            page["next"].as_str().expect("next")
        ))
        .await;
    assert_eq!(rest["reputation"].as_array().expect("list").len(), 5);
    assert!(rest["next"].is_null(), "{rest}");
    let all = all_pages(&w, "/v1/reputation", "reputation", Some("subject"), 333).await;
    assert_eq!(all.len(), 1005);
    assert!(subjects.iter().all(|s| all.contains(s)));

    // The CLI follows every page, or prints the first N with the cursor to resume at.
    let out = node.cli(&["--json", "ledger", "reputation"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let cli_all: Vec<&str> = listed["reputation"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["subject"].as_str().expect("subject"))
        .collect();
    assert_eq!(cli_all, all.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(listed["next"].is_null());
    let out = node.cli(&["--json", "ledger", "reputation", "--limit", "3"]);
    let first3: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(first3["reputation"].as_array().expect("list").len(), 3);
    assert_eq!(first3["next"], all[2].as_str());
    let out = node.cli(&[
        "--json",
        "ledger",
        "reputation",
        "--limit",
        "1500",
        "--after",
        &all[2],
    ]);
    let more: Value = serde_json::from_slice(&out.stdout).expect("json");
    let more: Vec<&str> = more["reputation"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["subject"].as_str().expect("subject"))
        .collect();
    assert_eq!(
        more,
        all[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let out = node.cli(&["--json", "pin", "ls", "--limit", "1"]);
    let one: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(one["pins"].as_array().expect("list").len(), 1);
    let out = node.cli(&["ledger", "reputation", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2), "--limit 0 is a usage error");
}

#[tokio::test]
async fn account_credits_page_in_event_id_order() {
    let node = TestNode::start().expect("node");
    let mut w = Writer::new(&node).await;
    let issuer = node_key(&node);
    let alice = SigningKey::from_bytes(&[2; 32]);
    let mut credits = Vec::new();
    for amount in 1..=5 {
        credits.push(w.accept(&issuer, &[], mint(&alice, amount)).await.to_hex());
    }
    credits.sort();
    let account = format!("/v1/accounts/{}", author_of(&alice));

    // The account gives every credit up to 1000 by default, or the first `limit`.
    let whole = w.get(&account).await;
    assert_eq!(whole["unreferenced_credits"], json!(credits));
    assert!(whole["credits_next"].is_null(), "{whole}");
    assert_eq!(whole["balance"], 15);
    let first = w.get(&format!("{account}?limit=2")).await;
    assert_eq!(first["unreferenced_credits"], json!(credits[..2]));
    assert_eq!(first["credits_next"], credits[1].as_str());
    assert_eq!(first["balance"], 15);

    // The credits route pages through all of them.
    let credits_path = format!("{account}/credits");
    for limit in [1, 2, 5, 1000] {
        assert_eq!(
            all_pages(&w, &credits_path, "credits", None, limit).await,
            credits,
            "limit {limit}"
        );
    }
    let rest = w.get(&format!("{credits_path}?after={}", credits[1])).await;
    assert_eq!(rest, json!({"credits": credits[2..], "next": null}));
    check_page_parameters(&w, &credits_path).await;
    check_page_parameters(&w, &account).await;

    // A key with no credits: an empty last page.
    let bob = author_of(&SigningKey::from_bytes(&[3; 32]));
    let none = w.get(&format!("/v1/accounts/{bob}/credits")).await;
    assert_eq!(none, json!({"credits": [], "next": null}));
    let (status, body) = get_with_status(&w, "/v1/accounts/zz/credits").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );

    // The CLI still finds the credits to name as deps: alice spends through it.
    let key_file = node.data_dir().join("alice.key");
    std::fs::write(&key_file, meshnode_schemas::key_file_text(&alice)).expect("key");
    let out = node.cli(&[
        "--json",
        "event",
        "token.transfer",
        "--key",
        key_file.to_str().expect("utf8"),
        "--payload",
        &json!({"to": bob.to_hex(), "amount": 15}).to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.get(&account).await["balance"], 0);
}
