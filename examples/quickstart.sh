#!/usr/bin/env bash
# LET quickstart on a CPU machine, from a clean clone:
#
#     bash examples/quickstart.sh [options of examples/quickstart.py, e.g. --target-iters 400]
#
# 1. creates (or reuses) the virtual environment .venv in the repository,
# 2. installs torch==2.13.0 first (pinned, so nothing later picks another build: on Python 3.11 that
#    is the CPU wheel; for 3.12 the index offers only the CUDA build, ~4.8 GB, which runs on CPU),
#    then megatron-let with its test extras (the
#    quickstart's matplotlib/tensorboard plus pytest & co., so README command 2 runs right after),
#    naming every package as pip collects it,
# 3. runs examples/quickstart.py: corpus -> teacher -> baseline and LET runs -> results and plot
#    in runs/quickstart/ (finished stages are reused on a re-run).
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

# pip's own lines, cut to one per package, so a 2-minute install shows what it is doing
pip_progress() { grep --line-buffered -E '^(Collecting|Processing|Installing collected|Successfully installed|ERROR)' | \
    sed -u -e 's/^/[quickstart.sh]   /' -e 's/\(.\{150\}\).*/\1 .../' || true; }

if python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
    echo "[quickstart.sh] $(python -c 'import torch; print("torch", torch.__version__)') already installed"
else
    echo "[quickstart.sh] installing $TORCH_SPEC (before anything else; on Python 3.12 the CUDA build, ~4.8 GB, which runs on CPU)"
    python -m pip install -q --upgrade pip
    python -m pip install "$TORCH_SPEC" 2>&1 | pip_progress
fi
echo "[quickstart.sh] installing megatron-let[test] (editable): megatron-core, transformers, matplotlib, tensorboard, pytest, ..."
python -m pip install -e ".[test]" 2>&1 | pip_progress
python -c "import megatron_let, megatron.core, pytest" || { echo "[quickstart.sh] installation failed; rerun with pip's full output: .venv/bin/pip install -e '.[test]'"; exit 1; }

echo "[quickstart.sh] python examples/quickstart.py $*"
exec python examples/quickstart.py "$@"
