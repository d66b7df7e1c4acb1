#!/usr/bin/env python3
"""Submits every event of an audit bundle to a node, newest first (so nearly every event
arrives before its prev and deps and waits), and prints how the node answered.

Usage: scripts/replay-bundle.py BUNDLE_DIR URL TOKEN_FILE
"""
import collections
import struct
import sys
import urllib.request


def envelopes(path):
    data = open(path, "rb").read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def main():
    bundle, url, token_file = sys.argv[1:4]
    token = open(token_file).read().strip()
    answers = collections.Counter()
    for envelope in reversed(envelopes(f"{bundle}/events.bin")):
        request = urllib.request.Request(f"{url}/v1/events", data=envelope, method="POST", headers={
            "content-type": "application/cbor", "authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request) as response:
            answers[response.status] += 1
    print(", ".join(f"{n} answered {status}" for status, n in sorted(answers.items())))


if __name__ == "__main__":
    main()
