# Two commands from a fresh clone:  `make demo`  and  `make test`  (only Python needed).
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.oodforge-installed
LAUNCH     ?= $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean help

help:
	@echo "make demo   set up .venv, train the CE baseline on mnist-open, evaluate 6 scores, export a detector"
	@echo "make test   set up .venv and run the test suite"
	@echo "make lint   ruff check"

setup: $(STAMP)

# torch first (TORCH_SPEC) so the project's `torch` requirement is already met and no CUDA build is pulled
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(LAUNCH) trainer/train_oal.py --config configs/train/ce.yaml --resume

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check oodforge synth trainer api tests bench

clean:
	rm -rf runs eval.json .pytest_cache
