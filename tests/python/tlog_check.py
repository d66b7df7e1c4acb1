"""Independent checks of meshnode's transparency log with pymerkle and PyNaCl.

  tlog_check.py roots FILE SIZE...         -> pymerkle RFC 6962 root (hex) of the first SIZE
                                               EventIds listed in FILE (one hex id per line)
  tlog_check.py note NOTE_FILE PUBKEY_HEX  -> verifies a C2SP signed note with PyNaCl; prints
                                               "origin size root_hex"
"""
import base64
import hashlib
import sys

import nacl.signing
from pymerkle import InmemoryTree


def roots(path, sizes):
    ids = [bytes.fromhex(line.strip()) for line in open(path) if line.strip()]
    tree = InmemoryTree(algorithm="sha256")
    for leaf in ids:
        tree.append_entry(leaf)
    for size in sizes:
        print(tree.get_state(size).hex())


def note(path, pubkey_hex):
    text = open(path).read()
    body, sigs = text.split("\n\n", 1)
    body += "\n"
    origin, size, root_b64 = body.splitlines()[:3]
    key = bytes.fromhex(pubkey_hex)
    key_id = hashlib.sha256(origin.encode() + b"\n" + b"\x01" + key).digest()[:4]
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            continue
        name, blob = line[2:].split(" ", 1)
        blob = base64.b64decode(blob)
        if name != origin or blob[:4] != key_id:
            continue
        nacl.signing.VerifyKey(key).verify(body.encode(), blob[4:])
        print(origin, size, base64.b64decode(root_b64).hex())
        return
    raise SystemExit("no valid signature")


if __name__ == "__main__":
    if sys.argv[1] == "roots":
        roots(sys.argv[2], [int(s) for s in sys.argv[3:]])
    elif sys.argv[1] == "note":
        note(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("unknown command")
