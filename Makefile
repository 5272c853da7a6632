# patternflow: `make demo` runs the demo on the local broker, `make test` runs every check,
# `make test-fast` the inner loop (every check, and the tests that run no dataflow process).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
export KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:9092
export PATTERNFLOW_CACHE ?= $(HOME)/.cache/patternflow

.PHONY: help venv system-packages kafka-up kafka-down kafka-wipe test test-fast check demo bench clean

help:
	@echo "make demo        start the local Kafka broker and run the demo of every pattern (PATTERN=rag: one part)"
	@echo "make test        install, start the broker, run ruff, import contracts, mypy and every test"
	@echo "make test-fast   the same checks with the tests that run no dataflow process (the inner loop)"
	@echo "make kafka-up    start the local Apache Kafka broker (KRaft) at $$KAFKA_BOOTSTRAP_SERVERS"
	@echo "make kafka-down  stop it;  make kafka-wipe  stop it and delete its data"
	@echo "make bench       run the benchmarks in quick mode"

venv:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "patternflow needs Python 3.11 (Bytewax 0.21.1 wheels stop at 3.12); set PYTHON=/path/to/python3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip leaves installed packages alone, so a warm venv costs seconds
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" > $(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; echo "pip install failed: full log in $(VENV)/pip.log"; exit 1; }

# Prometheus and Chromium for the platform tests (Debian packages, installed once).
system-packages:
	@scripts/system-packages.sh

kafka-up: venv
	@PYTHON=$(PY) scripts/kafka.sh up

kafka-down:
	@PYTHON=$(PY) scripts/kafka.sh down

kafka-wipe:
	@PYTHON=$(PY) scripts/kafka.sh wipe

check: venv
	@PY=$(PY) scripts/check

test: system-packages kafka-up
	@PY=$(PY) scripts/check

test-fast: kafka-up
	@PY=$(PY) scripts/check -m "not e2e and not outage and not platform and not secured"

demo: kafka-up
	@$(PY) -m scripts.demo $(PATTERN)

bench: kafka-up
	$(PY) -m bench.kafka_io --quick
	$(PY) -m bench.state --quick
	$(PY) -m bench.online --quick
	$(PY) -m bench.batch --quick
	$(PY) -m bench.rag --quick
	$(PY) -m bench.rag_scale --quick
	$(PY) -m bench.scale --quick

clean:
	rm -rf var $(filter-out bench/results/README.md,$(wildcard bench/results/*.md)) bench/results/*.png
