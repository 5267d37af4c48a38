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

GENERATOR  ?= generators/tiny-mnist-open

.PHONY: setup demo test lint clean help

help:
	@echo "make demo   set up .venv; CE -> generator -> teacher -> outliers -> OAL -> CE vs OAL report (mnist-open)"
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
	$(MAKE) --no-print-directory $(GENERATOR)
	$(LAUNCH) trainer/train_oal.py --config configs/train/teacher.yaml --resume
	$(BIN)/python -m synth generate --config configs/synth/mnist_open.yaml --out outliers/mnist-open
	$(LAUNCH) trainer/train_oal.py --config configs/train/oal.yaml --resume
	$(BIN)/python -m trainer.compare runs/ce runs/oal --scores energy,msp --out runs/ce_vs_oal.md
	@echo
	@echo "generator:  $(GENERATOR)  (card: oodforge_generator.json, fidelity inside)"
	@echo "teacher:    runs/teacher/detector"
	@echo "outliers:   outliers/mnist-open  (preview.png, card.json, metadata.jsonl, latents.safetensors)"
	@echo "CE run:     runs/ce   (report.md, detector/)"
	@echo "OAL run:    runs/oal  (report.md, detector/)   <- the exported OAL detector"
	@echo "CE vs OAL:  runs/ce_vs_oal.md"

# the embedded generator, fitted on CPU (~13 min; fidelity judged by runs/ce); skipped once it exists,
# and a killed fit resumes from its finished VAE stage
$(GENERATOR):
	$(BIN)/python -m synth fit-generator --config configs/synth/tiny_mnist_open.yaml --out $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check oodforge synth trainer api tests bench

clean:
	rm -rf runs generators outliers eval.json .pytest_cache
