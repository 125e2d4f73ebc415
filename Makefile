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

.PHONY: install test demo lint
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
