# The two commands in the README do all set-up on a fresh machine:
#   make demo   -- the main job
#   make test   -- the test suite
# Both create (or refresh, when setup.py or the lock changes) a local virtual env in $(VENV) with
# the exact versions of $(LOCK). torch==2.13.0 is installed *first*: an unpinned torch resolved by
# pip would pull several GB of CUDA wheels onto a CPU machine.
#   make test-latest  -- the suite on the newest releases setup.py allows (not the lock), in
#                        $(LATEST_VENV); prints what differs from the lock
#   make lock         -- rebuild $(LATEST_VENV) and write its versions to $(LOCK)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.echomoe-installed
LOCK := requirements.lock
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo demo-seeds test test-latest latest-env lock bench lint clean

$(STAMP): setup.py pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip setuptools
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) experiments/sweep.py configs/sweeps/demo.yaml --out results/demo --jobs 4 --only '*-seed0'

demo-seeds: install
	$(PY) experiments/sweep.py configs/sweeps/demo.yaml --out results/demo --jobs 4

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# A fresh venv with the newest releases that setup.py's ranges allow (torch pinned as above).
latest-env:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --quiet --upgrade pip setuptools
	$(LATEST_PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(LATEST_PY) -m pip install --quiet -e ".[dev]"

test-latest: latest-env
	$(LATEST_PY) .ci/lock.py diff $(LOCK)
	$(LATEST_PY) -m pytest $(PYTEST_ARGS); status=$$?; \
		$(LATEST_PY) .ci/lock.py diff $(LOCK); exit $$status

lock: latest-env
	$(LATEST_PY) .ci/lock.py write $(LOCK)

BENCH_JSON := results/moe_layer.json results/moe_layer_threads1.json results/train_step.json results/decode.json results/data.json

bench: install
	$(PY) experiments/benchmarks/moe_layer.py --out results/moe_layer.json
	$(PY) experiments/benchmarks/moe_layer.py --threads 1 --no-memory \
		--out results/moe_layer_threads1.json
	$(PY) experiments/benchmarks/train_step.py --out results/train_step.json
	$(PY) experiments/benchmarks/decode.py --out results/decode.json
	$(PY) experiments/benchmarks/data.py --out results/data.json
	$(PY) experiments/benchmarks/update_readme.py $(BENCH_JSON)

lint: install
	$(PY) -m ruff check echomoe experiments tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) results .pytest_cache .hypothesis
