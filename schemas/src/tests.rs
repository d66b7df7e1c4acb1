//! Unit tests for schemas: golden vectors, round trips, canonical-form and limit rejections.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::limits::*;
use crate::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn net() -> BlobHash {
    BlobHash::of(b"golden genesis")
}

fn transfer_body() -> EventBody {
    EventBody {
        net: net(),
        author: author_of(&key(1)),
        seq: 2,
        prev: Some(EventId::from_bytes([7; 32])),
        deps: vec![EventId::from_bytes([8; 32])],
        ts: 1_700_000_000_000,
        payload: Payload::TokenTransfer(TokenTransfer {
            to: author_of(&key(2)),
            amount: 1500,
            memo: "thanks".into(),
        }),
    }
}

#[track_caller]
fn check_golden(bytes: &[u8], expected_hex: &str) {
    assert_eq!(hex::encode(bytes), expected_hex, "golden bytes changed");
}

#[test]
fn golden_cid() {
    let hash = BlobHash::of(b"hello");
    check_golden(
        hash.as_bytes(),
        "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f",
    );
    assert_eq!(
        hash.to_cid(),
        "bafkr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"
    );
    assert_eq!(BlobHash::parse(&hash.to_cid()), Ok(hash));
    assert_eq!(BlobHash::parse(&hash.to_hex()), Ok(hash));
}

#[test]
fn golden_transfer_body_and_envelope() {
    let signed = SignedEvent::sign(transfer_body(), &key(1)).expect("sign");
    check_golden(&signed.body_bytes, GOLDEN_TRANSFER_BODY);
    check_golden(signed.id.as_bytes(), GOLDEN_TRANSFER_ID);
    check_golden(&signed.envelope, GOLDEN_TRANSFER_ENVELOPE);
    let decoded = SignedEvent::decode(&signed.envelope).expect("decode");
    assert_eq!(decoded, signed);
    decoded.verify(&author_of(&key(1))).expect("verify");
}

#[test]
fn golden_genesis() {
    let genesis = Genesis::new("golden", author_of(&key(1)), 1_700_000_000_000);
    let bytes = genesis.encode().expect("encode");
    check_golden(&bytes, GOLDEN_GENESIS);
    assert_eq!(Genesis::decode(&bytes), Ok(genesis));
}

#[test]
fn golden_key_file() {
    let text = key_file_text(&key(1));
    assert_eq!(text, format!("{}\n", "01".repeat(32)));
    assert_eq!(
        author_of(&parse_key_file(&text).expect("parse")).to_hex(),
        "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    );
    for bad in [
        "",
        "01",
        &"0G".repeat(32),
        &"AB".repeat(32),
        &format!("{}\n\n", "01".repeat(32)),
    ] {
        assert!(parse_key_file(bad).is_err(), "{bad:?} accepted");
    }
}

// Golden vectors, cross-checked against Python `dag-cbor` + PyNaCl (tests/python/interop.py
// builds the same values independently).
const GOLDEN_TRANSFER_BODY: &str = "a96176016274731b0000018bcfe56800636e65745820d4f5024d04042b9d26531f0392076050bf0f3a29b4b2a5c23cd92ade7faf4941637365710264646570738158200808080808080808080808080808080808080808080808080808080808080808646b696e646e746f6b656e2e7472616e7366657264707265765820070707070707070707070707070707070707070707070707070707070707070766617574686f7258208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c677061796c6f6164a362746f58208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394646d656d6f667468616e6b7366616d6f756e741905dc";
const GOLDEN_TRANSFER_ID: &str = "584de5240d5aadfedd72b910443ff554318fc6c57258e99b4adafb46dc5274fa";
const GOLDEN_TRANSFER_ENVELOPE: &str = "a263736967584076aee61c4abafd0ccfba2da333d27b4f1a66d7a61daec9b6bfdb4ffb92c1902c7d614b1de34a799020597409dad37103bc79ecd5b5bbcd2e2f2fcbf940f4ae0264626f647959010ba96176016274731b0000018bcfe56800636e65745820d4f5024d04042b9d26531f0392076050bf0f3a29b4b2a5c23cd92ade7faf4941637365710264646570738158200808080808080808080808080808080808080808080808080808080808080808646b696e646e746f6b656e2e7472616e7366657264707265765820070707070707070707070707070707070707070707070707070707070707070766617574686f7258208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c677061796c6f6164a362746f58208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394646d656d6f667468616e6b7366616d6f756e741905dc";
const GOLDEN_GENESIS: &str = "a8617601646e616d6566676f6c64656e6673796d626f6c6343524467697373756572738158208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c68646563696d616c73066a637265617465645f6d731b0000018bcfe568006d737461727465725f6772616e741a3b9aca0071626173696e5f6f75746c6965725f6d6178fb4024000000000000";

fn decode_err(bytes: &[u8]) -> Error {
    SignedEvent::decode(bytes).expect_err("decoded")
}

fn body_err(bytes: &[u8]) -> Error {
    EventBody::decode(bytes).expect_err("decoded")
}

#[test]
fn rejects_non_canonical_bodies() {
    let body = transfer_body().encode().expect("encode");
    // Trailing byte.
    let mut trailing = body.clone();
    trailing.push(0);
    assert!(matches!(
        body_err(&trailing),
        Error::Malformed(_) | Error::NonCanonical
    ));

    // The same map with a null `prev` (absent is the only canonical form).
    #[derive(serde::Serialize)]
    struct WithNull<'a> {
        v: u64,
        ts: i64,
        net: &'a BlobHash,
        seq: u64,
        deps: &'a [EventId],
        prev: Option<EventId>,
        author: &'a AuthorKey,
        kind: &'a str,
        payload: &'a Payload,
    }
    let b = transfer_body();
    let mut first = b.clone();
    first.seq = 1;
    first.prev = None;
    let null_prev = to_canonical(&WithNull {
        v: 1,
        ts: first.ts,
        net: &first.net,
        seq: 1,
        deps: &first.deps,
        prev: None,
        author: &first.author,
        kind: "token.transfer",
        payload: &first.payload,
    })
    .expect("encode");
    assert_eq!(body_err(&null_prev), Error::NonCanonical);

    // An integer in a longer form than needed: seq 2 as a 2-byte uint (0x19 0x00 0x02).
    let needle = [0x63, b's', b'e', b'q', 0x02];
    let position = body
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("seq field");
    let mut long_int = body[..position + 4].to_vec();
    long_int.extend_from_slice(&[0x19, 0x00, 0x02]);
    long_int.extend_from_slice(&body[position + 5..]);
    assert_eq!(body_err(&long_int), Error::NonCanonical);
}

#[test]
fn rejects_unknown_fields_and_kinds() {
    let mut map: BTreeMap<String, ipld_core::ipld::Ipld> =
        serde_ipld_dagcbor::from_slice(&transfer_body().encode().expect("encode")).expect("map");
    map.insert("extra".into(), ipld_core::ipld::Ipld::Integer(1));
    let bytes = to_canonical(&map).expect("encode");
    assert!(matches!(body_err(&bytes), Error::Malformed(_)));

    let mut map: BTreeMap<String, ipld_core::ipld::Ipld> =
        serde_ipld_dagcbor::from_slice(&transfer_body().encode().expect("encode")).expect("map");
    map.insert(
        "kind".into(),
        ipld_core::ipld::Ipld::String("token.steal".into()),
    );
    let bytes = to_canonical(&map).expect("encode");
    assert!(matches!(body_err(&bytes), Error::UnknownKind(_)));

    let mut map: BTreeMap<String, ipld_core::ipld::Ipld> =
        serde_ipld_dagcbor::from_slice(&transfer_body().encode().expect("encode")).expect("map");
    map.insert("v".into(), ipld_core::ipld::Ipld::Integer(2));
    let bytes = to_canonical(&map).expect("encode");
    assert_eq!(body_err(&bytes), Error::Version(2));
}

#[test]
fn rejects_oversized_envelopes() {
    let big = vec![0u8; EVENT_BYTES_MAX + 1];
    assert!(matches!(decode_err(&big), Error::TooLarge { .. }));
    let mut body = transfer_body();
    body.payload = Payload::TokenTransfer(TokenTransfer {
        to: author_of(&key(2)),
        amount: 1,
        memo: "x".repeat(TEXT_SHORT_BYTES_MAX + 1),
    });
    assert!(matches!(
        SignedEvent::sign(body, &key(1)),
        Err(Error::InvalidField { field: "memo", .. })
    ));
}

fn vector_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn vectors() {
    #[track_caller]
    fn check(bytes: Vec<u8>, ok: bool) {
        let vector: Vector = serde_ipld_dagcbor::from_slice(
            &to_canonical(&serde_bytes::ByteBuf::from(bytes.clone())).expect("enc"),
        )
        .expect("decode");
        assert_eq!(vector.check("embedding").is_ok(), ok, "{bytes:?}");
    }
    check(vector_bytes(&[0.5, -1.0, 3.25]), true);
    check(vector_bytes(&[]), true);
    check(vector_bytes(&[f32::NAN]), false);
    check(vector_bytes(&[1.0, f32::INFINITY]), false);
    check(vector_bytes(&[f32::NEG_INFINITY]), false);
    check(vec![0, 0, 128], false);
    check(vec![0; 4 * (VECTOR_DIM_MAX + 1)], false);
    check(vec![0; 4 * VECTOR_DIM_MAX], true);
    assert!(Vector::new(&[f32::NAN]).is_err());
    assert_eq!(
        Vector::new(&[1.0, 2.0]).expect("vector").values(),
        vec![1.0, 2.0]
    );
}

/// Small-order points (the 8-torsion subgroup): keys built from them must be refused.
const SMALL_ORDER_POINTS: [&str; 7] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
];

#[test]
fn refuses_weak_and_non_canonical_keys() {
    for hex_key in SMALL_ORDER_POINTS {
        let key = AuthorKey::from_hex(hex_key).expect("hex");
        assert!(
            matches!(key.validate(), Err(Error::BadKey(_))),
            "{hex_key} accepted"
        );
    }
    // y = p (2^255 - 19) is a non-canonical encoding of y = 0.
    let non_canonical =
        AuthorKey::from_hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
            .expect("hex");
    assert!(non_canonical.validate().is_err());
    // y = 3 is on the curve and of large order; y = 3 + p encodes the same point.
    let three =
        AuthorKey::from_hex("0300000000000000000000000000000000000000000000000000000000000000")
            .expect("hex");
    assert!(three.validate().is_ok());
    let three_plus_p =
        AuthorKey::from_hex("f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
            .expect("hex");
    assert!(
        matches!(three_plus_p.validate(), Err(Error::BadKey(m)) if m.contains("non-canonical")),
        "a non-canonical encoding of a valid point was accepted"
    );
    // The cache of valid keys must not let the other encoding through either.
    assert!(three.validate().is_ok());
    assert!(three_plus_p.validate().is_err());
    assert!(author_of(&key(1)).validate().is_ok());
}

#[test]
fn signatures_are_strict() {
    let signed = SignedEvent::sign(transfer_body(), &key(1)).expect("sign");
    let author = author_of(&key(1));
    signed.verify(&author).expect("valid");
    assert_eq!(signed.verify(&author_of(&key(2))), Err(Error::BadSignature));

    // Non-canonical S: add the group order L to S; verify_strict must refuse it.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut sig = signed.sig;
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(sig[32 + i]) + u16::from(L[i]) + carry;
        sig[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(
        verify_signature(&author, &signed.id, &sig),
        Err(Error::BadSignature)
    );

    // A small-order R (identity point) with S = 0 verifies under plain `verify` for weak keys;
    // with a real key and strict verification it must fail.
    let mut small_r = [0u8; 64];
    small_r[0] = 1;
    assert_eq!(
        verify_signature(&author, &signed.id, &small_r),
        Err(Error::BadSignature)
    );
    // Signature over the id without the domain prefix.
    use ed25519_dalek::Signer;
    let undomained = key(1).sign(signed.id.as_bytes()).to_bytes();
    assert_eq!(
        verify_signature(&author, &signed.id, &undomained),
        Err(Error::BadSignature)
    );
}

#[test]
fn header_rules() {
    #[track_caller]
    fn check(edit: impl Fn(&mut EventBody), field: &str) {
        let mut body = transfer_body();
        edit(&mut body);
        match body.validate() {
            Err(Error::InvalidField { field: f, .. }) => assert_eq!(f, field),
            Err(Error::TooLarge { what, .. }) => assert_eq!(what, field),
            other => panic!("expected a {field} error, got {other:?}"),
        }
    }
    check(|b| b.seq = 0, "seq");
    check(|b| b.prev = None, "prev");
    check(
        |b| {
            b.seq = 1;
        },
        "prev",
    );
    check(
        |b| b.deps = vec![EventId::from_bytes([9; 32]), EventId::from_bytes([8; 32])],
        "deps",
    );
    check(|b| b.deps = vec![EventId::from_bytes([9; 32]); 2], "deps");
    check(
        |b| {
            b.deps = (0..=DEPS_MAX as u8)
                .map(|i| EventId::from_bytes([i; 32]))
                .collect()
        },
        "deps",
    );
    let mut body = transfer_body();
    body.author = AuthorKey::from_hex(SMALL_ORDER_POINTS[0]).expect("hex");
    assert!(matches!(body.validate(), Err(Error::BadKey(_))));
}

#[test]
fn payload_rules() {
    #[track_caller]
    fn check(payload: Payload, field: &str) {
        match payload.validate() {
            Err(Error::InvalidField { field: f, .. }) | Err(Error::BadVector { field: f, .. }) => {
                assert_eq!(f, field)
            }
            Err(Error::TooLarge { what, .. }) => assert_eq!(what, field),
            other => panic!("expected a {field} error, got {other:?}"),
        }
    }
    let endorse = |verdict: &str, score| {
        Payload::SkillEndorse(SkillEndorse {
            skill: EventId::from_bytes([1; 32]),
            verdict: verdict.into(),
            score,
            note: String::new(),
        })
    };
    assert!(endorse("valid", 1000).validate().is_ok());
    check(endorse("maybe", 10), "verdict");
    check(endorse("invalid", 1001), "score");
    let delta = |indices: Vec<u64>, values: &[f32], weight_ppm| {
        Payload::BasinDelta(BasinDelta {
            basin_id: "b".into(),
            parent: EventId::from_bytes([1; 32]),
            indices,
            values: Vector::new(values).expect("vector"),
            weight_ppm,
        })
    };
    assert!(delta(vec![], &[1.0], 1).validate().is_ok());
    assert!(delta(vec![0, 3], &[1.0, 2.0], 1_000_000).validate().is_ok());
    check(delta(vec![0], &[1.0], 0), "weight_ppm");
    check(delta(vec![0], &[1.0], 1_000_001), "weight_ppm");
    check(delta(vec![3, 1], &[1.0, 2.0], 5), "indices");
    check(delta(vec![1], &[1.0, 2.0], 5), "values");
    check(delta(vec![], &[], 5), "values");
    let rep = |delta| {
        Payload::ReputationDelta(ReputationDelta {
            subject: author_of(&key(3)),
            delta,
            reason: String::new(),
            evidence: None,
        })
    };
    assert!(rep(-1000).validate().is_ok());
    check(rep(1001), "delta");
    check(rep(-1001), "delta");
    // `abs` of i64::MIN overflows: a panic in debug builds and a pass in release builds.
    check(rep(i64::MIN), "delta");
    check(rep(i64::MAX), "delta");
    let basin = |writers: Vec<AuthorKey>| {
        Payload::BasinPublish(BasinPublish {
            basin_id: "b".into(),
            coordinates: Vector::new(&[1.0]).expect("vector"),
            metadata: Default::default(),
            writers,
        })
    };
    assert!(
        basin(vec![author_of(&key(3)), author_of(&key(4))])
            .validate()
            .is_ok()
    );
    check(
        basin(vec![author_of(&key(3)), author_of(&key(3))]),
        "writers",
    );
    check(basin(vec![author_of(&key(3)); 65]), "writers");
    check(
        Payload::TokenMint(TokenMint {
            to: author_of(&key(3)),
            amount: 0,
            reason: String::new(),
        }),
        "amount",
    );
    assert!(matches!(
        Payload::KeyRotate(KeyRotate {
            new_key: AuthorKey::from_hex(SMALL_ORDER_POINTS[1]).expect("hex"),
        })
        .validate(),
        Err(Error::BadKey(_))
    ));
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9 _.é-]{{0,{max}}}")).expect("regex")
}

fn arb_vector() -> impl Strategy<Value = Vector> {
    proptest::collection::vec(-1.0e6f32..1.0e6, 1..16)
        .prop_map(|v| Vector::new(&v).expect("finite"))
}

fn arb_id() -> impl Strategy<Value = EventId> {
    any::<[u8; 32]>().prop_map(EventId::from_bytes)
}

fn arb_author() -> impl Strategy<Value = AuthorKey> {
    any::<u8>().prop_map(|s| author_of(&key(s)))
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (
            arb_text(20),
            proptest::collection::vec(arb_text(10), 0..3),
            arb_vector(),
            arb_text(30)
        )
            .prop_map(
                |(service, caps, v, addr)| Payload::NodeAnnounce(NodeAnnounce {
                    service,
                    endpoints: caps.clone(),
                    capabilities: caps,
                    basin_signature: v,
                    addr,
                })
            ),
        (
            arb_text(20),
            arb_vector(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(t, v, blob, size, price)| Payload::SkillPublish(SkillPublish {
                    skill_id: format!("s{t}"),
                    name: t.clone(),
                    version: "1.0".into(),
                    description: t.clone(),
                    domain: t,
                    capabilities: vec![],
                    specializations: vec!["x".into()],
                    embedding: v,
                    blob: BlobHash::from_bytes(blob),
                    size,
                    base_model: "m".into(),
                    license: "MIT".into(),
                    price,
                })
            ),
        (arb_id(), 0u64..=1000, arb_text(40)).prop_map(|(skill, score, note)| {
            Payload::SkillEndorse(SkillEndorse {
                skill,
                verdict: if score % 2 == 0 { "valid" } else { "invalid" }.into(),
                score,
                note,
            })
        }),
        (
            arb_vector(),
            proptest::collection::btree_map(arb_text(8), arb_text(8), 0..4)
        )
            .prop_map(
                |(coordinates, metadata)| Payload::BasinPublish(BasinPublish {
                    basin_id: "basin".into(),
                    coordinates,
                    metadata,
                    writers: Vec::new(),
                })
            ),
        (arb_id(), arb_vector(), 1u64..=1_000_000).prop_map(|(parent, values, weight_ppm)| {
            Payload::BasinDelta(BasinDelta {
                basin_id: "basin".into(),
                parent,
                indices: vec![],
                values,
                weight_ppm,
            })
        }),
        (
            arb_author(),
            -1000i64..=1000,
            proptest::option::of(any::<[u8; 32]>())
        )
            .prop_map(|(subject, delta, evidence)| Payload::ReputationDelta(
                ReputationDelta {
                    subject,
                    delta,
                    reason: "r".into(),
                    evidence: evidence.map(Digest32::from_bytes),
                }
            )),
        (arb_author(), 1u64..).prop_map(|(to, amount)| Payload::TokenMint(TokenMint {
            to,
            amount,
            reason: "grant".into(),
        })),
        (arb_author(), 1u64.., arb_text(30)).prop_map(|(to, amount, memo)| {
            Payload::TokenTransfer(TokenTransfer { to, amount, memo })
        }),
        (any::<[u8; 32]>(), any::<bool>()).prop_map(|(blob, pinned)| Payload::BlobHost(BlobHost {
            blob: BlobHash::from_bytes(blob),
            pinned,
        })),
        arb_author().prop_map(|new_key| Payload::KeyRotate(KeyRotate { new_key })),
    ]
}

proptest! {
    #[test]
    fn envelope_round_trip(
        seed in any::<u8>(),
        seq in 1u64..1_000_000,
        deps in proptest::collection::btree_set(any::<[u8; 32]>(), 0..4),
        ts in any::<i64>(),
        payload in arb_payload(),
    ) {
        let signer = key(seed);
        let body = EventBody {
            net: net(),
            author: author_of(&signer),
            seq,
            prev: (seq > 1).then(|| EventId::from_bytes([3; 32])),
            deps: deps.into_iter().map(EventId::from_bytes).collect(),
            ts,
            payload,
        };
        let signed = SignedEvent::sign(body.clone(), &signer).expect("sign");
        let decoded = SignedEvent::decode(&signed.envelope).expect("decode");
        prop_assert_eq!(&decoded.body, &body);
        prop_assert_eq!(decoded.id, EventId::of_body(&body.encode().expect("encode")));
        prop_assert!(decoded.verify(&body.author).is_ok());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = SignedEvent::decode(&bytes);
        let _ = EventBody::decode(&bytes);
        let _ = Genesis::decode(&bytes);
    }

    #[test]
    fn ids_round_trip_through_text(bytes in any::<[u8; 32]>()) {
        let hash = BlobHash::from_bytes(bytes);
        prop_assert_eq!(BlobHash::parse(&hash.to_hex()), Ok(hash));
        prop_assert_eq!(BlobHash::parse(&hash.to_cid()), Ok(hash));
        prop_assert!(hash.to_cid().starts_with("bafkr4"));
    }
}

#[test]
fn id_text_rejections() {
    for bad in [
        "",
        "xyz",
        &"A".repeat(64),
        &"0".repeat(63),
        &"0".repeat(65),
        "..",
        "bafkqaaa",
        "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA",
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        "0000000000000000000000000000000000000000000000000000000000000000\0",
    ] {
        assert!(BlobHash::parse(bad).is_err(), "{bad:?} accepted");
    }
}

/// One seeded mutation of `bytes`: flip, overwrite with a boundary byte, insert, delete,
/// truncate or duplicate a slice. Reaches the parser behind the first few bytes, which random
/// bytes almost never do.
fn mutate(bytes: &mut Vec<u8>, choice: u64, at: usize, value: u8) {
    if bytes.is_empty() {
        bytes.push(value);
        return;
    }
    let at = at % bytes.len();
    match choice % 6 {
        0 => bytes[at] ^= 1 << (value % 8),
        1 => {
            bytes[at] = [
                0x00, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1f, 0x7f, 0x9f, 0xbf, 0xff,
            ][value as usize % 11]
        }
        2 => bytes.insert(at, value),
        3 => {
            bytes.remove(at);
        }
        4 => bytes.truncate(at),
        _ => {
            let end = (at + 1 + value as usize).min(bytes.len());
            let slice = bytes[at..end].to_vec();
            bytes.splice(at..at, slice);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn mutated_envelopes_never_panic_and_never_change_meaning(
        seed in any::<u8>(),
        payload in arb_payload(),
        edits in proptest::collection::vec((any::<u64>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let signer = key(seed);
        let body = EventBody {
            net: net(),
            author: author_of(&signer),
            seq: 1,
            prev: None,
            deps: Default::default(),
            ts: 1,
            payload,
        };
        let signed = SignedEvent::sign(body, &signer).expect("sign");
        let mut bytes = signed.envelope.clone();
        for (choice, at, value) in edits {
            mutate(&mut bytes, choice, at, value);
        }
        let _ = EventBody::decode(&bytes);
        let _ = Genesis::decode(&bytes);
        if let Ok(decoded) = SignedEvent::decode(&bytes) {
            // Whatever still decodes is canonical: it re-encodes to the same bytes, so one
            // event has one id; and a changed body no longer verifies.
            prop_assert_eq!(decoded.body.encode().expect("encode"), decoded.body_bytes.clone());
            if decoded.body != signed.body {
                prop_assert!(decoded.verify(&signed.body.author).is_err());
            }
        }
    }
}
