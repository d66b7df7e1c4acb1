"""Shared helpers of the benchmark drivers: running cargo benches, reporting."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def cpu_features():
    text = Path("/proc/cpuinfo").read_text()
    return sorted(set(re.findall(r"avx512[a-z]*|avx2", text)))


def cargo_bench(crate, bench, *args, env=None):
    cmd = ["cargo", "bench", "-q", "-p", crate, "--bench", bench, "--", *map(str, args)]
    log("$", " ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    sys.stderr.write(out.stderr[-4000:])
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {out.returncode} (its stderr is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Report:
    def __init__(self, name):
        self.name = name
        self.rows = []
        self.extra = {}

    def row(self, workload, ours, peer, unit, ratio, target, met):
        self.rows.append({"workload": workload, "meshnode": ours, "peer": peer, "unit": unit,
                          "ratio": round(ratio, 3), "target": target, "met": bool(met)})
        log(f"{workload}: meshnode {ours:.3f} {unit} | peer {peer:.3f} | ratio {ratio:.2f} | {target}")

    def finish(self):
        OUT.mkdir(parents=True, exist_ok=True)
        result = {"cpu_features": cpu_features(), "nproc": os.cpu_count(), "rows": self.rows,
                  "extra": self.extra, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (OUT / f"{self.name}.json").write_text(json.dumps(result, indent=2))
        print(f"CPU features: {' '.join(result['cpu_features']) or 'none'}; {os.cpu_count()} cores")
        print(f"{'workload':56} | {'meshnode':>10} | {'peer':>10} | {'ratio':>6} | target")
        for r in self.rows:
            print(f"{r['workload']:56} | {r['meshnode']:10.3f} | {r['peer']:10.3f} | {r['ratio']:6.2f} | "
                  f"{r['target']} {'ok' if r['met'] else 'MISSED'}")
