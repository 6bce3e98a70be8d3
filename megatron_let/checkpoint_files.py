"""Megatron's checkpoint directory layout, and the one line a failed save ends with, for both trainers.

``<save>/iter_0000100/`` holds one checkpoint; ``<save>/latest_checkpointed_iteration.txt`` (the tracker) names
the newest complete one. Megatron-LM's loop and the lean trainer (megatron_let/training/checkpoint.py) write the
same layout, so what a failed write leaves, and what still loads, is decided here once.
"""

import os
import shutil
from typing import Callable, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"  # an export is written to <dir>.partial and renamed to <dir> once complete
# A failed save: torch.distributed.checkpoint's gathered write failures derive from BaseException, not Exception.
SAVE_ERRORS = (Exception, CheckpointException)


def export_partial_dir(export_dir: str) -> str:
    """Where an export is written until it is complete (a sibling of ``--let-export-dir``): a run killed
    midway leaves this, never a ``--let-export-dir`` that looks complete."""
    return os.path.normpath(os.path.abspath(export_dir)) + PARTIAL_SUFFIX


def write_export(export_dir: str, write: Callable[[str], None]) -> str:
    """--let-export-dir, for every loop: ``write(directory)`` (the loop's own save) into
    :func:`export_partial_dir`, renamed to ``export_dir`` by rank 0 once every rank has finished (over an empty
    directory too: the preflight refused a non-empty one), so an export killed midway never looks finished
    (preflight/paths.py refuses to start over its leftover and says to remove it). Returns the final path."""
    final, partial = os.path.normpath(os.path.abspath(export_dir)), export_partial_dir(export_dir)
    write(partial)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.replace(partial, final)
    if dist.is_initialized():
        dist.barrier()
    return final


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The iteration the tracker names, or None when there is no complete checkpoint."""
    if not root or not os.path.isfile(os.path.join(root, TRACKER)):
        return None
    with open(os.path.join(root, TRACKER)) as f:
        text = f.read().strip()
    return int(text) if text.isdigit() else None


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
