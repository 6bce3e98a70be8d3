"""The GPT training functions of Megatron-LM's ``pretrain_gpt.py``, for a megatron-core wheel without
the script.

From 0.17 on, the megatron-core wheel ships ``megatron.training`` (``pretrain()``, the arguments, the
checkpointing, the config container) but not the scripts at the root of Megatron-LM. A user who has only
``pip install megatron-core`` still gets Megatron-LM's own loop through this module: it provides the
names ``pretrain_gpt.py`` defines and :mod:`megatron_let.integrations.megatron_lm` wraps
(``get_batch``, ``forward_step``, ``train_valid_test_datasets_provider``, ``get_embedding_ranks`` and
the batch predicate ``mtp_on_this_rank_func``), written against the 0.19 wheel's public API.

It covers GPT pretraining on ``--mock-data`` or ``--data-path`` / ``--*-data-path`` indexed datasets,
with TP/SP/PP/VPP/DP/EP and multi-token prediction. What only the full script does (``--sft``,
``--fim-data``, packed sequences, cached-logits KD, ModelOpt) is refused by :func:`check_supported`
with the way out: a Megatron-LM checkout in ``MEGATRON_LM_PATH``, whose own script is then used.
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.parallel_state import get_context_parallel_group
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.transformer.multi_token_prediction import get_mtp_ranks
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank as mtp_on_this_rank_func
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, print_rank_0
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from megatron_let.errors import LETConfigError

# the fields get_batch returns, in this order (the order 0.19's pretrain_gpt.py returns them in)
BATCH_KEYS = ["attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels",
              "local_cp_size", "loss_mask", "max_seqlen", "position_ids", "tokens"]

has_nvidia_modelopt = False  # ModelOpt's flags and model config are the full script's

# flags whose code paths live only in Megatron-LM's pretrain_gpt.py (flag -> the args attribute)
_SCRIPT_ONLY_FLAGS = {"--sft": "sft", "--fim-data": "fim_data",
                      "--dataloader-inter-document-masking": "dataloader_inter_document_masking",
                      "--hybrid-context-parallel": "hybrid_context_parallel",
                      "--logits-load-dir": "logits_load_dir", "--logits-save-dir": "logits_save_dir"}


def check_supported(args) -> None:
    """One line for a flag only Megatron-LM's own pretrain_gpt.py implements."""
    for flag, name in _SCRIPT_ONLY_FLAGS.items():
        if getattr(args, name, None):
            raise LETConfigError(
                f"{flag} needs Megatron-LM's pretrain_gpt.py, which the megatron-core wheel does not ship: "
                f"set MEGATRON_LM_PATH to a Megatron-LM checkout of the same version (its script is then used), "
                f"or drop {flag}.")


def _mtp_on_this_rank(vp_stage: Optional[int]) -> bool:
    config = core_transformer_config_from_args(get_args())
    return mtp_on_this_rank_func(layout=config.pipeline_model_parallel_layout, mtp_num_layers=config.mtp_num_layers,
                                 ignore_virtual=False, vp_stage=vp_stage)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator, vp_stage: Optional[int] = None) -> List[Optional[torch.Tensor]]:
    """This rank's micro-batch in ``BATCH_KEYS`` order; all None on a stage that needs no batch."""
    args = get_args()
    needs_batch = _mtp_on_this_rank(vp_stage)
    if not is_first_or_last_pipeline_stage(vp_stage) and not needs_batch:
        return [None] * len(BATCH_KEYS)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        batch = {key: batch[key].to(_device(), non_blocking=True) if batch.get(key) is not None else None
                 for key in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=needs_batch, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=get_context_parallel_group())
    return [batch.get(key) for key in BATCH_KEYS]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """Sum of the masked per-token losses, the token count, and the ``lm loss`` report."""
    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    if args.check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                    message=f"found {what} in local forward loss calculation")
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch through the model; the loss function for the schedule."""
    if return_schedule_plan:
        raise LETConfigError("--overlap-moe-expert-parallel-comm needs Megatron-LM's pretrain_gpt.py: set "
                             "MEGATRON_LM_PATH to a Megatron-LM checkout.")
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    fields = dict(zip(BATCH_KEYS, get_batch(data_iterator, vp_stage)))
    output = model(fields["tokens"], fields["position_ids"], fields["attention_mask"], labels=fields["labels"],
                   loss_mask=fields["loss_mask"])
    return output, partial(loss_func, fields["loss_mask"], model=model)


def _dataset_config(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        context_parallel_size=args.context_parallel_size, data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel)


def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    """TP rank 0 of the stages that read batches."""
    if mpu.get_tensor_model_parallel_rank() != 0:
        return False
    return is_first_or_last_pipeline_stage(vp_stage) or _mtp_on_this_rank(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """Mock or indexed GPT datasets, built on the ranks that read batches."""
    args = get_args()
    check_supported(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                             partial(is_dataset_built_on_rank, vp_stage=vp_stage),
                                             _dataset_config(args)).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


def get_embedding_ranks(pp_ranks: List[int]) -> List[int]:
    """First stage; last stage with tied embeddings; the MTP stages."""
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1:
        args = get_args()
        if not args.untie_embeddings_and_output_weights:
            ranks.append(pp_ranks[-1])
        ranks.extend(get_mtp_ranks(pp_ranks, core_transformer_config_from_args(args)))
    return sorted(set(ranks))
