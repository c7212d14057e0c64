# Two entry points for a fresh machine (see README): `make run` and `make test`.
#
# Torch, CPU or CUDA: `make setup` (and so `make run` / `make test`) installs torch into .venv
# first, from PyTorch's wheel index for the build asked for, then the package, whose
# `torch>=2.4,<2.14` that wheel meets. A plain `pip install torch` from PyPI would be, on
# Linux, the multi-GB CUDA build.
#   make test                              # TORCH=cpu, the default: the CPU wheel (~200 MB)
#   make setup TORCH=cuda                  # the CUDA wheel from TORCH_CUDA_INDEX (several GB)
#   make setup TORCH=cuda TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# Pick the cuXXX index that TORCH_VERSION is built for and the machine's driver
# supports (`nvidia-smi` prints the highest CUDA version it takes). Only the torch wheel comes
# from that index (--index-url, --no-deps: an unreachable index fails rather than falling
# back to PyPI's CUDA build; find-links or extra indexes in your pip configuration are still
# searched); its dependencies come from your usual index with the package. The build is
# recorded in .venv/.torch: a later plain `make test` keeps it, and naming the other build
# reinstalls the torch wheel in place (`rm -rf .venv` first for an environment without the
# CUDA build's nvidia-* wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu126
# The build .venv has (one set up before this choice existed has the CPU one); none yet: empty.
TORCH_BUILT := $(if $(wildcard $(VENV)/.installed),$(or $(shell cat $(VENV)/.torch 2>/dev/null),cpu))
ifndef TORCH
TORCH := $(or $(TORCH_BUILT),cpu)
endif
ifeq ($(TORCH),cpu)
TORCH_INDEX := $(TORCH_CPU_INDEX)
else ifeq ($(TORCH),cuda)
TORCH_INDEX := $(TORCH_CUDA_INDEX)
else
$(error TORCH=$(TORCH): use TORCH=cpu or TORCH=cuda)
endif
# Set when .venv has the other build than the one asked for.
TORCH_SWAP := $(if $(TORCH_BUILT),$(filter-out $(TORCH_BUILT),$(TORCH)))

.PHONY: setup run test notebooks lint mutants mutation mutation-module gpu-wheels FORCE

$(VENV)/.installed: pyproject.toml $(if $(TORCH_SWAP),FORCE)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps $(if $(TORCH_SWAP),--force-reinstall) \
		--index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	echo $(TORCH) > $(VENV)/.torch
	touch $@

setup: $(VENV)/.installed

FORCE:

run: setup
	$(PY) experiments/run_svi.py --out runs/default

# Notebooks execute at CI size (minutes); unset these to run them at full size.
NOTEBOOK_CI_SIZE := LTM_NB_TRAIN_STEPS=150 LTM_NB_WINDOWS=32 LTM_NB_IW_SAMPLES=32 \
	LTM_NB_NUTS_SAMPLES=60 LTM_NB_DOCS=128 LTM_NB_INFERENCE_STEPS=32 LTM_NB_RUN_DIR=../runs/notebook-ci

# The tests in two workers of one thread each, a module per worker at a time (its trained
# fixtures built once; TEST_WORKERS=0 runs them in this process): on a 2-core machine that
# beats one process with two threads and never oversubscribes the cores. Then the notebooks,
# one after another: they share one CI run folder. One thread for the notebooks too: a
# two-thread kernel beside any other torch job slows ~20x (measured: past the 600 s timeout,
# against 128 s for all three at one thread beside a training job).
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
	OMP_NUM_THREADS=1 $(NOTEBOOK_CI_SIZE) $(PY) -m pytest -q --nbmake --nbmake-timeout=900 notebooks

# The notebooks executed in place at full size (their defaults; tens of minutes on one thread),
# each code cell stamped with its source's hash: what gets committed is what the code gave.
notebooks: setup
	$(PY) notebooks/execute.py notebooks/*.ipynb

# Ruff, then the library's size and layering targets (printed; a missed one is reported, and
# make's "ignored" note follows, without failing the target).
lint: setup
	$(VENV)/bin/ruff check ltm_pyro experiments tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_families.py -k "compares or check_sees"
	-$(PY) experiments/check_structure.py

# Each change the suite once let through, applied to a copy: its named test must fail (minutes).
mutants: setup
	$(PY) tests/mutants/listed.py

# mutmut over the core modules with their fast tests ([tool.mutmut] in pyproject.toml); about
# an hour on 2 cores, not in CI. Writes experiments/results/mutation/core.{json,md}.
mutation: setup
	$(PY) -m pip install --quiet -e ".[mutation]"
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2
	$(PY) tests/mutants/score.py --mutants mutants --json experiments/results/mutation/core.json

# mutmut over one module outside the core with its own tests, in its own worktree beside this
# checkout (resumes; one thread, so it can run beside one experiment), then the scores of every
# module run so far (issue 43): make mutation-module MODULE=flops
mutation-module: setup
	$(PY) -m pip install --quiet -e ".[mutation]"
	$(PY) tests/mutants/by_module.py run $(MODULE)
	$(PY) tests/mutants/by_module.py score

# Wheels the GPU machine lacks (it has torch, numpy, seaborn, tqdm): see experiments/gpu_checks.sh.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
