"""Build megatron-core GPTModel chunks (one per virtual pipeline stage) with LET attached."""

from typing import List, Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_let.controller import LateToEarlyTraining


def layer_spec(config: TransformerConfig, transformer_impl: str = "transformer_engine"):
    """TransformerEngine layers when asked for and importable (GPU), megatron-core's local ones otherwise."""
    local = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization=config.normalization)
    if transformer_impl == "local":
        return get_gpt_layer_local_spec(**local)
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        import transformer_engine  # noqa: F401
    except ImportError:
        return get_gpt_layer_local_spec(**local)
    return get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts)


def build_gpt_chunks(config: TransformerConfig, vocab_size: int, seq_length: int,
                     let: Optional[LateToEarlyTraining] = None,
                     position_embedding_type: str = "rope",
                     share_embeddings_and_output_weights: bool = False,
                     spec=None) -> List[GPTModel]:
    """One GPTModel per local virtual stage, LET attached to the chunk owning layer k."""
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    spec = spec or layer_spec(config)
    chunks = []
    for vp_stage in range(vp_size):
        vp = vp_stage if vp_size > 1 else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            vp_stage=vp,
        )
        if let is not None:
            let.attach(model)
        chunks.append(model)
    return chunks
