"""Is the teacher a causal decoder? LET aligns the target's causal layer k at position t to the
teacher's state at t; an encoder's state at t has already seen the tokens after t, which layer k
never sees, so the target is asked to match information it cannot have. Decided from the config
alone (before any process group), with transformers' own model-type tables."""

from __future__ import annotations

from typing import Optional


def bidirectional_reason(config) -> Optional[str]:
    """What makes this teacher non-causal ("architecture BertModel, is_decoder False: ..."), or None
    for a causal decoder. Model types that transformers builds both ways (BERT, RoBERTa, ...) are
    causal only with ``is_decoder`` (or XLM's ``causal``) set."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    decoder = bool(getattr(config, "is_decoder", False))
    found = f"architecture {_architecture(config)}, model_type {model_type}, is_decoder {decoder}"
    if getattr(config, "is_encoder_decoder", False):
        return f"{found}: an encoder-decoder, whose encoder attends both ways"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"{found}: transformers knows no causal LM of this type (bidirectional attention)"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not (decoder or getattr(config, "causal", False)):
        return f"{found}: bidirectional attention (this type is causal only with is_decoder true)"
    return None


def _architecture(config) -> str:
    names = getattr(config, "architectures", None) or []
    return "/".join(names) if names else "unknown"
