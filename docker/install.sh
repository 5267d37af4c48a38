#!/bin/sh
# Installs oodforge into a virtual environment: the one place the install steps live.
# Called by `make setup` (editable, EXTRAS=dev, into .venv) and by docker/Dockerfile and
# docker/Dockerfile.cuda (non-editable, into /opt/venv). Tested by tests/test_install_script.py.
#
# Usage: docker/install.sh VENV_DIR          (works from any directory)
#   PYTHON      interpreter that creates the venv when VENV_DIR/bin/python is missing
#               (default python3; 3.10 or newer)
#   TORCH_SPEC  pip arguments for torch, installed before the project so that its `torch` requirement
#               is already met and pip never pulls a CUDA build by accident (default torch==2.13.0;
#               GPU: "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
#   EXTRAS      comma-separated extras of the project, e.g. dev or gpu (default: none)
#   EDITABLE    1 = pip install -e, 0 = a regular install (default 0)
set -eu
set -f # TORCH_SPEC is word-split on purpose below; never glob-expand it

die() {
    echo "docker/install.sh: $*" >&2
    exit 1
}

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: docker/install.sh VENV_DIR   (env: PYTHON, TORCH_SPEC, EXTRAS, EDITABLE)" >&2
    exit 2
fi
venv=$1
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-}
EDITABLE=${EDITABLE:-0}
root=$(cd "$(dirname "$0")/.." && pwd)

case $EDITABLE in
    0 | 1) ;;
    *) die "EDITABLE must be 0 or 1, got '$EDITABLE'" ;;
esac

if [ ! -x "$venv/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "PYTHON='$PYTHON' was not found; install Python 3.10 or newer, or set PYTHON to its path"
    if ! version=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(sys.version_info < (3, 10))'); then
        die "PYTHON='$PYTHON' is Python ${version:-(unknown)}; oodforge needs 3.10 or newer (set PYTHON, e.g. PYTHON=python3.11)"
    fi
    echo "docker/install.sh: creating $venv with $PYTHON ($version)" >&2
    "$PYTHON" -m venv "$venv"
fi
py=$venv/bin/python

echo "docker/install.sh: upgrading pip" >&2
"$py" -m pip install --quiet --upgrade pip

echo "docker/install.sh: installing $TORCH_SPEC" >&2
# shellcheck disable=SC2086 # word-split on purpose: TORCH_SPEC may carry `--index-url URL`
"$py" -m pip install --quiet $TORCH_SPEC

target=$root
if [ -n "$EXTRAS" ]; then
    target="$root[$EXTRAS]"
fi
echo "docker/install.sh: installing $target (editable=$EDITABLE)" >&2
if [ "$EDITABLE" = 1 ]; then
    "$py" -m pip install --quiet -e "$target"
else
    "$py" -m pip install --quiet "$target"
fi
