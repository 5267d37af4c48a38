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
DEMO       ?= runs
ASSETS     := oodforge/assets

HOST         ?= 127.0.0.1
PORT         ?= 8000
SERVE_CONFIG ?= configs/serve/demo.yaml

.PHONY: setup demo dense test browser lint serve publish clean help

help:
	@echo "make demo   set up .venv; python -m trainer.pipeline on mnist-open: CE -> generator -> teacher -> outliers -> OAL -> report ($(DEMO))"
	@echo "make dense  set up .venv; train + evaluate + export a dense (per-pixel) detector on mnist-scenes with flow negatives"
	@echo "make test   set up .venv, install the headless browser if missing (make browser) and run the test suite"
	@echo "make lint   ruff check"
	@echo "make serve  serve detectors over HTTP (python -m api: uvicorn, workers from the settings) on $(HOST):$(PORT) with $(SERVE_CONFIG)"

setup: $(STAMP)

# docker/install.sh: venv, pip, torch first (TORCH_SPEC) so the project's `torch` requirement is
# already met and no CUDA build is pulled, then the project (editable, with EXTRAS)
$(STAMP): pyproject.toml docker/install.sh
	TORCH_SPEC='$(TORCH_SPEC)' EXTRAS='$(EXTRAS)' EDITABLE=1 PYTHON='$(PYTHON)' sh docker/install.sh $(VENV)
	touch $@

demo: setup
	$(BIN)/python -m trainer.pipeline --benchmark mnist-open --out $(DEMO)
	@echo
	@echo "generator:  $(DEMO)/generator   (the published one: $(ASSETS)/generators/tiny-mnist-open; make publish refits it)"
	@echo "teacher:    $(DEMO)/teacher/detector"
	@echo "outliers:   $(DEMO)/outliers  (preview.png, card.json, metadata.jsonl, latents.safetensors)"
	@echo "CE run:     $(DEMO)/ce   (report.md, detector/)"
	@echo "OAL run:    $(DEMO)/oal  (report.md, detector/)   <- the exported OAL detector: make serve"
	@echo "report:     $(DEMO)/report.md   (CE vs OAL per OOD set)"

# the embedded generator, fitted on CPU (~14 min; fidelity judged by the demo's CE run); skipped once it
# exists, and a killed fit resumes from its last checkpoint
$(GENERATOR): | setup
	$(BIN)/python -m synth fit-generator --config configs/synth/tiny_mnist_open.yaml --out $@ \
		--set fidelity.classifier=$(DEMO)/ce/detector

# publish what the demo uses and serves: the fitted generator (so `make demo` need not fit it) and the
# demo's CE and OAL detectors (the reference detectors the tests score noise and photos with)
publish: $(GENERATOR)
	test -f $(DEMO)/oal/detector/detector.json || $(MAKE) --no-print-directory demo
	rm -rf $(ASSETS)/generators/tiny-mnist-open $(ASSETS)/detectors/mnist-open
	mkdir -p $(ASSETS)/generators $(ASSETS)/detectors/mnist-open
	cp -r $(GENERATOR) $(ASSETS)/generators/tiny-mnist-open && rm -f $(ASSETS)/generators/tiny-mnist-open/fit_log.jsonl
	cp -r $(DEMO)/ce/detector $(ASSETS)/detectors/mnist-open/ce
	cp -r $(DEMO)/oal/detector $(ASSETS)/detectors/mnist-open/oal
	@echo "published into $(ASSETS): commit it to ship it"

# dense OOD (issue 6): segmenter + jointly trained flow negatives on mnist-scenes (~4 min on 2 cores)
dense: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(NPROC)} $(LAUNCH) trainer/train_dense.py --config configs/train/dense_flow.yaml --resume
	@echo "dense run:  runs/dense_flow   (report.md, plots/maps.png, detector/ <- serve with make serve)"

# the ray extra for tests/test_ray_serve.py (which skips without it): measured 2026-12-04, 20 s and an
# 80 MB wheel, +325 MB in the venv; kept out of `make setup` so that `make demo` does not need it
RAY_STAMP := $(VENV)/.oodforge-ray-installed
$(RAY_STAMP): $(STAMP)
	TORCH_SPEC='$(TORCH_SPEC)' EXTRAS='$(EXTRAS),ray' EDITABLE=1 PYTHON='$(PYTHON)' sh docker/install.sh $(VENV)
	touch $@

test: setup browser $(RAY_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the headless browser that tests/test_ui_browser.py drives (Debian's chromium and its chromedriver):
# installed when missing and this runs as root with apt-get; it never fails the run (without a browser
# that test is skipped and says why)
BROWSER_PACKAGES ?= chromium chromium-driver
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES)
browser:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PACKAGES) for the /ui browser test (apt-get)"; \
		{ $(APT_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) >/dev/null 2>&1; }; } \
			|| echo "could not install $(BROWSER_PACKAGES): tests/test_ui_browser.py will be skipped"; \
	else \
		echo "no chromium + chromedriver, and no root apt-get to install them: tests/test_ui_browser.py will be skipped"; \
	fi

serve: setup
	OODFORGE_SERVE_CONFIG=$(SERVE_CONFIG) $(BIN)/python -m api --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check oodforge synth trainer api tests bench
	$(BIN)/python tests/import_graph.py

clean:
	rm -rf runs generators outliers eval.json .pytest_cache

# real-architecture rehearsal on CPU (~7 min on 2 cores, so not part of `make test`): random-weight
# SD-1.5 UNet/VAE/CLIP-L text encoder + 49,408-token CLIP tokenizer and a ResNet-18, saved as Hub snapshots,
# through every stage's own command on CIFAR-format random images at 64x64 (bench/real_scale_rehearsal.py).
# CLIP's BPE merges file is read from the open_clip_torch wheel, downloaded here (not installed); without
# it a synthetic vocabulary of the same size stands in. The run itself needs no network.
CLIP_WHEELS ?= $(HOME)/.cache/oodforge/wheels
.PHONY: rehearsal
rehearsal: setup
	@ls $(CLIP_WHEELS)/open_clip_torch-*.whl >/dev/null 2>&1 || $(BIN)/pip download --no-deps --quiet --dest $(CLIP_WHEELS) open_clip_torch==3.3.0 || echo "no open_clip_torch wheel; a synthetic 49,408-token vocabulary stands in"
	$(BIN)/python bench/real_scale_rehearsal.py --clip-bpe $(CLIP_WHEELS)
