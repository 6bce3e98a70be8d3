#!/usr/bin/env bash
# LET quickstart on a CPU machine, from a clean clone:
#
#     bash examples/quickstart.sh [options of examples/quickstart.py, e.g. --target-iters 400]
#
# 1. creates (or reuses) the virtual environment .venv in the repository,
# 2. installs torch==2.13.0 first (the CPU wheel where one is offered locally: any other torch
#    install can pull several GB of CUDA libraries), then megatron-let with its quickstart extras,
# 3. runs examples/quickstart.py: corpus -> teacher -> baseline and LET runs -> results and plot
#    in runs/quickstart/ (a few minutes on 2 cores; finished stages are reused on a re-run).
#
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0),
# MEGATRON_LET_CACHE (a directory for the corpus downloads, shared between runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    echo "[quickstart.sh] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

if python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
    echo "[quickstart.sh] $(python -c 'import torch; print("torch", torch.__version__)') already installed"
else
    echo "[quickstart.sh] installing $TORCH_SPEC (before anything else, so pip never picks a CUDA build)"
    python -m pip install -q --upgrade pip
    python -m pip install -q "$TORCH_SPEC"
fi
echo "[quickstart.sh] installing megatron-let[quickstart] (editable)"
python -m pip install -q -e ".[quickstart]"

echo "[quickstart.sh] python examples/quickstart.py $*"
exec python examples/quickstart.py "$@"
