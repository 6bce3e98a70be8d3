"""HybridModel (``--hybrid-layer-pattern``) under Megatron-LM's ``pretrain()``: the model-config side.

Megatron-LM 0.19's ``pretrain_hybrid.py`` builds a ``HybridModel`` from ``--hybrid-layer-pattern``
(``*`` attention, ``-`` dense MLP, ``E`` MoE, ``M`` Mamba-2, ``G`` gated delta net, ``D`` sparse
attention, ``|`` pipeline segment, ``/`` multi-token prediction). Its stock stack spec is built from
TransformerEngine modules only. This module adds what a run without TransformerEngine needs:

- :func:`local_hybrid_stack_spec`: a HybridStack spec of megatron-core's own modules for ``*``, ``-`` and
  ``E``, taken from megatron-core's GPT local layer spec (``get_gpt_layer_local_submodules``): the
  attention layer is a GPT layer's attention half, the MLP / MoE layer its MLP half, so a ``*-`` pattern
  computes what a local-spec GPTModel computes, and its checkpoints use the GPT local layer's keys (so
  megatron's GPT->Hybrid load-time translation reads a local GPT checkpoint into it). Symbols it has no local module for (``M``, ``G``, ``D``,
  ``+``) are refused, never built as identities;
- :func:`hybrid_model_config`: ``hybrid_config_from_args`` as ``pretrain_hybrid.py`` calls it, with this
  spec where ``--transformer-impl local`` is given without ``--spec`` (GPT's builder honours
  ``--transformer-impl local``; 0.19's hybrid builder would still pick the TransformerEngine spec), and a
  one-line refusal of a pattern the local spec cannot build.

The final norm of ``HybridStack`` is TransformerEngine's ``TENorm`` whatever the spec says; without CUDA
``megatron_let.compat.cpu`` substitutes megatron-core's torch norm for it.

Where LET takes layer k's output on a HybridModel is decided in one place,
:func:`megatron_let.loss.alignment.target_layer_of` (docs/hybrid.md).
"""

from __future__ import annotations

from typing import Optional

from megatron_let.errors import LETConfigError

# pattern symbols the local spec builds, and what the others are (for the refusal)
LOCAL_SYMBOLS = "*-E"
_NEEDS_TE = {"M": "Mamba-2", "G": "gated delta net", "D": "DeepSeek sparse attention", "+": "multi-latent attention"}
_PIPE, _MTP = "|", "/"


def check_local_pattern(pattern: Optional[str], reason: str) -> None:
    """One line for a pattern the local spec cannot build (``reason``: why the local spec is in use)."""
    if not pattern:
        raise LETConfigError("HybridModel needs --hybrid-layer-pattern (e.g. '*-*-*-*-' for four GPT blocks).")
    main, _, mtp = pattern.partition(_MTP)
    if mtp:
        raise LETConfigError(f"--hybrid-layer-pattern '{pattern}': multi-token prediction ('/...') is not in "
                             f"megatron_let's local hybrid spec ({reason}); drop the '/' part.")
    bad = sorted({s for s in main if s not in LOCAL_SYMBOLS + _PIPE})
    if bad:
        names = ", ".join(f"'{s}' ({_NEEDS_TE.get(s, 'unknown')})" for s in bad)
        raise LETConfigError(f"--hybrid-layer-pattern '{pattern}': {names} layers need TransformerEngine / GPU "
                             f"kernels, not available with megatron_let's local hybrid spec ({reason}); use only "
                             f"'*' (attention), '-' (MLP), 'E' (MoE) here, or run on a GPU with TransformerEngine.")


class _NoLocalModule:
    """Stands for a layer kind the local spec does not have: building one is refused (never an identity)."""

    def __init__(self, *args, **kwargs):
        raise LETConfigError("megatron_let's local hybrid spec builds only '*', '-' and 'E' layers; "
                             "fix --hybrid-layer-pattern or use the TransformerEngine spec.")


def local_hybrid_stack_spec(normalization: str = "LayerNorm", qk_layernorm: bool = False,
                            num_experts: Optional[int] = None, moe_grouped_gemm: bool = False):
    """A ``HybridStack`` spec of megatron-core modules only (no TransformerEngine) for ``*``, ``-``, ``E``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    dense = get_gpt_layer_local_submodules(normalization=normalization, qk_layernorm=qk_layernorm)
    # 'E' needs a MoE spec whatever the count: 8 stands for "some experts", as in megatron's own hybrid spec
    moe = get_gpt_layer_local_submodules(num_experts=num_experts or 8, moe_grouped_gemm=moe_grouped_gemm,
                                         normalization=normalization, qk_layernorm=qk_layernorm)
    # checkpoint keys as the GPT local layer writes them (its norms under the TE-fused names), each half its own
    def keys(submodules, prefix):
        return {k: v for k, v in submodules.sharded_state_dict_keys_map.items() if k.startswith(prefix)}

    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=dense.input_layernorm, self_attention=dense.self_attention,
        self_attn_bda=dense.self_attn_bda, sharded_state_dict_keys_map=keys(dense, "input_layernorm.")))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=dense.mlp, mlp_bda=dense.mlp_bda,
        sharded_state_dict_keys_map=keys(dense, "pre_mlp_layernorm.")))
    experts = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=moe.pre_mlp_layernorm, mlp=moe.mlp, mlp_bda=moe.mlp_bda,
        sharded_state_dict_keys_map=keys(moe, "pre_mlp_layernorm.")))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        attention_layer=attention, mlp_layer=mlp, moe_layer=experts,
        mamba_layer=_NoLocalModule, gdn_layer=_NoLocalModule, dsa_layer=_NoLocalModule, mla_layer=_NoLocalModule))


def hybrid_model_config(args):
    """The ``HybridModelConfig`` ``pretrain_hybrid.py`` builds from ``args``; with ``--transformer-impl local``
    and no ``--spec``, on :func:`local_hybrid_stack_spec`."""
    from megatron.training.argument_utils import hybrid_config_from_args

    config = hybrid_config_from_args(args)
    if getattr(args, "spec", None):  # the user's own spec
        return config
    if getattr(args, "transformer_impl", None) == "local":
        check_local_pattern(args.hybrid_layer_pattern, "--transformer-impl local")
        config.hybrid_stack_spec = local_hybrid_stack_spec(
            normalization=args.normalization, qk_layernorm=bool(args.qk_layernorm),
            num_experts=args.num_experts, moe_grouped_gemm=bool(args.moe_grouped_gemm))
    elif not _cuda():
        check_local_pattern(args.hybrid_layer_pattern, "no CUDA here")
        raise LETConfigError("HybridModel without CUDA needs --transformer-impl local (megatron_let's local hybrid "
                             "spec): the default spec is TransformerEngine's.")
    return config


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
