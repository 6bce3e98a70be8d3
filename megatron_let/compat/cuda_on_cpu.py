"""The two mechanisms both CPU layers declare their entries with (:mod:`.cpu`, :mod:`.cpu_megatron_lm`).

Megatron calls CUDA in two ways that a redirection must reach without editing Megatron:

- through the ``torch`` a module imported: :func:`torch_on_cpu` replaces that module global with
  :data:`TORCH`, which is the real torch except that a CUDA ``device=`` builds on CPU, ``torch.cuda``'s device,
  RNG, stream and memory calls act on the CPU (or do nothing), and it reports one device;
- through tensors and modules (``t.cuda()``, ``t.type() == "torch.cuda.FloatTensor"``):
  :func:`as_if_cuda` wraps one function, and only while it runs ``.cuda()`` returns its object (and, with
  ``type_names``, a CPU tensor's ``type()`` reads ``torch.cuda.<X>Tensor``).
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Optional

import torch

from megatron_let.patch_registry import register_patch

__all__ = ["TORCH", "is_cuda_device", "as_if_cuda", "torch_on_cpu", "as_if_cuda_entry", "cuda_calls_return_self"]


def is_cuda_device(device) -> bool:
    return (device.startswith("cuda") if isinstance(device, str)
            else isinstance(device, torch.device) and device.type == "cuda")


def _factory_on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


class _NoStream:
    """A CUDA stream or event on CPU: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CudaOnCpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch.cuda")
        nothing, zero = (lambda *args, **kwargs: None), (lambda *args, **kwargs: 0)
        self.current_device = lambda: torch.device("cpu")
        self.device_count = lambda: 1  # Megatron-LM's initialize builds the parallel groups only with a device
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.Stream = self.Event = _NoStream  # 0.19's DDP orders its all-reduce on current_stream()
        self.current_stream = lambda *args, **kwargs: _NoStream()
        self.stream = lambda *args, **kwargs: contextlib.nullcontext()
        for name in ("synchronize", "set_device", "empty_cache", "reset_peak_memory_stats"):
            setattr(self, name, nothing)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                     "device_memory_used"):
            setattr(self, name, zero)
        self.memory_stats = lambda *args, **kwargs: {}
        self.get_device_capability = lambda *args, **kwargs: (0, 0)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like",
                     "ones_like", "full_like", "rand", "randn", "randint"):
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


TORCH = _TorchOnCpu()  # the ``torch`` of every redirected module


@contextlib.contextmanager
def cuda_calls_return_self(type_names: bool):
    targets = [(torch.Tensor, "cuda"), (torch.nn.Module, "cuda")] + ([(torch.Tensor, "type")] if type_names else [])
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name in targets]
    real_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = real_type(self, *args, **kwargs)
        return name.replace("torch.", "torch.cuda.", 1) if not args and not kwargs and self.device.type == "cpu" \
            else name

    torch.Tensor.cuda = torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    if type_names:
        torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        for owner, name, attr in saved:
            if attr is None:
                delattr(owner, name)
            else:
                setattr(owner, name, attr)


def as_if_cuda(fn, type_names: bool = False):
    """``fn`` during which ``.cuda()`` returns its object (and, with ``type_names``, a CPU tensor's ``type()``
    reads ``torch.cuda.<X>Tensor``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cuda_calls_return_self(type_names):
            return fn(*args, **kwargs)

    return wrapper


def _short(module: str) -> str:
    for prefix in ("megatron.core.", "megatron."):
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def torch_on_cpu(group: str, module: str, why: str, since: Optional[str] = None, until: Optional[str] = None):
    """One entry: the module-global ``torch`` of ``module`` becomes :data:`TORCH`."""

    def apply(megatron_module, context):
        megatron_module.torch = TORCH

    register_patch(f"cpu.torch-on-cpu.{_short(module)}", group=group, target=f"{module}:torch", why=why,
                   since=since, until=until)(apply)


def as_if_cuda_entry(group: str, target: str, why: str, type_names: bool = False, since: Optional[str] = None,
                     until: Optional[str] = None, optional: bool = False):
    """One entry: the function or method ``target`` ("module:function", "module:Class.method"; ":function": of
    the group's context) runs :func:`as_if_cuda`."""
    module, _, path = target.partition(":")
    *owner_path, name = path.split(".")

    def apply(megatron_module, context):
        owner = functools.reduce(getattr, owner_path, megatron_module)
        raw = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)  # a class: static/classmethod
        if isinstance(raw, (staticmethod, classmethod)):
            setattr(owner, name, type(raw)(as_if_cuda(raw.__func__, type_names)))
        else:
            setattr(owner, name, as_if_cuda(raw, type_names))

    register_patch(f"cpu.as-if-cuda.{module.rpartition('.')[2] or 'script'}.{path}", group=group, target=target,
                   why=why, since=since, until=until, optional=optional)(apply)
