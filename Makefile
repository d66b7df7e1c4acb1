# meshnode: `make run` starts a node, `make test` runs every test.
# Both install what they need on a fresh Debian machine with Rust (protoc, Python test deps).

CARGO ?= cargo
DATA_DIR ?= $(CURDIR)/.meshnode
HTTP_ADDR ?= 127.0.0.1:8080
TARGET_DIR := $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)
BIN := $(TARGET_DIR)/debug/meshnode

.PHONY: run test build deps lint bench bench-store bench-ledger bench-query bench-sync clean-data release torture

deps:
	@scripts/ensure-deps.sh build

build: deps
	@if [ ! -x "$(BIN)" ]; then echo "First build of the full stack (lance, datafusion, iroh): about 15 minutes on 2 cores. Later builds are incremental." >&2; fi
	$(CARGO) build --bin meshnode

run: build
	@scripts/ensure-deps.sh model
	@$(BIN) --data-dir "$(DATA_DIR)" serve --init --demo --http-addr $(HTTP_ADDR)

test:
	@scripts/ensure-deps.sh test
	@if [ ! -x "$(BIN)" ]; then echo "First build of the full stack: about 15 minutes on 2 cores." >&2; fi
	$(CARGO) test --workspace --no-fail-fast

# Crash torture (not part of `make test`): TORTURE_CYCLES (default 200) cycles of kill -9 during
# concurrent writes, restart, checks; TORTURE_SEED to repeat a run. About 10-20 minutes on 2 cores.
torture: build
	@scripts/ensure-deps.sh test
	MESHNODE_BIN=$(BIN) python3 scripts/torture.py

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks: release build (about 30 minutes cold), peers installed by ensure-deps.
# Results: a table on stdout and bench/out/<area>.json.
BENCH_SCRATCH ?= $(TARGET_DIR)/bench-scratch
export BENCH_SCRATCH

bench: bench-store bench-ledger bench-query bench-sync

release:
	@scripts/ensure-deps.sh bench
	@echo "Release build of the full stack: about 30 minutes cold on 2 cores." >&2
	$(CARGO) build --release --bin meshnode

bench-store: release
	MESHNODE_BIN=$(TARGET_DIR)/release/meshnode python3 bench/store.py

bench-ledger: release
	MESHNODE_BIN=$(TARGET_DIR)/release/meshnode python3 bench/ledger.py

bench-query: release
	MESHNODE_BIN=$(TARGET_DIR)/release/meshnode python3 bench/query.py

# Two nodes in the bench process (no external peer: the baseline is iroh-blobs itself).
bench-sync:
	python3 bench/sync.py

clean-data:
	rm -rf "$(DATA_DIR)"
