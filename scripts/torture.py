#!/usr/bin/env python3
"""Crash torture (`make torture`, not part of `make test`).

Each cycle starts the node on one data dir, runs concurrent mixed writers (blob adds of random
sizes, pinned or not; signed ledger events with deps on earlier acknowledged events, mints and
transfers; pins and unpins; GC) for a random 0.2-3 s, SIGKILLs the node while writes are in
flight, restarts it and checks:

- lost acknowledged writes: every blob whose last acknowledged operation pinned it is pinned
  and served with exactly its bytes; every blob an acknowledged skill names as its weights
  (a GC root) is served intact; every acknowledged unpin stays unpinned; every acknowledged
  event is in its author's log at its seq, and those of the last cycle (plus a sample of older
  ones, all of them every --full-every cycles and at the end) are served by GET /v1/events and
  their envelopes by GET /v1/blobs. Writes in flight at the kill may or may not be there and
  are never counted as lost (in-flight events are resubmitted, byte for byte, afterwards);
- corrupt bytes served: every body a blob GET returns (whole or a Range) is compared with the
  bytes that were uploaded;
- the audit (GET /v1/audit) is OK and its state digest is the status's;
- state unchanged by a restart: every --state-every cycles (and in the last one) the node is
  killed once more with nothing in flight and restarted; status (events, pending, supply,
  state digest, pins), the checkpoint and the pin list must be the same before and after.

Environment: MESHNODE_BIN (the binary; `make torture` builds the debug one), TORTURE_CYCLES
(default 200), TORTURE_SEED, TORTURE_DIR (where the scratch data dir goes). Flags override them;
see --help. Exit status 0 only when every figure is right.
"""
import argparse
import http.client
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "python"))

from common import log  # noqa: E402
from ledger import free_port  # noqa: E402

try:
    import blake3  # noqa: E402
    import dag_cbor  # noqa: E402
    import nacl.signing  # noqa: E402
    from interop import DOMAIN, f32le  # noqa: E402
except ImportError as e:  # pragma: no cover
    sys.exit(f"missing Python package ({e}); run `scripts/ensure-deps.sh test` first")

HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB


# ---------------------------------------------------------------------------------------------
# Model of what the node acknowledged.


class Blob:
    """A blob this run uploaded. Its bytes are regenerated from (seed, size) when needed."""

    __slots__ = ("hash", "seed", "size", "state", "owner", "protected", "cycle")

    def __init__(self, seed, size, owner, cycle):
        self.seed = seed
        self.size = size
        self.hash = blake3.blake3(self.data()).hexdigest()
        # pinned   : the last acknowledged operation pinned it -> must be served intact
        # unpinned : the last acknowledged operation unpinned it (or added it unpinned)
        #            -> must not be pinned; may be gone
        # unknown  : an operation on it was in flight at the kill (resolved after restart)
        # dangling : pinned but not served after an unacknowledged add (reported, left alone)
        # new      : not sent yet
        self.state = "unknown"
        self.owner = owner
        self.protected = False  # weights of an acknowledged skill.publish: a GC root
        self.cycle = cycle

    def data(self):
        return random.Random(self.seed).randbytes(self.size)


class Author:
    """A signed log written by exactly one writer thread."""

    def __init__(self, name, key):
        self.name = name
        self.key = key
        self.pub = key.verify_key.encode()
        self.seq = 0  # last seq known accepted
        self.head = None  # its EventId
        self.inflight = None  # Pending event (sent, no answer yet)
        self.credits = []  # (event id, amount) credits to us not yet named in a transfer's deps
        self.available = 0  # credits named in our deps minus what we sent
        self.n_skills = 0


class Pending:
    __slots__ = ("envelope", "id", "seq", "kind", "effects", "named", "amount", "sig", "author")

    def __init__(self, author, envelope, eid, seq, kind, sig, effects, named=(), amount=0):
        self.author = author
        self.envelope = envelope
        self.id = eid
        self.seq = seq
        self.kind = kind
        self.sig = sig
        self.effects = effects
        self.named = list(named)
        self.amount = amount


class AckedEvent:
    __slots__ = ("id", "author", "seq", "kind", "sig", "envelope_hash", "cycle")

    def __init__(self, p, cycle):
        self.id = p.id
        self.author = p.author
        self.seq = p.seq
        self.kind = p.kind
        self.sig = p.sig.hex()
        self.envelope_hash = blake3.blake3(p.envelope).hexdigest()
        self.cycle = cycle


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = Counter()  # acknowledged writes by kind
        self.events_by_kind = Counter()
        self.lost = Counter()  # lost acknowledged writes by kind
        self.corrupt_bytes = 0
        self.corrupt_responses = 0
        self.audits_run = 0
        self.audits_ok = 0
        self.state_checks = 0
        self.state_mismatches = 0
        self.inflight_at_kill = Counter()
        self.inflight_found = Counter()  # in-flight writes found applied after the restart
        self.unexpected = Counter()  # answers no operation should get
        self.anomalies = []  # precise descriptions of everything wrong
        self.blob_gets = 0
        self.bytes_verified = 0
        self.event_gets = 0
        self.restart_secs = []
        self.quarantined = 0

    def problem(self, text):
        with self.lock:
            self.anomalies.append(text)
        log(f"  PROBLEM: {text}")


# ---------------------------------------------------------------------------------------------
# Node process.


class Node:
    def __init__(self, binary, data_dir, logfile):
        self.binary = binary
        self.data_dir = data_dir
        self.logfile = logfile
        self.proc = None
        self.port = None
        self.token = None

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    def init(self):
        subprocess.run([self.binary, "--data-dir", str(self.data_dir), "init"], check=True,
                       stdout=subprocess.DEVNULL)
        self.token = (self.data_dir / "api-token").read_text().strip()

    def start(self, timeout=120):
        """Starts the node and waits for /readyz; returns seconds to ready."""
        for attempt in range(3):
            self.port = free_port()
            started = time.perf_counter()
            with open(self.logfile, "ab") as f:
                f.write(f"--- start on port {self.port} at {time.strftime('%H:%M:%S')}\n".encode())
                f.flush()
                self.proc = subprocess.Popen(
                    [self.binary, "--data-dir", str(self.data_dir), "serve",
                     "--http-addr", f"{HOST}:{self.port}"],
                    stdout=subprocess.DEVNULL, stderr=f,
                    env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")))
            deadline = time.time() + timeout
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                    conn.request("GET", "/readyz")
                    r = conn.getresponse()
                    r.read()
                    conn.close()
                    if r.status == 200:
                        return time.perf_counter() - started
                except OSError:
                    pass
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.kill()
                raise RuntimeError(f"the node was not ready within {timeout} s; log: {self.logfile}")
            tail = self.log_tail()
            if "in use" in tail and attempt < 2:
                continue  # someone took the port between free_port and the bind
            raise RuntimeError(f"the node exited with {self.proc.returncode} while starting:\n{tail}")
        raise RuntimeError("could not start the node")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        if self.proc is not None:
            self.proc.wait()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=40):
        try:
            lines = Path(self.logfile).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, node, timeout=120):
        self.node = node
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, headers=None, auth=False):
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {self.node.token}"
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.node.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=headers)
            r = self.conn.getresponse()
            try:
                data = r.read()
            except http.client.IncompleteRead as e:
                # A streamed body cut short (e.g. verification failed mid-stream).
                self.close()
                return r.status, e.partial, True
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return r.status, data, False
        except Exception:
            self.close()
            raise

    def read(self, method, path, headers=None):
        """A read in the check phase: retried once on a stale keep-alive connection."""
        try:
            return self.request(method, path, headers=headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return self.request(method, path, headers=headers)

    def json(self, path):
        status, data, _ = self.read("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {data[:300]!r}")
        return json.loads(data)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------------------------------------
# Events.


def sign_event(author, net, kind, payload, deps):
    seq = author.seq + 1
    body = {
        "v": 1,
        "net": net,
        "author": author.pub,
        "seq": seq,
        "deps": sorted(set(deps)),
        "ts": int(time.time() * 1000),
        "kind": kind,
        "payload": payload,
    }
    if seq > 1:
        body["prev"] = author.head
    body_bytes = dag_cbor.encode(body)
    eid = blake3.blake3(body_bytes).digest()
    sig = author.key.sign(DOMAIN + eid).signature
    return dag_cbor.encode({"body": body_bytes, "sig": sig}), eid, seq, sig


def blob_size(rng):
    """Mostly small; around the 16 KiB (inline / small-blob) and 64 KiB (cache) boundaries, the
    1 MiB buffered-read limit, and rarely past 4 MiB (file outboard)."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.30:
        return rng.randint(1, 4 * KiB)
    if r < 0.45:
        return 16 * KiB + rng.randint(-2, 2)
    if r < 0.55:
        return 64 * KiB + rng.randint(-2, 2)
    if r < 0.85:
        return rng.randint(4 * KiB, 256 * KiB)
    if r < 0.90:
        return 1 * MiB + rng.randint(-1, 1)
    if r < 0.985:
        return rng.randint(256 * KiB, 3 * MiB)
    return 4 * MiB + rng.choice([0, 1, 16 * KiB + 1])


class World:
    """Everything shared by the writers and the checker."""

    def __init__(self, args, node, net, issuer_key):
        self.args = args
        self.node = node
        self.net = net
        self.stats = Stats()
        self.lock = threading.Lock()
        self.blobs = []  # the Blobs in the model (those that can still matter)
        self.by_hash = {}  # the same, by hash
        self.events = []  # every AckedEvent
        self.event_ids = set()
        self.skills = []  # acknowledged skill.publish ids
        self.recent = []  # acknowledged event ids, for deps: (author pub, id)
        self.authors = []
        self.issuer = Author("issuer", issuer_key)
        self.by_pub = {}
        self.cycle = 0
        self.killed = threading.Event()
        self.kill_time = float("inf")
        self.stop = threading.Event()

    def add_author(self, author):
        self.authors.append(author)
        self.by_pub[author.pub] = author

    def ack_event(self, p, found=False):
        """Records an event as accepted (acknowledged, or found applied after a restart)."""
        a = self.by_pub[p.author] if p.author in self.by_pub else self.issuer
        with self.lock:
            a.seq = p.seq
            a.head = p.id
            a.inflight = None
            ev = AckedEvent(p, self.cycle)
            self.events.append(ev)
            self.event_ids.add(p.id)
            self.recent.append((p.author, p.id))
            if len(self.recent) > 400:
                del self.recent[:200]
            for effect in p.effects:
                what = effect[0]
                if what == "skill":
                    self.skills.append(p.id)
                    if len(self.skills) > 200:
                        del self.skills[:100]
                elif what == "protect":
                    effect[1].protected = True
                elif what == "credit":
                    _, to, amount = effect
                    self.by_pub[to].credits.append((p.id, amount))
        with self.stats.lock:
            if not found:
                self.stats.acked["event"] += 1
            self.stats.events_by_kind[p.kind] += 1

    def deps_from_others(self, rng, me, n):
        with self.lock:
            pool = [eid for (pub, eid) in self.recent[-200:] if pub != me]
        if not pool:
            return []
        return rng.sample(pool, min(n, len(pool)))


# ---------------------------------------------------------------------------------------------
# Writers.


class Writer:
    """One writer thread's state; `run_phase` runs in a new thread each cycle."""

    def __init__(self, world, index, author, seed):
        self.world = world
        self.index = index
        self.author = author
        self.rng = random.Random(seed)
        self.client = None
        self.blobs = []  # the blobs this writer owns (only it pins or unpins them)
        self.inflight = None  # what was in flight when the connection broke
        self.inflight_since = 0.0
        self.ops = Counter()

    def run_phase(self):
        """Runs until the node is killed (or stop is set)."""
        self.client = Client(self.world.node, timeout=120)
        self.ops = Counter()
        self.cut = None  # the operation the kill interrupted
        self.inflight = None
        world = self.world
        try:
            while not world.stop.is_set():
                self.one_op()
                gap = self.rng.random()
                if gap < 0.5:
                    time.sleep(self.rng.uniform(0, world.args.gap))
        except Exception as e:  # noqa: BLE001 - any failure ends the phase
            if not world.killed.is_set() and not world.stop.is_set():
                # Give the kill a moment: a request may fail just as it happens.
                time.sleep(0.3)
            if not world.killed.is_set():
                world.stats.problem(
                    f"cycle {world.cycle}: writer {self.index}: request failed before the kill "
                    f"({type(e).__name__}: {e}); in flight: {self.inflight}; node alive: "
                    f"{world.node.alive()}")
            if self.inflight and self.inflight_since < world.kill_time:
                self.cut = self.inflight
                with world.stats.lock:
                    world.stats.inflight_at_kill[self.inflight] += 1
        finally:
            self.client.close()

    # -- operations

    def one_op(self):
        rng = self.rng
        pinned = [b for b in self.blobs if b.state == "pinned"]
        unpinned = [b for b in self.blobs if b.state == "unpinned"]
        r = rng.random()
        if len(pinned) > self.world.args.pinned_max:
            r = 0.0  # too many pinned: unpin one
        if r < 0.10 and pinned:
            self.unpin(rng.choice(pinned))
        elif r < 0.15 and unpinned:
            self.pin(rng.choice(unpinned))
        elif r < 0.18:
            self.gc()
        elif r < 0.20 and self.blobs:
            self.reupload(rng.choice(self.blobs))
        elif r < 0.60:
            self.upload()
        else:
            self.event()

    def mark(self, what):
        self.inflight = what
        self.inflight_since = time.monotonic()

    def upload(self, size=None, pin=None, blob=None):
        rng = self.rng
        if blob is None:
            if size is None:
                size = blob_size(rng)
            blob, fresh = self.new_blob(size)
            if not fresh:
                # The same bytes as a blob this writer has (e.g. the empty blob): re-add it.
                if blob.state in ("unknown", "dangling"):
                    return blob
                return self.upload(pin=pin, blob=blob)
        if pin is None:
            pin = rng.random() < 0.85
        data = blob.data()
        previous = blob.state
        if pin and previous != "pinned":
            blob.state = "unknown"  # a pin may or may not result
        elif previous == "new":
            blob.state = "unpinned"  # a new blob added unpinned: it must never be pinned
        self.mark("upload")
        status, body, _ = self.client.request(
            "POST", f"/v1/blobs?pin={'true' if pin else 'false'}", body=data,
            headers={"Content-Type": "application/octet-stream"}, auth=True)
        self.inflight = None
        if status == 201:
            answer = json.loads(body)
            if answer.get("hash") != blob.hash or answer.get("size") != blob.size:
                self.world.stats.problem(
                    f"cycle {self.world.cycle}: upload of {blob.size} bytes answered {answer}, "
                    f"expected hash {blob.hash}")
            if pin:
                blob.state = "pinned"
            with self.world.stats.lock:
                self.world.stats.acked["blob add (pinned)" if pin else "blob add (unpinned)"] += 1
            self.ops["upload"] += 1
        else:
            if not (status == 503 and b"quarantine" in body):  # 503: racing a purge, retry later
                self.unexpected("POST /v1/blobs", status, body)
            blob.state = previous if previous in ("pinned", "unpinned") else "unpinned"
        return blob

    def new_blob(self, size):
        """A blob of `size` random bytes that no other writer's blob in the model has (one
        owner per hash: only it pins or unpins); the existing Blob when this writer has it."""
        world = self.world
        for attempt in range(64):
            blob = Blob(self.rng.getrandbits(63), size, self.index, world.cycle)
            with world.lock:
                known = world.by_hash.get(blob.hash)
                if known is None:
                    blob.state = "new"
                    world.by_hash[blob.hash] = blob
                    world.blobs.append(blob)
                    self.blobs.append(blob)
                    return blob, True
            if known.owner == self.index:
                return known, False
            size += attempt // 8  # tiny sizes have few distinct contents
        raise RuntimeError(f"no unused content of about {size} bytes")

    def reupload(self, blob):
        """Uploads bytes this writer uploaded before (dedup path); pinned, it is a pin."""
        if blob.state in ("unknown", "dangling"):
            return
        self.upload(pin=True, blob=blob)

    def pin(self, blob):
        blob.state = "unknown"
        self.mark("pin")
        status, body, _ = self.client.request("PUT", f"/v1/pins/{blob.hash}", auth=True)
        self.inflight = None
        if status == 200:
            blob.state = "pinned"
            with self.world.stats.lock:
                self.world.stats.acked["pin"] += 1
            self.ops["pin"] += 1
        elif status == 404:
            blob.state = "unpinned"  # collected since its unpin
        else:
            blob.state = "unpinned"
            self.unexpected("PUT /v1/pins", status, body)

    def unpin(self, blob):
        blob.state = "unknown"
        self.mark("unpin")
        status, body, _ = self.client.request("DELETE", f"/v1/pins/{blob.hash}", auth=True)
        self.inflight = None
        if status == 200:
            blob.state = "unpinned"
            with self.world.stats.lock:
                self.world.stats.acked["unpin"] += 1
            self.ops["unpin"] += 1
        else:
            blob.state = "unpinned" if status == 404 else "pinned"
            self.unexpected(f"DELETE /v1/pins (a pinned blob, {blob.size} bytes)", status, body)

    def gc(self):
        self.mark("gc")
        status, body, _ = self.client.request("POST", "/v1/gc", auth=True)
        self.inflight = None
        if status == 200:
            with self.world.stats.lock:
                self.world.stats.acked["gc"] += 1
            self.ops["gc"] += 1
        else:
            self.unexpected("POST /v1/gc", status, body)

    def unexpected(self, what, status, body):
        key = f"{what} -> {status}"
        with self.world.stats.lock:
            self.world.stats.unexpected[key] += 1
        self.world.stats.problem(f"cycle {self.world.cycle}: {what} answered {status}: {body[:300]!r}")

    # -- events

    def event(self):
        world = self.world
        rng = self.rng
        me = self.author
        if self.index == 0 and rng.random() < 0.3:
            return self.submit(self.mint())
        choices = ["skill", "endorse", "reputation", "host", "transfer", "basin"]
        weights = [3, 3, 2, 1, 4, 1]
        kind = rng.choices(choices, weights)[0]
        if kind == "transfer" and me.available <= 0 and not me.credits:
            kind = "reputation"
        if kind == "endorse" and not world.skills:
            kind = "skill"
        if kind == "skill":
            return self.skill()
        others = [a for a in world.authors if a is not me]
        if kind == "endorse":
            with world.lock:
                skill = rng.choice(world.skills[-100:])
            deps = [skill] + world.deps_from_others(rng, me.pub, rng.randint(0, 2))
            payload = {"skill": skill, "verdict": rng.choice(["valid", "invalid"]),
                       "score": rng.randint(0, 1000), "note": f"torture {world.cycle}"}
            return self.submit(self.sign("skill.endorse", payload, deps))
        if kind == "reputation":
            payload = {"subject": rng.choice(others).pub, "delta": rng.randint(-100, 100),
                       "reason": "torture"}
            if rng.random() < 0.3:
                payload["evidence"] = rng.randbytes(32)
            deps = world.deps_from_others(rng, me.pub, rng.randint(0, 3))
            return self.submit(self.sign("reputation.delta", payload, deps))
        if kind == "basin":
            # Some with 4096 coordinates: an envelope over 16 KiB is stored as an iroh-blobs
            # blob, not in the small-blob table.
            dim = 4096 if rng.random() < 0.25 else 8
            me.n_skills += 1
            payload = {"basin_id": f"{me.name}-basin-{me.n_skills}",
                       "coordinates": f32le([rng.uniform(-1, 1) for _ in range(dim)]),
                       "metadata": {"by": "torture"}}
            deps = world.deps_from_others(rng, me.pub, rng.randint(0, 2))
            return self.submit(self.sign("basin.publish", payload, deps))
        if kind == "host":
            target = rng.choice(self.blobs).hash if self.blobs else rng.randbytes(32).hex()
            payload = {"blob": bytes.fromhex(target), "pinned": rng.random() < 0.5}
            deps = world.deps_from_others(rng, me.pub, rng.randint(0, 1))
            return self.submit(self.sign("blob.host", payload, deps))
        # transfer: name the new credits to us in deps (coverage), spend part of what we have
        with world.lock:
            named = me.credits[:48]
            del me.credits[:48]
        available = me.available + sum(a for _, a in named)
        if available <= 0:
            with world.lock:
                me.credits[:0] = named
            return None
        amount = rng.randint(1, max(1, min(available, 5000)))
        to = rng.choice(others)
        payload = {"to": to.pub, "amount": amount, "memo": f"torture {world.cycle}"}
        deps = [eid for eid, _ in named] + world.deps_from_others(rng, me.pub, rng.randint(0, 2))
        pending = self.sign("token.transfer", payload, deps[:64], effects=[("credit", to.pub, amount)])
        pending.named = named
        pending.amount = amount
        me.available = available - amount
        return self.submit(pending)

    def mint(self):
        world = self.world
        to = self.rng.choice(world.authors)
        amount = self.rng.randint(1000, 1_000_000)
        payload = {"to": to.pub, "amount": amount, "reason": "torture"}
        return self.sign("token.mint", payload, [], author=world.issuer,
                         effects=[("credit", to.pub, amount)])

    def skill(self):
        world = self.world
        rng = self.rng
        me = self.author
        me.n_skills += 1
        weights = None
        effects = [("skill",)]
        if rng.random() < 0.3:
            # Weights uploaded here, pinned; after the publish is acknowledged they are a GC
            # root, so the unpin that follows must not let GC take them.
            weights = self.upload(size=rng.choice([rng.randint(0, 20 * KiB), 16 * KiB]), pin=True)
            if weights.state != "pinned":
                return None
            effects.append(("protect", weights))
            blob_hash, size = bytes.fromhex(weights.hash), weights.size
        else:
            blob_hash, size = rng.randbytes(32), rng.randint(1, 1 << 30)
        payload = {
            "skill_id": f"{me.name}-skill-{me.n_skills}",
            "name": f"torture skill {me.n_skills}",
            "version": "0.1.0",
            "description": "written by scripts/torture.py",
            "domain": rng.choice(["viticulture", "finance", "medicine"]),
            "capabilities": ["classify"],
            "specializations": [],
            "embedding": f32le([rng.uniform(-1, 1) for _ in range(8)]),
            "blob": blob_hash,
            "size": size,
            "base_model": "llama",
            "license": "MIT",
            "price": rng.randint(0, 1000),
        }
        deps = world.deps_from_others(rng, me.pub, rng.randint(0, 2))
        accepted = self.submit(self.sign("skill.publish", payload, deps, effects=effects))
        if weights is not None:
            if accepted and rng.random() < 0.7:
                self.unpin(weights)

    def sign(self, kind, payload, deps, author=None, effects=()):
        author = author or self.author
        envelope, eid, seq, sig = sign_event(author, self.world.net, kind, payload, deps)
        return Pending(author.pub, envelope, eid, seq, kind, sig, list(effects))

    def submit(self, p):
        """Sends an event; True when it was acknowledged."""
        world = self.world
        author = world.by_pub.get(p.author, world.issuer)
        author.inflight = p
        self.mark("event")
        status, body, _ = self.client.request(
            "POST", "/v1/events", body=p.envelope,
            headers={"Content-Type": "application/cbor"}, auth=True)
        self.inflight = None
        return world.answer_event(p, author, status, body, self)


def answer_event(world, p, author, status, body, writer=None):
    if status in (200, 201):
        answer = json.loads(body)
        if answer.get("id") != p.id.hex() or answer.get("seq") != p.seq:
            world.stats.problem(f"cycle {world.cycle}: event {p.id.hex()} seq {p.seq} answered {answer}")
        world.ack_event(p)
        if writer:
            writer.ops["event"] += 1
        return True
    # Every event names only acknowledged events in prev and deps: it must be accepted.
    author.inflight = None
    with world.lock:
        author.credits[:0] = p.named
    author.available -= sum(a for _, a in p.named) - p.amount
    key = f"POST /v1/events ({p.kind}) -> {status}"
    with world.stats.lock:
        world.stats.unexpected[key] += 1
    world.stats.problem(f"cycle {world.cycle}: {p.kind} seq {p.seq} of {author.name} "
                        f"({p.id.hex()}) answered {status}: {body[:300]!r}")
    if status == 202:
        # Stored and waiting: it is there, but the log cannot go on past it safely.
        world.stats.problem("an event whose prev and deps were acknowledged waits as pending")
    return False


World.answer_event = answer_event


# ---------------------------------------------------------------------------------------------
# Checks after a restart.


def count_corrupt(got, expected):
    """Bytes of `got` that differ from `expected` at their position (extra bytes count too)."""
    if got == expected[: len(got)]:
        return 0
    n = sum(1 for x, y in zip(got, expected) if x != y)
    return n + max(0, len(got) - len(expected))


class Checker:
    def __init__(self, world):
        self.world = world
        self.client = Client(world.node, timeout=300)
        self.rng = random.Random(world.args.seed ^ 0x5EED)

    def get_blob(self, blob, want_exact, what):
        """GETs a blob; counts corrupt bytes; True when served whole and exact."""
        st = self.world.stats
        status, body, cut = self.client.read("GET", f"/v1/blobs/{blob.hash}")
        st.blob_gets += 1
        if status == 200:
            expected = blob.data()
            bad = count_corrupt(body, expected)
            if bad:
                st.corrupt_bytes += bad
                st.corrupt_responses += 1
                st.problem(f"cycle {self.world.cycle}: GET {blob.hash} ({blob.size} bytes, {what}) "
                           f"served {bad} corrupt bytes ({len(body)} bytes served)")
                return False
            st.bytes_verified += len(body)
            if len(body) != blob.size or cut:
                if want_exact:
                    st.problem(f"cycle {self.world.cycle}: GET {blob.hash} ({what}) served "
                               f"{len(body)} of {blob.size} bytes")
                return False
            return True
        if want_exact:
            st.problem(f"cycle {self.world.cycle}: GET {blob.hash} ({blob.size} bytes, {what}, "
                       f"acknowledged in cycle {blob.cycle}) answered {status}: {body[:200]!r}")
        return False

    def get_range(self, blob):
        st = self.world.stats
        a = self.rng.randrange(blob.size)
        b = self.rng.randrange(a, min(blob.size, a + 256 * KiB))
        status, body, _ = self.client.read("GET", f"/v1/blobs/{blob.hash}",
                                           headers={"Range": f"bytes={a}-{b}"})
        st.blob_gets += 1
        if status != 206:
            st.problem(f"cycle {self.world.cycle}: GET {blob.hash} Range bytes={a}-{b} of a pinned "
                       f"blob answered {status}: {body[:200]!r}")
            st.lost["blob (range read)"] += 1
            return
        expected = blob.data()[a:b + 1]
        bad = count_corrupt(body, expected)
        if bad or len(body) != len(expected):
            st.corrupt_bytes += bad
            st.corrupt_responses += 1 if bad else 0
            st.problem(f"cycle {self.world.cycle}: GET {blob.hash} Range bytes={a}-{b}: {bad} corrupt "
                       f"bytes, {len(body)} of {len(expected)} served")
        else:
            st.bytes_verified += len(body)

    def pins(self):
        """Every pin (following pages when the node pages the list)."""
        out = {}
        page = self.client.json("/v1/pins?limit=1000")
        while True:
            out.update((p["hash"], p["size"]) for p in page["pins"])
            if not page.get("next"):
                return out
            page = self.client.json(f"/v1/pins?limit=1000&after={page['next']}")

    def check_blobs(self, full):
        world, st = self.world, self.world.stats
        pins = self.pins()
        ranged = 0
        for blob in world.blobs:
            pinned = blob.hash in pins
            if blob.state in ("unknown", "new"):
                # In flight at the kill: whatever happened is fine, as long as what is served
                # is right; from now on the node's answer is the truth.
                if pinned:
                    if self.get_blob(blob, False, "in flight at the kill, pinned now"):
                        blob.state = "pinned"
                        st.inflight_found["blob add / pin"] += 1
                    else:
                        blob.state = "dangling"
                        st.problem(f"cycle {world.cycle}: blob {blob.hash} ({blob.size} bytes), "
                                   f"in flight at the kill, is pinned (size {pins[blob.hash]}) but "
                                   "not served")
                else:
                    blob.state = "unpinned"
                continue
            if blob.state == "pinned":
                if not pinned:
                    st.lost["pin / pinned blob add"] += 1
                    st.problem(f"cycle {world.cycle}: blob {blob.hash} ({blob.size} bytes, pinned "
                               f"and acknowledged, cycle {blob.cycle}) is not pinned after the restart")
                    blob.state = "unpinned"
                    if not blob.protected:
                        continue
                elif not self.get_blob(blob, True, "pinned"):
                    st.lost["pinned blob bytes"] += 1
                    blob.state = "dangling"
                    continue
                elif blob.size > 0 and ranged < 8 and self.rng.random() < 0.3:
                    ranged += 1
                    self.get_range(blob)
            elif blob.state == "unpinned" and pinned:
                st.lost["unpin"] += 1
                st.problem(f"cycle {world.cycle}: blob {blob.hash} ({blob.size} bytes) is pinned "
                           "after the restart, but its last acknowledged operation (an unpin, or "
                           "an add with pin=false) left it unpinned")
                blob.state = "pinned"
            if blob.protected and blob.state != "pinned":
                # Skill weights: a GC root whatever its pin.
                if full or blob.cycle >= world.cycle - 1 or self.rng.random() < 0.1:
                    if not self.get_blob(blob, True, "weights of an acknowledged skill (GC root)"):
                        st.lost["skill weights (GC root)"] += 1
                        blob.protected = False
            elif blob.state == "unpinned" and self.rng.random() < 0.05:
                self.get_blob(blob, False, "unpinned")  # may be gone; if served, must be right
        # Forget blobs that are gone for good, so that the model stays small.
        keep = []
        for blob in world.blobs:
            if blob.state in ("pinned", "unknown", "dangling") or blob.protected:
                keep.append(blob)
            elif blob.state == "unpinned" and blob.cycle >= world.cycle - 3:
                keep.append(blob)
        world.blobs = keep
        world.by_hash = {b.hash: b for b in keep}
        kept = set(id(b) for b in keep)
        for w in self.writers:
            w.blobs = [b for b in w.blobs if id(b) in kept]
        return pins

    def log_of(self, author):
        entries = {}
        head = None
        after = 0
        while True:
            page = self.client.json(f"/v1/logs/{author.pub.hex()}?after={after}&limit=1000")
            head = page["head_seq"]
            if not page["events"]:
                break
            for e in page["events"]:
                if e["seq"] in entries and entries[e["seq"]] != e["id"]:
                    self.world.stats.problem(f"cycle {self.world.cycle}: log of {author.name} "
                                             f"holds two events at seq {e['seq']}")
                entries[e["seq"]] = e["id"]
                after = max(after, e["seq"])
            if len(page["events"]) < 1000:
                break
        return head, entries

    def check_events(self, full):
        world, st = self.world, self.world.stats
        authors = world.authors + [world.issuer]
        logs = {a.pub: self.log_of(a) for a in authors}
        # Every acknowledged event is in its author's log at its seq.
        for ev in world.events:
            _, entries = logs[ev.author]
            if entries.get(ev.seq) != ev.id.hex():
                st.lost[f"event ({ev.kind})"] += 1
                st.problem(f"cycle {world.cycle}: acknowledged event {ev.id.hex()} ({ev.kind}, seq "
                           f"{ev.seq}, cycle {ev.cycle}) is not in its log (found "
                           f"{entries.get(ev.seq)})")
        # In-flight events: applied or not (they are resubmitted later either way).
        total = 0
        for a in authors:
            head, entries = logs[a.pub]
            p = a.inflight
            if p is not None and entries.get(p.seq) == p.id.hex():
                st.inflight_found["event"] += 1
                world.ack_event(p, found=True)
            expected_head = a.seq
            total += expected_head
            if head != expected_head or len(entries) != expected_head:
                st.problem(f"cycle {world.cycle}: log of {a.name} has head {head} and {len(entries)} "
                           f"events; expected {expected_head}")
        # Only this run writes events: the ledger holds exactly the logs' events.
        events = self.status()["events"]
        if events != total:
            st.problem(f"cycle {world.cycle}: the node reports {events} events; the logs hold {total}")
        # Acknowledged events served with their envelopes: the last cycle's, a sample, or all.
        recent = [ev for ev in world.events if ev.cycle >= world.cycle - 1]
        older = [ev for ev in world.events if ev.cycle < world.cycle - 1]
        sample = older if full else self.rng.sample(older, min(len(older), 40))
        for ev in recent + sample:
            status, body, _ = self.client.read("GET", f"/v1/events/{ev.id.hex()}")
            st.event_gets += 1
            if status != 200:
                st.lost[f"event ({ev.kind})"] += 1
                st.problem(f"cycle {world.cycle}: GET /v1/events/{ev.id.hex()} ({ev.kind}, "
                           f"acknowledged in cycle {ev.cycle}) answered {status}: {body[:200]!r}")
                continue
            got = json.loads(body)
            if got.get("id") != ev.id.hex() or got.get("sig") != ev.sig or got.get("seq") != ev.seq \
                    or got.get("blob") != ev.envelope_hash:
                st.problem(f"cycle {world.cycle}: GET /v1/events/{ev.id.hex()} answered a different "
                           f"event: {str(got)[:300]}")
                st.lost[f"event ({ev.kind})"] += 1
        # Their envelopes as blobs (small-blob table), byte for byte.
        for ev in (recent + sample)[:60]:
            status, body, _ = self.client.read("GET", f"/v1/blobs/{ev.envelope_hash}")
            st.blob_gets += 1
            if status != 200 or blake3.blake3(body).hexdigest() != ev.envelope_hash:
                if status == 200:
                    st.corrupt_bytes += len(body)
                    st.corrupt_responses += 1
                st.problem(f"cycle {world.cycle}: envelope blob {ev.envelope_hash} of event "
                           f"{ev.id.hex()} answered {status} ({len(body)} bytes)")
                st.lost[f"event envelope ({ev.kind})"] += 1
            else:
                st.bytes_verified += len(body)

    def status(self):
        return self.client.json("/v1/status")

    def audit(self, status):
        world, st = self.world, self.world.stats
        if status["events"] == 0:
            # An audit of an empty ledger records a previous checkpoint of size 0 that every
            # later audit then reports as `inconsistent_checkpoint` (a node bug, not a crash
            # one): audit only once there are events.
            return {"duration_ms": 0}
        st.audits_run += 1
        report = self.client.json("/v1/audit")
        ok = (report.get("ok") is True and report.get("n_findings") == 0
              and report.get("state_digest") == status["state_digest"]
              and report.get("tree_size") == status["events"])
        if ok:
            st.audits_ok += 1
        else:
            st.problem(f"cycle {world.cycle}: audit not OK: ok={report.get('ok')} "
                       f"n_events={report.get('n_events')} tree_size={report.get('tree_size')} "
                       f"(status: {status['events']}) digest {report.get('state_digest')} (status: "
                       f"{status['state_digest']}) findings={report.get('findings')}")
        return report

    def snapshot(self):
        """What a restart must not change."""
        s = self.status()
        _, checkpoint, _ = self.client.read("GET", "/v1/checkpoint")
        lines = checkpoint.decode(errors="replace").split("\n")
        return {
            "events": s["events"], "pending": s["pending"], "supply": s["supply"],
            "state_digest": s["state_digest"], "pins": s["pins"],
            "checkpoint": lines[1:3],  # tree size and root
            "pin_list": sorted(self.pins()),
        }


def wait_quiet(client, timeout=30):
    """Waits until nothing is pending."""
    deadline = time.time() + timeout
    s = client.json("/v1/status")
    while s["pending"] and time.time() < deadline:
        time.sleep(0.1)
        s = client.json("/v1/status")
    return s


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=int(os.environ.get("TORTURE_CYCLES", "200")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("TORTURE_SEED", "0")) or None,
                   help="random seed (printed; default: random)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writer threads (default 4)")
    p.add_argument("--min-secs", type=float, default=0.2)
    p.add_argument("--max-secs", type=float, default=3.0,
                   help="writes run a random time in [min, max] s before the kill")
    p.add_argument("--gap", type=float, default=0.05,
                   help="writers pause up to this many s between half of their operations")
    p.add_argument("--pinned-max", type=int, default=16,
                   help="pinned blobs a writer keeps before it unpins (bounds the data dir)")
    p.add_argument("--state-every", type=int, default=5,
                   help="every N cycles: kill -9 with nothing in flight, restart, compare state")
    p.add_argument("--full-every", type=int, default=50,
                   help="every N cycles: GET every acknowledged event, not a sample")
    p.add_argument("--dir", default=os.environ.get("TORTURE_DIR"),
                   help="parent of the scratch data dir (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data dir even when all is well")
    p.add_argument("--bin", default=os.environ.get("MESHNODE_BIN"),
                   help="meshnode binary (default: $MESHNODE_BIN)")
    args = p.parse_args()
    if not args.bin:
        sys.exit("set MESHNODE_BIN to the meshnode binary (or run `make torture`)")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1 << 31)
    started = time.time()

    work = Path(tempfile.mkdtemp(prefix="meshnode-torture-", dir=args.dir))
    data_dir = work / "data"
    node = Node(args.bin, data_dir, work / "node.log")
    node.init()
    node_key = nacl.signing.SigningKey(bytes.fromhex((data_dir / "node.key").read_text().strip()))
    net = blake3.blake3((data_dir / "genesis.cbor").read_bytes()).digest()
    print(f"meshnode torture: seed {args.seed}, {args.cycles} cycles, {args.writers} writers, "
          f"data dir {data_dir}", flush=True)
    print(f"  rerun with: TORTURE_SEED={args.seed} TORTURE_CYCLES={args.cycles} make torture "
          "(timing makes each run differ; the seed fixes sizes, kinds and kill delays)", flush=True)

    world = World(args, node, net, node_key)
    rng = random.Random(args.seed)
    for i in range(args.writers):
        world.add_author(Author(f"w{i}", nacl.signing.SigningKey(rng.randbytes(32))))
    writers_state = [Writer(world, i, world.authors[i], rng.getrandbits(63)) for i in range(args.writers)]
    checker = Checker(world)
    checker.writers = writers_state
    st = world.stats
    fatal = None

    try:
        node.start()
        for cycle in range(1, args.cycles + 1):
            world.cycle = cycle
            # -- writes, then SIGKILL at a random moment
            world.killed.clear()
            world.stop.clear()
            world.kill_time = float("inf")
            threads = []
            for w in writers_state:
                t = threading.Thread(target=w.run_phase, daemon=True, name=f"writer-{w.index}")
                threads.append(t)
            for t in threads:
                t.start()
            secs = rng.uniform(args.min_secs, args.max_secs)
            time.sleep(secs)
            # Kill while a request is in flight (writers pause between some operations).
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not any(w.inflight for w in writers_state):
                time.sleep(0.001)
            if not node.alive():
                st.problem(f"cycle {cycle}: the node died by itself during writes "
                           f"(exit {node.proc.returncode}); log tail:\n{node.log_tail()}")
            world.kill_time = time.monotonic()
            world.killed.set()
            node.kill()
            world.stop.set()
            for t in threads:
                t.join(timeout=180)
                if t.is_alive():
                    raise RuntimeError(f"cycle {cycle}: a writer hangs after the kill")
            ops = Counter()
            for w in writers_state:
                ops.update(w.ops)
            cut = Counter(w.cut for w in writers_state if w.cut)

            # -- restart and check
            ready = node.start()
            checks_started = time.time()
            st.restart_secs.append(ready)
            checker.client.close()
            full = cycle % args.full_every == 0 or cycle == args.cycles
            status = wait_quiet(checker.client)
            st.quarantined = max(st.quarantined, status["blobs_corrupt"])
            checker.check_blobs(full)
            checker.check_events(full)
            status = checker.status()
            report = checker.audit(status)
            state_check = cycle % args.state_every == 0 or cycle == args.cycles
            if state_check:
                before = checker.snapshot()
                node.kill()
                st.restart_secs.append(node.start())
                checker.client.close()
                after = checker.snapshot()
                st.state_checks += 1
                if before != after:
                    st.state_mismatches += 1
                    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
                    if "pin_list" in diff:
                        b, a = set(before["pin_list"]), set(after["pin_list"])
                        diff["pin_list"] = {"lost": sorted(b - a), "new": sorted(a - b)}
                    st.problem(f"cycle {cycle}: a restart with nothing in flight changed the state: {diff}")
            # In-flight events that did not land: resubmit them byte for byte.
            for a in world.authors + [world.issuer]:
                pending = a.inflight
                if pending is not None:
                    s, body, _ = checker.client.request(
                        "POST", "/v1/events", body=pending.envelope,
                        headers={"Content-Type": "application/cbor"}, auth=True)
                    answer_event(world, pending, a, s, body)
            log(f"cycle {cycle}/{args.cycles}: {secs:.1f} s of writes "
                f"({', '.join(f'{n} {k}' for k, n in sorted(ops.items())) or 'nothing acknowledged'}), "
                f"in flight at the kill: {', '.join(f'{n} {k}' for k, n in sorted(cut.items())) or 'none'}; "
                f"ready in {ready:.2f} s; checks {time.time() - checks_started:.1f} s "
                f"(audit {report['duration_ms']} ms); "
                f"{status['events']} events, {status['pins']} pins; audit "
                f"{'OK' if st.audits_ok == st.audits_run else 'FAILED'}"
                f"{'; restart state ' + ('same' if not st.state_mismatches else 'CHANGED') if state_check else ''}"
                f"{' (full check)' if full else ''}")
    except Exception as e:  # noqa: BLE001
        fatal = f"{type(e).__name__}: {e}"
        log(f"FATAL: {fatal}")
        log(node.log_tail())
    finally:
        node.kill()

    elapsed = time.time() - started
    panics = node.log_tail(10**9).count("panicked")
    du = Counter()
    for f in data_dir.rglob("*"):
        if f.is_file():
            du[f.relative_to(data_dir).parts[0]] += f.stat().st_size
    lost = sum(st.lost.values())
    n_acked = sum(st.acked.values())

    def by(counter):
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

    print()
    print(f"seed                            {args.seed}")
    print(f"cycles                          {world.cycle if fatal else args.cycles} of {args.cycles}")
    print(f"acknowledged writes             {n_acked}: {by(st.acked)}")
    print(f"  events by kind                {by(st.events_by_kind)}")
    print(f"in flight at the kills          {by(st.inflight_at_kill)} "
          f"(found applied after restart: {by(st.inflight_found)})")
    print(f"lost acknowledged writes        {lost}{' (' + by(st.lost) + ')' if lost else ''}")
    print(f"corrupt bytes served            {st.corrupt_bytes} (in {st.corrupt_responses} responses; "
          f"{st.blob_gets} blob GETs, {st.bytes_verified} bytes verified; {st.event_gets} event GETs)")
    print(f"audits OK / run                 {st.audits_ok} / {st.audits_run}")
    print(f"restart-state mismatches        {st.state_mismatches} (of {st.state_checks} checks, "
          f"every {args.state_every} cycles and the last)")
    print(f"unexpected answers              {sum(st.unexpected.values())}"
          f"{' (' + by(st.unexpected) + ')' if st.unexpected else ''}")
    print(f"blobs quarantined (max seen)    {st.quarantined}")
    print(f"panics in the node log          {panics}")
    if st.restart_secs:
        print(f"restart to ready                max {max(st.restart_secs):.2f} s, "
              f"mean {sum(st.restart_secs) / len(st.restart_secs):.2f} s")
    print(f"data dir at the end             {sum(du.values()) / MiB:.1f} MiB ("
          f"{', '.join(f'{k} {v / MiB:.1f}' for k, v in du.most_common(3))})")
    print(f"elapsed                         {elapsed:.0f} s")
    failed = (fatal or lost or st.corrupt_bytes or st.audits_ok != st.audits_run
              or st.state_mismatches or st.unexpected or st.anomalies or panics)
    if failed:
        print(f"FAILED: {len(st.anomalies)} problems{'; ' + fatal if fatal else ''}:")
        for a in st.anomalies[:50]:
            print(f"  - {a}")
        print(f"data dir and node log kept in {work}")
        sys.exit(1)
    print("OK")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"data dir and node log kept in {work}")


if __name__ == "__main__":
    main()
