"""Run Megatron-LM's own training loop (``megatron/training``) on a CPU-only machine.

``enable_cpu_megatron_lm()`` first applies megatron-core's redirections
(:func:`megatron_let.compat.cpu.enable_cpu_megatron`), then the few that
Megatron-LM's training package needs on top.  Like the core layer it acts at
runtime, only when ``torch.cuda.is_available()`` is False (with CUDA it does
nothing), and edits or copies no Megatron file.  It must run before
``megatron.training`` is imported (the triton stub) and before a script
imports names from it (``pretrain_gpt`` binds ``get_batch_on_this_tp_rank``
at import).

What is redirected, and why (``_TORCH_ON_CPU_MODULES`` and the patches below):

- ``megatron.core.transformer.custom_layers.batch_invariant_kernels``:
  ``training/initialize.py`` imports it and it imports triton, absent on CPU.
  A stub module is registered whose ``enable_batch_invariant_mode`` raises
  (``--batch-invariant-mode`` is a CUDA kernel feature).
- The module-global ``torch`` of the modules in ``_TORCH_ON_CPU_MODULES``
  becomes a stand-in: ``device='cuda'`` factories build on CPU;
  ``torch.cuda.current_device()`` is ``cpu``; ``device_count()`` is 1 (so
  ``initialize_megatron`` still builds the model-parallel groups and seeds
  megatron's RNG tracker); ``set_device``, ``synchronize``, ``empty_cache``,
  streams, memory statistics are no-ops / zeros; the CUDA RNG state is the CPU
  generator's (so checkpoints keep a ``cuda_rng_state`` entry).
- ``initialize_megatron`` is called by ``pretrain`` with ``allow_no_cuda=True``.
- ``get_model`` (``Module.cuda(...)``), ``get_batch_on_this_tp_rank``
  (``Tensor.cuda()``) and ``evaluate``: ``.cuda()`` returns the object
  unchanged while they run.
- ``fused_kernels.load`` (needs CUDA_HOME and nvcc) is skipped;
  ``compile_helpers`` (runs ``make``) is skipped when the compiled dataset
  helpers already import; ``get_device_arch_version`` reports 0 and, for
  TP/CP > 1, ``CUDA_DEVICE_MAX_CONNECTIONS`` defaults to 1 (argument
  validation asserts it; it means nothing on CPU).

Flags a CPU run needs: ``--transformer-impl local --distributed-backend gloo
--no-gradient-accumulation-fusion --no-persist-layer-norm
--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
--no-rope-fusion --use-cpu-initialization`` and an explicit ``--eval-interval``
when ``--eval-iters 0``.

Verified with Megatron-LM tag ``core_v0.16.1`` and megatron-core 0.16.1
(tests/test_megatron_lm.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import types

import torch

from megatron_let.compat.cpu import _CudaOnCpu, _TorchOnCpu, enable_cpu_megatron

__all__ = ["enable_cpu_megatron_lm", "enable_cpu_script"]

_log = logging.getLogger(__name__)
_ENABLED = False

_TRITON_MODULE = "megatron.core.transformer.custom_layers.batch_invariant_kernels"

# Modules whose global ``torch`` becomes the stand-in: why each one, and the megatron versions that have
# the module ([since, until) minor versions; None: open). Megatron-LM 0.18 split ``training/utils.py`` into a
# package and added the model builders (``training/models``).
_TORCH_ON_CPU_MODULES = {
    "megatron.training.initialize": ("device_count() gates model-parallel init and RNG-tracker "
                                     "seeding; torch.cuda.set_device; 'cuda' tensors in the JIT warm-up", None, None),
    "megatron.training.training": ("device='cuda' tensors (start time, loss totals, exit flags, "
                                   "do_train/valid/test flags); torch.cuda.Stream for DDP; empty_cache", None, None),
    "megatron.training.utils": ("device='cuda' / current_device() tensors (batch broadcast, "
                                "norms, stats); memory report", None, (0, 18)),
    "megatron.training.utils.common_utils": ("the same functions as training/utils.py before 0.18: "
                                             "'cuda' norms and stats, memory report", (0, 18), None),
    "megatron.training.models.dist_utils": ("the builders' DDP wrapping: torch.cuda.Stream, "
                                            "current_stream().wait_stream", (0, 18), None),
    "megatron.training.checkpointing": ("iteration tensor on 'cuda'; cuda rng state save/load; "
                                        "empty_cache", None, None),
    "megatron.core.timers": ("torch.cuda.synchronize; timing buffers on current_device()", None, None),
    "megatron.core.rerun_state_machine": ("state tensors on 'cuda' / current_device(); "
                                          "cuda rng state", None, None),
}

# (module, function): while it runs ``Tensor.cuda()`` / ``Module.cuda()`` return their object.
_CUDA_CALLS_ARE_IDENTITY = {
    ("megatron.training.training", "get_model"): ("model_module.cuda(current_device())", None, None),
    ("megatron.training.training", "evaluate"): ("loss totals moved with .cuda()", None, None),
    ("megatron.training.utils", "get_batch_on_this_tp_rank"): ("batch tensors moved with .cuda()", None, (0, 18)),
}


def _in_versions(since, until) -> bool:
    from megatron_let.megatron_versions import in_versions

    return in_versions(since, until)


def _entries(table: dict) -> list:
    """The keys of ``table`` that the running megatron version has."""
    return [key for key, (_, since, until) in table.items() if _in_versions(since, until)]


class _CudaForTraining(_CudaOnCpu):
    """``torch.cuda`` as the Megatron-LM training modules see it: megatron-core's CPU stand-in plus
    the device, memory and stream calls the training loop makes."""

    def __init__(self):
        super().__init__()
        zero = lambda *args, **kwargs: 0  # noqa: E731
        none = lambda *args, **kwargs: None  # noqa: E731
        self.device_count = lambda: 1
        self.set_device = none
        self.empty_cache = none
        self.reset_peak_memory_stats = none
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                     "max_memory_reserved", "device_memory_used"):
            setattr(self, name, zero)
        self.memory_stats = lambda *args, **kwargs: {}
        self.get_device_capability = lambda *args, **kwargs: (0, 0)


class _TorchForTraining(_TorchOnCpu):
    """``torch`` as the Megatron-LM training modules see it: everything else is the real one."""

    def __init__(self):
        super().__init__()
        self.cuda = _CudaForTraining()


@contextlib.contextmanager
def _cuda_calls_are_identity():
    saved = (torch.Tensor.__dict__.get("cuda"), torch.nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if saved[0] is None:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = saved[0]
        torch.nn.Module.cuda = saved[1]


def _identity_cuda_calls(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_calls_are_identity():
            return fn(*args, **kwargs)

    return wrapper


def _register_triton_stub() -> None:
    """Stand in for the triton-based kernels module unless triton is importable."""
    if _TRITON_MODULE in sys.modules:
        return
    try:
        importlib.import_module("triton")
        return
    except ImportError:
        pass
    stub = types.ModuleType(_TRITON_MODULE)
    stub.__doc__ = "megatron_let CPU stub: the real module needs triton (CUDA)."

    def enable_batch_invariant_mode(*args, **kwargs):
        raise RuntimeError("--batch-invariant-mode needs triton and CUDA; not available on CPU.")

    stub.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules[_TRITON_MODULE] = stub


def _compiled_helpers_import() -> bool:
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return True
    except ImportError:
        pass
    return _borrow_installed_helpers()


def _borrow_installed_helpers() -> bool:
    """A Megatron-LM checkout's megatron/core (used first, see integrations.selection) has no compiled
    dataset helpers until ``make`` builds them in the checkout; on CPU, rather than writing into the
    user's checkout, use those of an installed megatron-core wheel of the SAME version, if any."""
    try:
        from importlib import metadata

        datasets = importlib.import_module("megatron.core.datasets")
        from megatron_let.megatron_versions import core_version

        version = core_version()
        for name in ("megatron-core", "megatron_core"):
            try:
                dist = metadata.distribution(name)
                break
            except metadata.PackageNotFoundError:
                dist = None
        if dist is None or dist.version.split(".")[:2] != str(version).split(".")[:2]:
            return False  # the helpers' C++ interface is the same within a minor version
        wheel_dir = os.path.abspath(str(dist.locate_file(os.path.join("megatron", "core", "datasets"))))
        if not any(f.startswith("helpers_cpp") and f.endswith(".so") for f in os.listdir(wheel_dir)):
            return False
        if wheel_dir not in datasets.__path__:
            datasets.__path__.append(wheel_dir)
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return True
    except (ImportError, OSError):
        return False


def enable_cpu_megatron_lm() -> bool:
    """Apply megatron-core's and Megatron-LM's CPU redirections if CUDA is unavailable.

    Idempotent; returns True if it patched anything. Call it before importing
    ``megatron.training`` or a Megatron-LM script such as ``pretrain_gpt``.
    """
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return False
    enable_cpu_megatron()
    _register_triton_stub()

    modules = {name: importlib.import_module(name) for name in _entries(_TORCH_ON_CPU_MODULES)}
    for module in modules.values():
        if vars(module).get("torch") is not torch:
            raise RuntimeError(f"megatron_let.compat.cpu_megatron_lm: {module.__name__} has no "
                               "global 'torch'; this Megatron-LM layout is not supported on CPU.")
    stand_in = _TorchForTraining()
    for module in modules.values():
        module.torch = stand_in

    for module_name, function in _entries(_CUDA_CALLS_ARE_IDENTITY):
        module = importlib.import_module(module_name)
        setattr(module, function, _identity_cuda_calls(getattr(module, function)))

    training = modules["megatron.training.training"]
    training.initialize_megatron = functools.partial(training.initialize_megatron,
                                                     allow_no_cuda=True)

    initialize = modules["megatron.training.initialize"]
    if hasattr(initialize, "fused_kernels"):  # loaded at start-up before 0.18
        initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)
    if _compiled_helpers_import():
        importlib.import_module("megatron.core.datasets.utils").compile_helpers = lambda: None

    arguments = importlib.import_module("megatron.training.arguments")
    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    _ENABLED = True
    _log.info("Megatron-LM CPU redirections enabled")
    return True


# functions of a Megatron-LM script (pretrain_gpt.py) whose ``Tensor.cuda()`` calls become the identity
_SCRIPT_CUDA_CALLS = {"get_batch": "0.19's pretrain_gpt.py moves every batch field with .cuda(non_blocking=True)"}


def enable_cpu_script(script) -> None:
    """The same redirection for the user's script module (``pretrain_gpt``), once it is imported; without
    CUDA only."""
    if torch.cuda.is_available() or getattr(script, "_megatron_let_cpu", False):
        return
    for name in _SCRIPT_CUDA_CALLS:
        if hasattr(script, name):
            setattr(script, name, _identity_cuda_calls(getattr(script, name)))
    script._megatron_let_cpu = True
