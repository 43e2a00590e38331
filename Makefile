# The two newcomer commands: `make serve` and `make test`. Everything runs from .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
MODEL_BASE ?= $(CURDIR)/models/cifar10

.PHONY: install serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e ".[tf,dev]"

# The model server (real tensorflow_model_server if on PATH, else the embedded one) and the gateway,
# serving the shipped model in models/cifar10.
serve: install
	$(BIN)/python -m serving.run --model-base-path $(MODEL_BASE)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
