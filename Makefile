# The two commands of the contract: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
BENCH_STAMP = $(VENV)/.bench-stamp

.PHONY: run test test-fast lint services bench bench-quick bench-peers soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Run the gateway on the embedded default: SQLite journal under ./var, MLLP on 127.0.0.1:2575,
## metrics and health on 127.0.0.1:9102. Stop with Ctrl-C (drains in-flight messages first).
run: $(STAMP) var/certs/server.pem var/demo.yaml.sig
	mkdir -p var
	$(BIN)/gateway check-config config/dev.toml
	$(BIN)/gateway run --config config/dev.toml

## Development certificates for the TLS listener on 2576 (a CA, a server and a client certificate; see
## certs/README.md). Created once; `rm -r var/certs` to make new ones.
var/certs/server.pem: | $(STAMP)
	$(BIN)/gateway certs init var/certs

## A development key for signing rule sets (var/rules-dev.key, secret; var/rules-dev.pub, trusted by
## config/dev.toml), created once, and rules/demo.yaml signed with it whenever it changes. No key is in the
## repository; production rule sets are signed off the gateway's machine (docs/rules.md).
var/rules-dev.key: | $(STAMP)
	mkdir -p var
	$(BIN)/gateway rules keygen --key-id dev --out var/rules-dev

var/demo.yaml.sig: rules/demo.yaml var/rules-dev.key
	$(BIN)/gateway rules sign --key var/rules-dev.key --out $@ rules/demo.yaml

## The whole test suite; starts MariaDB and Mosquitto first when they are installed but stopped.
test: $(STAMP) services lint
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check gateway adapters tests bench
	$(BIN)/mypy

services:
	bash .ci/services

## Every benchmark in bench/, one table (bench/run_all.py; about 15-20 minutes, BENCH_QUICK=1 or `make
## bench-quick` for a 5-minute smoke run). Saved with the machine facts under var/bench/.
bench: $(BENCH_STAMP) bench-peers services
	$(BIN)/python bench/run_all.py

bench-quick: $(BENCH_STAMP) bench-peers services
	BENCH_QUICK=1 $(BIN)/python bench/run_all.py

## 10 minutes of mixed load against the daemon (MINUTES=n to change): RSS, descriptors and queue depths every
## 10 s, written to docs/soak.md and docs/soak.png (bench/soak.py).
MINUTES ?= 10
soak: $(BENCH_STAMP) services
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

## Debian's Orthanc, the second DICOM peer of the benchmark (not a service: the driver runs it on a temp dir).
bench-peers:
	bash bench/install_peers.sh

# matplotlib (the soak plot) is in the bench extra, installed only for these targets.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
