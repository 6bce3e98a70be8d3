"""Run Megatron-LM's own training loop (``megatron.training``) on a machine without CUDA: the registry groups
``cpu-training`` (``megatron.training``) and ``cpu-script`` (the CUDA calls of a ``pretrain_gpt.py`` module).

:func:`enable_cpu_megatron_lm` applies megatron-core's redirections (:mod:`megatron_let.compat.cpu`), then the
entries below; like them it acts at run time, only when ``torch.cuda.is_available()`` is False, and edits no
Megatron file. Call it before a script imports names from ``megatron.training`` (``pretrain_gpt`` binds
``get_batch_on_this_tp_rank`` at import); :func:`enable_cpu_script` then redirects the script module itself.

A CPU run needs ``--transformer-impl local --distributed-backend gloo --no-gradient-accumulation-fusion
--no-persist-layer-norm --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
--no-rope-fusion --use-cpu-initialization``, and an explicit ``--eval-interval`` when ``--eval-iters 0``
(megatron_let/preflight/cpu.py names the missing ones). Checked by tests/test_megatron_lm.py.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import types
import weakref

import torch

from megatron_let import megatron_versions
from megatron_let.compat.cpu import enable_cpu_megatron
from megatron_let.compat.cuda_on_cpu import as_if_cuda_entry, torch_on_cpu
from megatron_let.patch_registry import apply_patches, register_patch

__all__ = ["enable_cpu_megatron_lm", "enable_cpu_script"]

_log = logging.getLogger(__name__)
_ENABLED = False
_SCRIPTS = weakref.WeakSet()  # script modules already redirected
GROUP, SCRIPT_GROUP = "cpu-training", "cpu-script"

for _module, _why, _since, _until in (
    ("megatron.training.initialize", "device_count() gates model-parallel init and RNG-tracker seeding; "
                                     "torch.cuda.set_device; 'cuda' tensors in the JIT warm-up", None, None),
    ("megatron.training.training", "device='cuda' tensors (start time, loss totals, exit and do_train/valid/test "
                                   "flags); torch.cuda.Stream for DDP; empty_cache", None, None),
    ("megatron.training.utils", "device='cuda' / current_device() tensors (batch broadcast, norms, stats); "
                                "memory report", None, "0.18"),
    ("megatron.training.utils.common_utils", "0.18 split training/utils.py into a package: the same 'cuda' norms, "
                                             "stats and memory report", "0.18", None),
    ("megatron.training.models.dist_utils", "the 0.18 model builders' DDP wrapping: torch.cuda.Stream, "
                                            "current_stream().wait_stream", "0.18", None),
    ("megatron.training.checkpointing", "iteration tensor on 'cuda'; cuda rng state save/load; empty_cache",
     None, None),
    ("megatron.core.timers", "torch.cuda.synchronize; timing buffers on current_device()", None, None),
    ("megatron.core.rerun_state_machine", "state tensors on 'cuda' / current_device(); cuda rng state",
     None, None),
):
    torch_on_cpu(GROUP, _module, _why, since=_since, until=_until)

as_if_cuda_entry(GROUP, "megatron.training.training:get_model", "model_module.cuda(current_device())")
as_if_cuda_entry(GROUP, "megatron.training.training:evaluate", "loss totals moved with .cuda()")
as_if_cuda_entry(GROUP, "megatron.training.utils:get_batch_on_this_tp_rank", "batch tensors moved with .cuda()",
                 until="0.18")
as_if_cuda_entry(SCRIPT_GROUP, ":get_batch", "0.19's pretrain_gpt.py moves every batch field with "
                 ".cuda(non_blocking=True)", optional=True)


@register_patch("cpu.initialize-without-cuda", group=GROUP, target="megatron.training.training:initialize_megatron",
                why="pretrain() calls initialize_megatron, which refuses to run without CUDA unless allow_no_cuda")
def _initialize_without_cuda(training, context):
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)


@register_patch("cpu.no-fused-kernels", group=GROUP, until="0.18", target="megatron.training.initialize:fused_kernels",
                why="start-up compiles the fused kernels (needs CUDA_HOME and nvcc): skipped")
def _no_fused_kernels(initialize, context):
    initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)


@register_patch("cpu.no-compile-helpers", group=GROUP, target="megatron.core.datasets.utils:compile_helpers",
                why="compile_helpers runs make in megatron/core/datasets: skipped where compiled helpers import "
                    "(a checkout without them borrows an installed megatron-core wheel's of the same minor "
                    "version rather than writing into the user's checkout)")
def _no_compile_helpers(datasets_utils, context):
    if _compiled_helpers_import():
        datasets_utils.compile_helpers = lambda: None


@register_patch("cpu.no-device-arch", group=GROUP, target="megatron.training.arguments:get_device_arch_version",
                why="argument validation reads the GPU architecture (0 on CPU) and, for TP/CP > 1, asserts "
                    "CUDA_DEVICE_MAX_CONNECTIONS, which means nothing on CPU (defaults to 1)")
def _no_device_arch(arguments, context):
    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _compiled_helpers_import() -> bool:
    from importlib import metadata

    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return True
    except ImportError:
        pass
    try:  # a checkout's megatron/core: an installed wheel's helpers, same C++ interface within a minor version
        dist = metadata.distribution("megatron-core")
        if not megatron_versions.same_minor(dist.version, megatron_versions.core_version()):
            return False
        wheel_dir = os.path.abspath(str(dist.locate_file(os.path.join("megatron", "core", "datasets"))))
        if not any(f.startswith("helpers_cpp") and f.endswith(".so") for f in os.listdir(wheel_dir)):
            return False
        datasets = importlib.import_module("megatron.core.datasets")
        if wheel_dir not in datasets.__path__:
            datasets.__path__.append(wheel_dir)
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return True
    except (ImportError, OSError, metadata.PackageNotFoundError):
        return False


def enable_cpu_megatron_lm() -> bool:
    """Apply megatron-core's and Megatron-LM's CPU redirections if CUDA is unavailable (idempotent): True if it
    patched. Call it before importing a Megatron-LM script such as ``pretrain_gpt``."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return False
    enable_cpu_megatron()
    count = apply_patches(GROUP)
    _ENABLED = True
    _log.info("Megatron-LM CPU redirections enabled (%d patches)", count)
    return True


def enable_cpu_script(script) -> bool:
    """The ``cpu-script`` entries for the user's script module (``pretrain_gpt``), once imported; without CUDA
    only (idempotent): True if it patched."""
    if torch.cuda.is_available() or script in _SCRIPTS:
        return False
    _SCRIPTS.add(script)
    return apply_patches(SCRIPT_GROUP, script) > 0
