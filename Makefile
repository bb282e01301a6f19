# Two commands for a new user: `make serve` and `make test`. Both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tq_installed
PYTEST_ARGS ?=

.PHONY: install test test-fast serve lint format bench loadtest gpu-check soak

# Re-installs only when pyproject.toml changed since the last install; a no-op otherwise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing, and make fails on any non-zero exit: an empty suite cannot pass.
# The slowest tests are listed at the end: CI has a time budget, and this says what spends it.
test: install
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

# The development loop: the suite without the tests that start SGLang or Ray or take minutes (`make test`: all).
test-fast: install
	$(PY) -m pytest -m "not slow and not sglang and not ray" $(PYTEST_ARGS)

serve: install
	$(PY) -m tq_serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m tq_serve.bench distortion --head-dim 128 --bits 1 2 3 4

# Every GPU figure in one run (<= ~8 min on an H200): needs only torch, Triton and numpy, so it does not install the
# project (a bare GPU box has no SGLang); results/gpu/<gpu>/ unless OUT=DIR. ARGS=--dry-run checks it on a CPU.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONPATH=. $(GPU_PY) -m tq_serve.bench gpu $(if $(OUT),--out $(OUT)) $(ARGS)

# Locust against a running server (start one with `make serve` in another terminal). Loopback hosts only unless
# LOADTEST_ARGS=--allow-remote; results land in loadtest/results/.
HOST ?= http://127.0.0.1:30000
USERS ?= 4
SPAWN_RATE ?= 2
DURATION ?= 60s
WORKLOAD ?= mixed
loadtest: install
	$(PY) loadtest/run.py --host $(HOST) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--workload $(WORKLOAD) $(LOADTEST_ARGS)

# Pool-pressure soak: starts its own server with a small KV pool, loads it past capacity for SOAK_DURATION, probes
# greedy outputs and checks every slot comes back (loadtest/soak.py). Heavy: run it alone on the machine.
SOAK_DURATION ?= 10m
SOAK_ARGS ?=
soak: install
	$(PY) loadtest/soak.py --duration $(SOAK_DURATION) $(SOAK_ARGS)
