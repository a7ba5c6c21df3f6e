# Two commands on a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv and install what they need on first use.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml models/pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install run demo demo-cli test test-fast lint clean gpu-wheels gpu-check

$(INSTALLED): pyproject.toml client/pyproject.toml models/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ./models -e ".[service,dev]"
	$(PY) -m pip install -q --disable-pip-version-check -e ./client
	rm -f $(VENV)/.installed-* && touch $@

install: $(INSTALLED)

# The service on the embedded default (SQLite + SQLite broker, files in ./var): API on :8000 and one worker.
run: install
	$(PY) -m service serve

# With `make run` going: a job on the offline dataset through the REST API, live progress, download and check.
demo: install
	$(PY) -m service demo

# Robustify a small CNN on the built-in offline digits on CPU and print clean / PGD-20 / AutoAttack accuracy.
demo-cli: install
	$(PY) -m core.engine.cli train --preset digits-demo --workdir runs/digits-demo --device cpu --threads 1

# Lint, type check, and every test: the unit and in-process API tiers, then the real stacks (API and Celery
# worker processes on SQLite and on PostgreSQL + Redis), two pytest workers, one stack each.
test: install lint
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The quick tier: engine units and the API in process (TestClient), no servers, no long training.
test-fast: install
	$(PY) -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf runs var .pytest_cache

# --- GPU acceptance run (bench/gpu_check.py: torch and the engine only) ---------------------------
# The GPU machine has Python 3.12 with torch but neither pydantic nor pyautoattack, and no network.
# Here: `make gpu-wheels` downloads them (this venv's versions) as wheels into .whl/ (git-ignored).
# Carry .whl to the GPU machine and run `make gpu-check` there: it installs the wheels into
# $(GPU_SITE) if pydantic is missing, then prints the summary and writes every figure to $(GPU_CHECK_JSON).
WHEELS ?= .whl
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_SITE ?= /tmp/peeraid-site
GPU_CHECK_JSON ?= runs/gpu_check.json
GPU_WHEELS := pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|pyautoattack

gpu-wheels: install
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(WHEELS) \
		$$($(PY) -m pip freeze --disable-pip-version-check | grep -iE '^($(GPU_WHEELS))==')
	ls $(WHEELS)

gpu-check:
	$(GPU_PY) -c 'import pydantic, pyautoattack' 2>/dev/null || \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	mkdir -p $(dir $(GPU_CHECK_JSON))
	PYTHONPATH=$(GPU_SITE):models/src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check --json $(GPU_CHECK_JSON)
