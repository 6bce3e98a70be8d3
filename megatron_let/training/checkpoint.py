"""Sharded checkpoints (megatron-core dist_checkpointing, Megatron-LM's directory layout).

``<save>/iter_0000100/`` holds model, optimizer and the trainer/LET state;
``<save>/latest_checkpointed_iteration.txt`` names the newest complete one.
A checkpoint is written under a temporary name and renamed only once every
rank has finished, and the tracker is replaced atomically after that, so a
crash mid-save never leaves something that loads as valid.
"""

import os
import shutil
from typing import List

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_let.checkpoint_files import SAVE_ERRORS, TRACKER, iteration_dir, write_failure
from megatron_let.errors import CheckpointWriteError

LET_KEY_FRAGMENT = "let_alignment."
# Optimizer state stored re-shardable across TP/PP/DP and distributed/plain optimizers.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state_dict(model: List, include_let: bool = True) -> dict:
    """Model chunks as one sharded dict ('model' or 'model0', 'model1', ... like Megatron-LM)."""
    state = {}
    for index, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{index}"
        sharded = _unwrap(chunk).sharded_state_dict()
        if not include_let:
            sharded = {k: v for k, v in sharded.items() if LET_KEY_FRAGMENT not in k}
        state[key] = sharded
    return state


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def save_checkpoint(root: str, iteration: int, model: List, optimizer, common: dict,
                    save_optimizer: bool = True, include_let: bool = True) -> str:
    """Write ``iter_N`` atomically and point the tracker at it."""
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = model_sharded_state_dict(model, include_let)
    state["has_optimizer"] = save_optimizer and optimizer is not None
    if state["has_optimizer"]:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state.update(common)
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        _barrier()
        dist_checkpointing.save(state, partial)
        _barrier()
        if rank == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = os.path.join(root, TRACKER + ".tmp")
            with open(tmp, "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(root, TRACKER))
    except SAVE_ERRORS as error:  # disk full, I/O error, a writer crash: the old checkpoint stands
        raise CheckpointWriteError(write_failure(root, iteration, error, partial)) from error
    _barrier()
    return final


def save_export(export_dir: str, iteration: int, model: List, common: dict) -> str:
    """--let-export-dir: the model without LET state or optimizer, through
    :func:`~megatron_let.checkpoint_files.write_export`; a failed write removes its partial files."""
    from megatron_let.checkpoint_files import write_export

    def save(partial: str) -> None:
        try:
            save_checkpoint(partial, iteration, model, None, common, save_optimizer=False, include_let=False)
        except CheckpointWriteError as error:
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointWriteError(f"exporting iteration {iteration} to --let-export-dir {export_dir} failed "
                                       f"({error.__cause__ or error}); its partial files were removed. Free space "
                                       f"or fix the error, then run the export again.") from error

    return write_export(export_dir, save)


def load_common(root: str, iteration: int) -> dict:
    """The non-sharded part (iteration, schedules, LET state) without touching tensors."""
    return dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))


def load_checkpoint(root: str, iteration: int, model: List, optimizer, load_optimizer: bool = True,
                    fresh_let: bool = False) -> dict:
    """Load model (and optimizer) shards into place, re-sharding across layouts; return common state.
    ``fresh_let`` (--let-reset-projector): the LET tensors and their optimizer state keep their fresh values."""
    directory = iteration_dir(root, iteration)
    state = model_sharded_state_dict(model)
    if load_optimizer and optimizer is not None and load_common(root, iteration).get("has_optimizer"):
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    if fresh_let:
        state = _keep_local(state, lambda key: LET_KEY_FRAGMENT in key)
    loaded = dist_checkpointing.load(state, directory, strict="assume_ok_unexpected")
    for index, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded["model" if len(model) == 1 else f"model{index}"])
    if "optimizer" in state:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    return loaded


def _keep_local(state, matches):
    """``state`` with every sharded entry whose key ``matches`` wrapped as a LocalNonpersistentObject:
    loading leaves it as it is here instead of reading it (and its saved shape) from the checkpoint."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(state, ShardedBase):
        if not matches(state.key):
            return state
        data = getattr(state, "data", None)
        return LocalNonpersistentObject(data if data is not None else state)
    if isinstance(state, dict):
        return {k: _keep_local(v, matches) for k, v in state.items()}
    if isinstance(state, list):
        return [_keep_local(v, matches) for v in state]
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer over plain torch Adam (no TE/apex) cannot describe an empty state
    (it asserts on the Adam step); give it one to overwrite, as megatron-core itself does."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _barrier():
    if dist.is_initialized():
        dist.barrier()
