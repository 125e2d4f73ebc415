# Two commands for a newcomer: `make demo` (the main job) and `make test` (everything CI runs).
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# torch 2.14.1 + torchvision 0.29.1: the pair the reference (Transformers' image processor) needs.
# dino3 itself needs only torch; pyproject.toml keeps a lower bound for users.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

MODEL ?= vits16

.PHONY: install test demo demo-offline lint
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

# The main job: embed the example photos. Needs access to Meta's gated weights (see README).
demo: $(VENV)/.installed
	$(VENV)/bin/dino3 embed examples/images -m $(MODEL) -o out/embeddings.npz --overwrite

# The same path with random weights, for machines without hub access: checks everything but the features.
demo-offline: $(VENV)/.installed
	$(VENV)/bin/dino3 init-random vits16 out/vits16-random
	$(VENV)/bin/dino3 embed examples/images -m out/vits16-random -o out/embeddings-random.npz --overwrite

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
