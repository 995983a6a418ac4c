# labkit: two commands do everything on a fresh machine.
#   make lab    set up (idempotent) and run the lab: every chapter on this machine, then the book
#   make test   set up (idempotent) and run every check: lint, unit tests, the chapters on the CPU, the book build
#
# TORCH is what pip installs for PyTorch when the environment has none yet. The default takes PyPI's
# build for your platform; on a CPU-only machine with a local CPU wheel, say e.g. TORCH=torch==2.13.0.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
EXTRAS ?= test,book,quant
LAB_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup lab test lint unit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

lab: setup
	$(BIN)/labkit lab $(LAB_ARGS)

lint: setup
	$(BIN)/ruff check labkit tests notebooks
	$(BIN)/ruff format --check labkit tests notebooks

# two workers: the chapters (one group, on one worker) beside the unit tests (on the other)
unit: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test: lint unit

clean:
	rm -rf $(VENV) runs book/_build
