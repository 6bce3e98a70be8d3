"""Settings Megatron-LM's loop cannot run on a machine without a GPU, refused in one line each.

Megatron-LM's defaults are GPU defaults: on a CPU they end, after start-up and on every rank, in a raw
traceback (NCCL without GPUs, TransformerEngine's spec, a fused CUDA kernel). Each was found by running
pretrain_gpt_let.py on Megatron-LM 0.19 on CPU (torchrun, gloo); the lean trainer (megatron_let/training)
checks its own subset in its argument validation. Checked on Megatron-LM's raw ``parse_args`` namespace,
before ``validate_args``: names and defaults are the parser's.
"""

from __future__ import annotations

from megatron_let import megatron_versions
from megatron_let.errors import LETConfigError


def _on(value) -> bool:
    return value not in (None, False, 0, "none")


def _half(args) -> bool:
    return bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))


# (namespace attribute, "this value fails without a GPU", what the user asked for, the fix). Attributes this
# Megatron-LM's parser lacks are skipped. The settings on by default come first, in the order a run meets them.
_GPU_ONLY = (
    ("distributed_backend", lambda v, a: v == "nccl", "--distributed-backend nccl (Megatron-LM's default) needs GPUs",
     "add --distributed-backend gloo"),
    ("transformer_impl", lambda v, a: v == "transformer_engine",
     "--transformer-impl transformer_engine (Megatron-LM's default) needs TransformerEngine on a GPU",
     "add --transformer-impl local"),
    ("no_persist_layer_norm", lambda v, a: v is False,
     "the persistent LayerNorm kernel (on by default) is TransformerEngine's", "add --no-persist-layer-norm"),
    ("gradient_accumulation_fusion", lambda v, a: v is True,
     "gradient-accumulation fusion (on by default) needs APEX's CUDA extension",
     "add --no-gradient-accumulation-fusion"),
    ("masked_softmax_fusion", lambda v, a: v is True and _half(a),
     "--bf16/--fp16 with masked-softmax fusion (on by default) need its CUDA kernel",
     "add --no-masked-softmax-fusion"),
    ("apply_rope_fusion", lambda v, a: v is True and getattr(a, "position_embedding_type", None) in ("rope", "mrope"),
     "--position-embedding-type rope with RoPE fusion (on by default) needs TransformerEngine", "add --no-rope-fusion"),
    ("fp16", lambda v, a: v is True, "--fp16 needs a GPU (its loss scaler lives in CUDA memory)",
     "use --bf16, or fp32 (neither flag)"),
    # fp8/fp4 run, but as a no-op: the local layers compute in fp32/bf16, which a CPU run would silently report
    ("fp8", lambda v, a: _on(v), "--fp8-format needs TransformerEngine on a GPU (the local layers would silently "
     "compute without it)", "drop --fp8-format"),
    ("fp4", lambda v, a: _on(v), "--fp4-format needs TransformerEngine on a GPU (the local layers would silently "
     "compute without it)", "drop --fp4-format"),
    ("use_flash_attn", lambda v, a: v is True, "--use-flash-attn needs flash-attn on a GPU",
     "drop --use-flash-attn"),
    ("moe_grouped_gemm", lambda v, a: v is True, "--moe-grouped-gemm needs CUDA grouped-GEMM kernels",
     "drop --moe-grouped-gemm"),
    ("use_precision_aware_optimizer", lambda v, a: v is True,
     "--use-precision-aware-optimizer needs TransformerEngine's FusedAdam", "drop --use-precision-aware-optimizer"),
    ("layernorm_zero_centered_gamma", lambda v, a: v is True,
     "--apply-layernorm-1p needs TransformerEngine's LayerNorm (torch's has no zero-centred gamma)",
     "drop --apply-layernorm-1p"),
)


def _eval_interval_missing(args) -> bool:
    """Megatron-LM 0.19 has no default --eval-interval: an iteration-based run without one stops after start-up
    with ``int // NoneType`` (on any machine)."""
    return getattr(args, "eval_interval", 0) is None and not getattr(args, "skip_train", False) \
        and not getattr(args, "full_validation", False)


def check_cpu_settings(args) -> None:
    """Refuse, before any process group, the settings Megatron-LM's loop cannot run without CUDA (and a missing
    --eval-interval where it has no default): one line naming every such flag with its fix, so that one
    corrected launch runs."""
    import torch

    problems = []
    if not torch.cuda.is_available():
        problems = [f"{what}: {fix}" for attribute, fails, what, fix in _GPU_ONLY
                    if hasattr(args, attribute) and fails(getattr(args, attribute), args)]
        if not getattr(args, "use_cpu_initialization", False) and megatron_versions.cpu_initialization_needed():
            problems.append("without --use-cpu-initialization this Megatron-LM moves the model to the GPU: "
                            "add --use-cpu-initialization")
    if problems:
        problems[0] = f"this machine has no GPU (torch.cuda.is_available() is False) and {problems[0]}"
    if _eval_interval_missing(args):
        problems.append("--eval-interval is not set and this Megatron-LM has no default for it (its dataset sizing "
                        "divides by it): add --eval-interval N (e.g. 1000; --eval-iters 0 for no evaluation)")
    if problems:
        raise LETConfigError("; ".join(problems) + ".")
