# Two commands on a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv and install what they need on first use.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install run demo demo-cli test clean

$(INSTALLED): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[service,dev]"
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
	$(PY) -m core.engine.cli train --preset digits-demo --workdir runs/digits-demo --device cpu

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs var .pytest_cache
