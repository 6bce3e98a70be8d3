"""Sharded checkpoints (megatron-core dist_checkpointing, Megatron-LM's directory layout).

``<save>/iter_0000100/`` holds model, optimizer and the trainer/LET state;
``<save>/latest_checkpointed_iteration.txt`` names the newest complete one.
A checkpoint is written under a temporary name and renamed only once every
rank has finished, and the tracker is replaced atomically after that, so a
crash mid-save never leaves something that loads as valid.
"""

import os
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_let.errors import CheckpointWriteError

TRACKER = "latest_checkpointed_iteration.txt"
LET_KEY_FRAGMENT = "let_alignment."
# Optimizer state stored re-shardable across TP/PP/DP and distributed/plain optimizers.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# A failed save: torch.distributed.checkpoint's gathered write failures derive from BaseException, not Exception.
SAVE_ERRORS = (Exception, CheckpointException)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The iteration the tracker names, or None when there is no complete checkpoint."""
    if not root or not os.path.isfile(os.path.join(root, TRACKER)):
        return None
    with open(os.path.join(root, TRACKER)) as f:
        text = f.read().strip()
    return int(text) if text.isdigit() else None


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
    """--let-export-dir: the model without LET state or optimizer, written under a sibling temporary name and
    renamed once every rank has finished, so an export killed midway never looks finished (the preflight then
    refuses to start over its leftover and says to remove it)."""
    from megatron_let.preflight.paths import export_partial_dir

    final, partial = os.path.normpath(os.path.abspath(export_dir)), export_partial_dir(export_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        save_checkpoint(partial, iteration, model, None, common, save_optimizer=False, include_let=False)
    except CheckpointWriteError as error:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(f"exporting iteration {iteration} to --let-export-dir {export_dir} failed "
                                   f"({error.__cause__ or error}); its partial files were removed. Free space or "
                                   f"fix the error, then run the export again.") from error
    if rank == 0:
        os.replace(partial, final)  # over an empty directory too (the preflight refused a non-empty one)
    _barrier()
    return final


def write_failure(root: str, iteration: int, error: BaseException, partial: Optional[str] = None,
                  cause: Optional[OSError] = None) -> str:
    """The one line both trainers print when saving ``iteration`` under ``root`` failed: the OS error (``cause``
    where the library only logged it: torch's writers drop errno), the free space, which checkpoint still loads,
    and what became of ``partial``, the directory the save wrote into. Rank 0 removes ``partial`` to give the
    space back, unless the tracker names it: a checkpoint that may load is never deleted."""
    cause = _os_error(error) or cause
    reason = " ".join(f"{type(cause or error).__name__}: {cause or error}".split())
    try:
        free = f"; {shutil.disk_usage(root).free} bytes free on its disk"
    except OSError:
        free = ""
    previous = latest_iteration(root)
    kept = f"iteration {previous} is still the checkpoint that loads" if previous is not None \
        else "no earlier checkpoint exists"
    if partial is None or not os.path.exists(partial):
        left = "it left no partial files"
    elif previous is not None and os.path.realpath(partial) == os.path.realpath(iteration_dir(root, previous)):
        left, kept = (f"it wrote into {partial}, the checkpoint the tracker names, which may no longer load",
                      "no other checkpoint was touched")
    else:
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            shutil.rmtree(partial, ignore_errors=True)
        left = f"its partial files were removed ({partial})" if not os.path.exists(partial) \
            else f"its partial files are left in {partial}: delete that directory to get the space back"
    return (f"saving the checkpoint of iteration {iteration} to --save {root} failed ({reason}{free}); {left} and "
            f"{kept}. Free space or fix the error, then resume with --load {root}.")


def _os_error(error: BaseException) -> Optional[OSError]:
    """The OSError behind ``error``: along its cause/context chain and inside torch.distributed.checkpoint's
    CheckpointException, which gathers each rank's failure as (exception, traceback)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


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
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _barrier():
    if dist.is_initialized():
        dist.barrier()
