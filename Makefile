# The two commands of the README: `make demo` and `make test`. Everything else is a helper of theirs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel of PyTorch; pin before anything else so no CUDA wheels are pulled in (see README).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
PYTEST_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)
export FHIR_NER_TEST_REDIS_URL := $(TEST_REDIS_URL)

.PHONY: install node redis demo test lint typecheck dockerlint unit train-default bench clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

tests/ehr/node_modules/.package-lock.json: tests/ehr/package-lock.json $(BIN)/.installed
	cd tests/ehr && npm ci --no-audit --no-fund --loglevel=error

node: tests/ehr/node_modules/.package-lock.json

redis: install
	@bash tests/ensure-redis.sh "$(TEST_REDIS_URL)"

demo: install
	$(BIN)/fhir-ner demo --output demo-output

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy adapter mappings

dockerlint: install
	$(BIN)/hadolint docker/Dockerfile.api docker/Dockerfile.worker

unit: install node redis
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck dockerlint unit

train-default: install
	$(BIN)/python benchmarks/train_default.py --threads 2

clean:
	rm -rf $(VENV) tests/ehr/node_modules demo-output .redis-test
