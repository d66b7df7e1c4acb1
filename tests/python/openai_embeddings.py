"""The official OpenAI Python client (PyPI openai, pinned) against a node's /v1/embeddings.
Usage: openai_embeddings.py BASE_URL TEXT... Prints {"model", "embeddings", "usage"} as the
client parsed them (it asks for base64 by default and decodes it itself)."""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused-reads-are-public", max_retries=0)
texts = sys.argv[2:]
answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
print(json.dumps({
    "model": answer.model,
    "embeddings": [d.embedding for d in sorted(answer.data, key=lambda d: d.index)],
    "usage": {"prompt_tokens": answer.usage.prompt_tokens, "total_tokens": answer.usage.total_tokens},
}))
