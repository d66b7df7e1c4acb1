"""Independent implementation of meshnode's wire formats, for interop tests.

Uses `multiformats` + `blake3` for CIDs, `dag-cbor` for canonical DAG-CBOR and PyNaCl for
Ed25519. Nothing here shares code with the Rust implementation.

  interop.py cid FILE                    -> CIDv1 (raw, blake3) of the file's bytes
  interop.py sign SEED_HEX NET_HEX       -> hex envelope of a skill.publish signed here
  interop.py verify ENVELOPE_HEX PUB_HEX -> JSON summary of an envelope signed elsewhere
"""
import json
import struct
import sys

import blake3
import dag_cbor
import nacl.signing
from multiformats import CID, multihash

DOMAIN = b"meshnode/event/v1"


def cid(data: bytes) -> str:
    return str(CID("base32", 1, "raw", multihash.digest(data, "blake3", size=32)))


def f32le(values):
    return b"".join(struct.pack("<f", v) for v in values)


def sign(seed: bytes, net: bytes) -> bytes:
    key = nacl.signing.SigningKey(seed)
    author = key.verify_key.encode()
    body = {
        "v": 1,
        "net": net,
        "author": author,
        "seq": 1,
        "deps": [],
        "ts": 1700000000123,
        "kind": "skill.publish",
        "payload": {
            "skill_id": "py-skill",
            "name": "Python skill",
            "version": "0.1.0",
            "description": "signed by PyNaCl",
            "domain": "viticulture",
            "capabilities": ["classify"],
            "specializations": ["pinot"],
            "embedding": f32le([0.25, -1.5, 3.0]),
            "blob": blake3.blake3(b"weights").digest(),
            "size": 7,
            "base_model": "llama",
            "license": "MIT",
            "price": 42,
        },
    }
    body_bytes = dag_cbor.encode(body)
    event_id = blake3.blake3(body_bytes).digest()
    sig = key.sign(DOMAIN + event_id).signature
    return dag_cbor.encode({"body": body_bytes, "sig": sig})


def verify(envelope: bytes, public: bytes) -> dict:
    env = dag_cbor.decode(envelope)
    assert set(env) == {"body", "sig"}, env.keys()
    assert dag_cbor.encode(env) == envelope, "envelope not canonical"
    body_bytes = env["body"]
    body = dag_cbor.decode(body_bytes)
    assert dag_cbor.encode(body) == body_bytes, "body not canonical"
    event_id = blake3.blake3(body_bytes).digest()
    nacl.signing.VerifyKey(public).verify(DOMAIN + event_id, env["sig"])
    payload = body["payload"]
    return {
        "id": event_id.hex(),
        "kind": body["kind"],
        "seq": body["seq"],
        "author": body["author"].hex(),
        "amount": payload.get("amount"),
        "to": payload["to"].hex() if "to" in payload else None,
        "memo": payload.get("memo"),
    }


def main():
    command = sys.argv[1]
    if command == "cid":
        with open(sys.argv[2], "rb") as f:
            print(cid(f.read()))
    elif command == "sign":
        print(sign(bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])).hex())
    elif command == "verify":
        print(json.dumps(verify(bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]))))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
