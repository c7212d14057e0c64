# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: setup run test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) experiments/run_svi.py --out runs/default

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ltm_pyro experiments tests
