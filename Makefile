# Two commands from a fresh clone:  `make demo`  and  `make test`  (only Python needed).
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# The install steps live in docker/install.sh, shared with docker/Dockerfile and docker/Dockerfile.cuda.

PYTHON     ?= python3
VENV       ?= .venv
# empty = the default torch pin in docker/install.sh
TORCH_SPEC ?=
EXTRAS     ?= dev
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.oodforge-installed
LAUNCH     ?= $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
PYTEST_ARGS ?=
# accelerate launch pins OMP_NUM_THREADS=1 when it is unset; the dense target gives torch every core
NPROC      := $(shell nproc 2>/dev/null || echo 2)

GENERATOR  ?= generators/tiny-mnist-open

HOST         ?= 127.0.0.1
PORT         ?= 8000
SERVE_CONFIG ?= configs/serve/demo.yaml

.PHONY: setup demo dense test lint serve clean help

help:
	@echo "make demo   set up .venv; CE -> generator -> teacher -> outliers -> OAL -> CE vs OAL report (mnist-open)"
	@echo "make dense  set up .venv; train + evaluate + export a dense (per-pixel) detector on mnist-scenes with flow negatives"
	@echo "make test   set up .venv and run the test suite"
	@echo "make lint   ruff check"
	@echo "make serve  serve detectors over HTTP (uvicorn api.app:app) on $(HOST):$(PORT) with $(SERVE_CONFIG)"

setup: $(STAMP)

# docker/install.sh: venv, pip, torch first (TORCH_SPEC) so the project's `torch` requirement is
# already met and no CUDA build is pulled, then the project (editable, with EXTRAS)
$(STAMP): pyproject.toml docker/install.sh
	TORCH_SPEC='$(TORCH_SPEC)' EXTRAS='$(EXTRAS)' EDITABLE=1 PYTHON='$(PYTHON)' sh docker/install.sh $(VENV)
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

# dense OOD (issue 6): segmenter + jointly trained flow negatives on mnist-scenes (~4 min on 2 cores)
dense: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(NPROC)} $(LAUNCH) trainer/train_dense.py --config configs/train/dense_flow.yaml --resume
	@echo "dense run:  runs/dense_flow   (report.md, plots/maps.png, detector/ <- serve with make serve)"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

serve: setup
	OODFORGE_SERVE_CONFIG=$(SERVE_CONFIG) $(BIN)/uvicorn api.app:app --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check oodforge synth trainer api tests bench

clean:
	rm -rf runs generators outliers eval.json .pytest_cache
