# Two commands for a newcomer: `make demo` (the main job) and `make test` (everything CI runs).
# Each creates its own virtual environment and installs what it needs on first use: the demo only
# dino3 and a CPU build of torch (.venv-demo), the tests the pinned reference and every extra (.venv).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_VENV ?= .venv-demo

# torch 2.14.1 + torchvision 0.29.1: the pair the reference (Transformers' image processor) needs.
# dino3 itself needs only torch; pyproject.toml keeps a lower bound for users.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The demo needs dino3 and torch only: a small CPU build of torch.
$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q torch==2.13.0
	$(DEMO_VENV)/bin/python -m pip install -q -e .
	touch $@

MODEL ?= vits16

.PHONY: install test test-all demo demo-offline lint
install: $(VENV)/.installed

# Everything but the tests marked slow (a few minutes); test-all is what CI runs.
test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

test-all: $(VENV)/.installed
	$(PY) -m pytest

# The main job: embed the example photos -> out/embeddings.npz. With no access to Meta's gated
# weights here (see README), it says so and runs the same job on random weights.
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python examples/demo.py $(MODEL)

# The same job on random weights without trying the hub.
demo-offline: $(DEMO_VENV)/.installed
	HF_HUB_OFFLINE=1 $(DEMO_VENV)/bin/python examples/demo.py $(MODEL)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
