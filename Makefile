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

.PHONY: install node redis browser demo test lint typecheck dockerlint unit train-default train-default-cpu bench bench-notify clean

# One line per step; pip's own output (warnings included) goes to $(PIP_LOG), shown only when pip fails.
PIP_LOG := $(VENV)/pip-install.log
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
LOGGED = >>$(PIP_LOG) 2>&1 || { echo "pip failed; the end of $(PIP_LOG):" >&2; tail -n 40 $(PIP_LOG) >&2; exit 1; }

$(BIN)/.installed: pyproject.toml
	@# An install cut short while the venv was made leaves one without pip: it is made again, not used.
	@if ! { test -x $(BIN)/python && $(BIN)/python -m pip --version >/dev/null 2>&1; }; then \
		if test -f $(VENV)/pyvenv.cfg; then echo "recreating $(VENV) (it has no working pip: an install cut short?)"; \
		elif test -e $(VENV); then echo "$(VENV) exists and is not a virtual environment: move it away" >&2; exit 1; \
		else echo "creating $(VENV)"; fi; \
		$(PYTHON) -m venv --clear $(VENV); fi
	@echo "upgrading pip"; : > $(PIP_LOG); $(PIP) --upgrade pip $(LOGGED)
	@echo "installing PyTorch ($(TORCH_SPEC))"; $(PIP) $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" $(LOGGED)
	@echo "installing the adapter and its development tools"; $(PIP) -e '.[dev]' $(LOGGED)
	@touch $@

install: $(BIN)/.installed

tests/ehr/node_modules/.package-lock.json: tests/ehr/package-lock.json $(BIN)/.installed
	@echo "installing the test FHIR server (npm ci)"; cd tests/ehr && npm ci --no-audit --no-fund --loglevel=error

node: tests/ehr/node_modules/.package-lock.json

redis: install
	@bash tests/ensure-redis.sh "$(TEST_REDIS_URL)"

# The review pages' browser tests (marker `browser`): Debian's chromium, driven by Playwright (a dev dependency).
browser: install
	@bash tests/ensure-chromium.sh

demo: install
	@echo "running the demo"; HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/fhir-ner demo --output demo-output

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy adapter core mappings

dockerlint: install
	$(BIN)/hadolint docker/Dockerfile.api docker/Dockerfile.worker

unit: install node redis browser
	$(BIN)/pytest -q --durations=15 $(PYTEST_ARGS)

test: lint typecheck dockerlint unit

# The shipped recipe (worker/models/default/MODEL_CARD.md), three stages, all training layers 6-11 + head on
# cached layers 0-5. Stage 1, Spanish corpora only (the previous default, es-e5small-20261126-3a324d4): on a GPU
# (bf16) about 2 minutes, on this 2-core CPU an estimated 4 hours. Stages 2 and 3 warm-start from the stage
# before and train one epoch each on the translated data (worker/nlp/data/translated), sentence-start crops and
# a share of the Spanish windows (~15-20 minutes each on 2 busy CPU cores, after ~30 minutes of layer cache that
# they share); stage 4 (multi3) trains all twelve layers three epochs, stage 5 (genres) one more epoch with the
# genre passages (~14 minutes on a 2-core AVX2 CPU), stage 6 (brief, session 23) two more epochs at half the learning
# rate with the one-line `brief` notes in seven languages added and every genre passage twice an epoch (~2 x 6
# minutes on a 2-core AMX CPU); the span thresholds are then calibrated (Spanish's own, one for the other
# languages). Reruns resume from $(TRAIN_WORK).
TRAIN_WORK ?= /tmp/fhir-ner-train-default
MULTI_MIX = spaccc-train=0.08,cardioccc-train=0.08,crops=0.6,en-train=0.4,it-train=0.4,nl-train=0.4,ro-train=0.4,sv-train=0.4,cs-train=0.4
# The last stage (sessions 15-16): two epochs more on the same mix with the translated excerpts of train2 and the genre
# passages (worker/nlp/data/genres: leaflets, drug labels, textbooks, health pages, abstracts, clinical notes; each whole).
GENRES_MIX = $(MULTI_MIX),en-train2=0.4,it-train2=0.4,nl-train2=0.4,ro-train2=0.4,sv-train2=0.4,cs-train2=0.4
# The brief stage (session 23): every genre passage, the one-line `brief` notes included, twice an epoch.
BRIEF_MIX = $(GENRES_MIX),es-genres-train=2,en-genres-train=2,it-genres-train=2,nl-genres-train=2,ro-genres-train=2,sv-genres-train=2,cs-genres-train=2
TRANSLATED_ARGS = --frozen-layers 6 --batch-tokens 4096 --epochs 1 --translated --crops 1 --cache $(TRAIN_WORK)/cache --no-calibrate
# Last, the linker's thresholds: chosen on the shipped tagger's own mentions too (session 17), they follow the new tagger.
train-default: install
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage layers6 --frozen-layers 6 --encoder-lr 2e-4 --head-lr 2e-3 \
		--batch-tokens 4096 --patience 3 --epochs 12 --no-export
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage multi1 $(TRANSLATED_ARGS) --no-export \
		--init-from $(TRAIN_WORK)/layers6/best --encoder-lr 1e-4 --head-lr 1e-3 \
		--mix spaccc-train=0.04,cardioccc-train=0.04,crops=0.4
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage multi2 $(TRANSLATED_ARGS) --no-export \
		--init-from $(TRAIN_WORK)/multi1/best --encoder-lr 5e-5 --head-lr 5e-4 --mix $(MULTI_MIX)
	$(BIN)/python benchmarks/eval_languages.py --checkpoint $(TRAIN_WORK)/multi2/best --window-lead "Paciente." --only val
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage multi3 --frozen-layers 0 --frozen-embeddings \
		--batch-tokens 4096 --epochs 3 --patience 3 --translated --crops 1 --no-calibrate \
		--init-from $(TRAIN_WORK)/multi2/best --encoder-lr 5e-5 --head-lr 5e-4 --mix $(MULTI_MIX) --no-export
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage genres --frozen-layers 0 --frozen-embeddings \
		--batch-tokens 4096 --epochs 2 --patience 3 --translated --translated-splits train,train2 --genres --crops 1 \
		--genre-kinds leaflet,label,textbook,health,abstract,case --no-export \
		--no-calibrate --init-from $(TRAIN_WORK)/multi3/best --encoder-lr 2e-5 --head-lr 2e-4 --mix $(GENRES_MIX)
	$(BIN)/python benchmarks/train_default.py --work $(TRAIN_WORK) --stage brief --frozen-layers 0 --frozen-embeddings \
		--batch-tokens 4096 --epochs 2 --patience 3 --translated --translated-splits train,train2 --genres --crops 1 \
		--no-calibrate --init-from $(TRAIN_WORK)/genres/best --encoder-lr 1e-5 --head-lr 1e-4 --mix $(BRIEF_MIX)
	$(BIN)/python benchmarks/eval_languages.py --checkpoint worker/models/default --calibrate
	$(BIN)/python benchmarks/calibrate_linker.py --write
	$(BIN)/python benchmarks/calibrate_linker.py --queries full --write

# The earlier CPU-only recipe (two stages, ~2.5 hours on 2 cores): layers 10-11 + head on cached layers 0-9, then
# a warm start from it training layers 8-11 + head on cached layers 0-7.
train-default-cpu: install
	$(BIN)/python benchmarks/train_default.py --threads 2 --work $(TRAIN_WORK) --epochs 5 --no-export
	$(BIN)/python benchmarks/train_default.py --threads 2 --work $(TRAIN_WORK) --stage warm8 --frozen-layers 8 \
		--epochs 5 --init-from $(TRAIN_WORK)/run/best --encoder-lr 2e-4 --head-lr 1e-3

# The short acknowledgement benchmark (README, "Acknowledgement benchmark"): one API process, 200 notifications/s
# for 10 s. It fails on any request error, or when an accepted note left no task message (or two) on its queue.
BENCH_NOTIFY_ARGS ?= --rate 200 --duration 10 --workers 1
bench-notify: install redis
	$(BIN)/python benchmarks/bench_notify.py $(BENCH_NOTIFY_ARGS)

clean:
	rm -rf $(VENV) tests/ehr/node_modules demo-output .redis-test
