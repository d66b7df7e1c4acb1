#!/usr/bin/env python3
"""Ledger benchmarks (BENCH.md): ingest of N events and a full audit against raw
`verify_strict` of the same events on all cores; restart of a real node after `kill -9`.

Environment: MESHNODE_BIN (release binary), BENCH_SCRATCH, BENCH_LEDGER_EVENTS (default 1000000).
"""
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from common import Report, cargo_bench, log


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, json.loads(r.read() or b"null")


def main():
    binary = os.environ["MESHNODE_BIN"]
    scratch = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir()))
    scratch.mkdir(parents=True, exist_ok=True)
    n = int(os.environ.get("BENCH_LEDGER_EVENTS", "1000000"))
    report = Report("ledger")
    result = cargo_bench("meshnode-gateway", "ledger", n, scratch, env={"BENCH_KEEP": "1"})
    report.extra["raw"] = result
    report.row(f"ingest {n} events (verify+validate+index+durable)", result["ingest_per_sec"],
               result["raw_verify_per_sec"], "events/s", result["ingest_ratio"], ">= 0.8",
               result["ingest_ratio"] >= 0.8)
    report.row(f"audit {n} events (time vs raw verify)", result["audit_secs"], result["raw_verify_secs"],
               "s", result["audit_ratio"], "<= 1.25", result["audit_ratio"] <= 1.25)

    data = result["data_dir"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [binary, "--data-dir", data, "serve", "--http-addr", f"127.0.0.1:{port}"]
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if get(url + "/readyz")[0] == 200:
                break
        except Exception:
            time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    while True:
        try:
            status, _ = get(url + "/readyz")
            if status == 200:
                break
        except Exception:
            time.sleep(0.02)
    ready = time.perf_counter() - started
    _, status = get(url + "/v1/status")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log(f"restart: ready in {ready:.2f} s with {status['events']} events")
    report.row(f"restart after kill -9 with {status['events']} events (s to ready)", ready, 5.0, "s",
               ready / 5.0, "<= 5 s", ready <= 5.0 and status["events"] == n)
    report.finish()


if __name__ == "__main__":
    main()
