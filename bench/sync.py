#!/usr/bin/env python3
"""Sync benchmark (BENCH.md, issue 11): an empty node catching up with one that holds N events
of M authors (time from `peer add` to equal state digests, bytes on the wire both ways) against
a raw iroh-blobs transfer of the same envelopes as one collection in the same run; then two
nodes of BIG events each that differ by 10 events: time, round trips and bytes to reconcile.

Environment: BENCH_SCRATCH, BENCH_SYNC_EVENTS (10000), BENCH_SYNC_AUTHORS (100),
BENCH_SYNC_BIG (100000).
"""
import os
import tempfile
from pathlib import Path

from common import Report, cargo_bench


def main():
    scratch = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir()))
    scratch.mkdir(parents=True, exist_ok=True)
    n = int(os.environ.get("BENCH_SYNC_EVENTS", "10000"))
    authors = int(os.environ.get("BENCH_SYNC_AUTHORS", "100"))
    big = int(os.environ.get("BENCH_SYNC_BIG", "100000"))
    r = cargo_bench("meshnode-gateway", "sync", n, authors, big, scratch)
    report = Report("sync")
    report.extra["raw"] = r
    payload = r["payload_bytes"]
    report.row(f"catch up: {n} events of {authors} authors, peer add to equal digest",
               r["catch_up_secs"], r["raw_iroh_blobs_secs"], "s",
               r["catch_up_secs"] / r["raw_iroh_blobs_secs"], "<= 2 s", r["catch_up_secs"] <= 2.0)
    report.row(f"catch up: bytes on the wire / payload ({payload} bytes of envelopes)",
               r["wire_bytes"] / payload, r["raw_iroh_blobs_bytes"] / payload, "x payload",
               r["wire_bytes"] / r["raw_iroh_blobs_bytes"], "<= 1.5x payload",
               r["wire_bytes"] <= 1.5 * payload)
    b = r["big"]
    report.row(f"two nodes of {b['n_events']} events differing by {b['differ_by']}: round trips",
               b["reconcile_round_trips"], 3, "round trips", b["reconcile_round_trips"] / 3, "<= 3",
               b["reconcile_round_trips"] <= 3)
    report.row(f"two nodes of {b['n_events']} events differing by {b['differ_by']}: bytes",
               b["reconcile_bytes"], 65536, "bytes", b["reconcile_bytes"] / 65536, "<= 64 KiB",
               b["reconcile_bytes"] <= 65536)
    report.finish()


if __name__ == "__main__":
    main()
