"""Run Megatron-Bridge's own ``pretrain()`` (``megatron.bridge.training``) on a machine without CUDA: the registry
groups ``cpu-bridge-imports`` (import placeholders) and ``cpu-bridge`` (Bridge's CUDA calls).

:func:`enable_cpu_bridge` applies megatron-core's and Megatron-LM's CPU redirections first
(:mod:`megatron_let.compat.cpu_megatron_lm`: Bridge runs megatron-core's timers, rerun state machine, optimizer,
schedules and checkpointing), then the entries below; like them it acts only when ``torch.cuda.is_available()`` is
False and edits no file.

Import placeholders (``cpu-bridge-imports``). Bridge 0.6.2 imports at module level packages that a CPU machine
cannot or should not install, for code a GPT pretraining run never executes: TransformerEngine (its LoRA layers),
NVIDIA ModelOpt (distillation, quantisation state), nvidia-resiliency-ext (in-process restart; the only release
for Python 3.12 on PyPI, 0.4.1, is older than megatron-core 0.19 accepts, so installing it breaks
``megatron.core.dist_checkpointing``) and megatron-energon (multimodal data loaders). Each entry declares one
placeholder; each is used only where the package cannot be imported, and only while
:func:`enable_cpu_bridge` imports Bridge's training modules (TransformerEngine's only while Bridge's LoRA module
runs its body), then removed from ``sys.modules`` again, so megatron-core, Megatron-LM and everything imported
later still see the package as absent (``megatron.training`` is imported before: its ``has_nvidia_modelopt``
stays False). Calling a placeholder raises, except where the entry says what it does.

Checked by tests/test_bridge.py (Bridge's pretrain() with its own forward step, one process and TP2 / PP2).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import types
from typing import Callable, Dict, Optional

import torch

from megatron_let.compat.cuda_on_cpu import cuda_calls_return_self, as_if_cuda_entry, torch_on_cpu
from megatron_let.patch_registry import apply_patches, register_patch

__all__ = ["enable_cpu_bridge", "BRIDGE_MODULES"]

_log = logging.getLogger(__name__)
_ENABLED = False
IMPORTS_GROUP, GROUP = "cpu-bridge-imports", "cpu-bridge"
# Bridge's modules a GPT pretraining run uses: imported once, with the placeholders, by enable_cpu_bridge
BRIDGE_MODULES = ("megatron.bridge", "megatron.bridge.training.config", "megatron.bridge.training.pretrain",
                  "megatron.bridge.training.train", "megatron.bridge.training.gpt_step",
                  "megatron.bridge.training.eval", "megatron.bridge.training.setup",
                  "megatron.bridge.training.checkpointing", "megatron.bridge.training.initialize",
                  "megatron.bridge.data.loaders", "megatron.bridge.training.utils.train_utils",
                  "megatron.bridge.training.utils.omegaconf_utils", "megatron.bridge.recipes")
_LORA = "megatron.bridge.peft.lora_layers"


# -- placeholders --------------------------------------------------------------------------------------------
class _PlaceholderType(abc.ABCMeta):
    """A placeholder class: any attribute is another one, ``X[T]`` is ``X``; it can be subclassed (also with ABC)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder_class(f"{cls.__name__}.{name}", cls._package, cls._permissive)

    def __getitem__(cls, item):
        return cls


def _placeholder_class(name: str, package: str, permissive: bool):
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{name} is a CPU import placeholder of megatron-let (megatron_let/compat/cpu_bridge.py): "
                           f"this code path needs the real {package} package.")

    def identity(self, *args, **kwargs):  # a decorator (energon's @stateless) applied at import time
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    namespace = {"_package": package, "_permissive": permissive, "__module__": package}
    if permissive:
        namespace.update(__init__=lambda self, *args, **kwargs: None, __call__=identity)
    else:
        namespace["__init__"] = refuse
    return _PlaceholderType(name.rpartition(".")[2], (), namespace)


def _placeholder_module(name: str, package: str, permissive: bool, functions: Dict[str, Callable]):
    module = types.ModuleType(name, f"megatron-let CPU import placeholder for {package}")
    module.__path__ = []  # a package: its submodules are placeholders too

    def getattr_(attr):
        if attr in functions:
            return functions[attr]
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder_class(f"{name}.{attr}", package, permissive)

    module.__getattr__ = getattr_
    return module


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The placeholders the entries declared: {package: (permissive, {"module.function": replacement})}."""

    def __init__(self):
        self.packages: Dict[str, tuple] = {}
        self.only_for_lora: Dict[str, tuple] = {}  # TransformerEngine: only while the LoRA module runs

    def _owner(self, name: str) -> Optional[str]:
        return next((p for p in self.packages if name == p or name.startswith(p + ".")), None)

    def find_spec(self, name, path, target=None):
        if self._owner(name) is not None:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        if name == _LORA and self.only_for_lora:
            return self._lora_spec(name)
        return None

    def create_module(self, spec):
        package = self._owner(spec.name)
        permissive, functions = self.packages[package]
        prefix = spec.name + "."
        own = {key[len(prefix):]: fn for key, fn in functions.items()
               if key.startswith(prefix) and "." not in key[len(prefix):]}
        return _placeholder_module(spec.name, package, permissive, own)

    def exec_module(self, module):
        pass

    @contextlib.contextmanager
    def serving(self, packages: Dict[str, tuple]):
        """Serve ``packages``' placeholders (also when this finder is not on sys.meta_path), then forget them and
        remove every placeholder module of theirs from sys.modules."""
        self.packages.update(packages)
        installed = self in sys.meta_path
        if not installed:
            sys.meta_path.insert(0, self)
        try:
            yield
        finally:
            if not installed:
                sys.meta_path.remove(self)
            for name in [n for n in sys.modules if self._owner(n) in packages]:
                del sys.modules[name]
            for package in packages:
                self.packages.pop(package, None)

    def _lora_spec(self, name):
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real_loader, finder = spec.loader, self

        class LoRAWithPlaceholders(importlib.abc.Loader):
            def create_module(self, spec):
                return None

            def exec_module(self, module):
                for dependency in ("megatron.core.transformer.moe.moe_utils", "megatron.bridge.peft.adapter_wrapper",
                                   "megatron.bridge.peft.lora_merge"):  # its other imports, without the placeholder
                    importlib.import_module(dependency)
                with finder.serving(finder.only_for_lora):
                    real_loader.exec_module(module)

        spec.loader = LoRAWithPlaceholders()
        return spec


_PLACEHOLDERS = _Placeholders()


def _absent(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def _placeholder_entry(id: str, package: str, why: str, permissive: bool = False, only_for_lora: bool = False,
                       functions: Optional[Dict[str, Callable]] = None):
    def apply(module, context):
        if _absent(package.split(".")[0]) or (package.count(".") and _absent(package)):
            (_PLACEHOLDERS.only_for_lora if only_for_lora else _PLACEHOLDERS.packages)[package] = \
                (permissive, dict(functions or {}))

    register_patch(f"cpu.bridge.placeholder.{id}", group=IMPORTS_GROUP, target="sys:meta_path", why=why)(apply)


def _no_modelopt_state(*args, **kwargs):
    """Without ModelOpt no model carries ModelOpt state: nothing to save or restore."""
    return None


def _no_distillation_shapes(*args, **kwargs):
    """Without ModelOpt no model is a distillation model: no tensor-shape adjustment (Bridge passes None on)."""
    return None


_placeholder_entry(
    "transformer-engine", "transformer_engine",
    "megatron/bridge/peft/lora_layers.py imports transformer_engine.pytorch unconditionally (every `import "
    "megatron.bridge` reaches it); LoRA never runs in pretraining. Only while that module's body runs, so "
    "megatron-core keeps seeing TransformerEngine as absent", only_for_lora=True)
_placeholder_entry(
    "modelopt", "modelopt",
    "train.py, eval.py, gpt_step.py and checkpointing.py import NVIDIA ModelOpt at module level (distillation, "
    "quantisation state); on a model without ModelOpt state its calls do nothing: "
    "get_tensor_shapes_adjust_fn_for_distillation returns None and the (sharded) modelopt state is neither "
    "saved nor restored",
    functions={"modelopt.torch.distill.plugins.megatron.get_tensor_shapes_adjust_fn_for_distillation":
               _no_distillation_shapes,
               "modelopt.torch.opt.plugins.save_modelopt_state": _no_modelopt_state,
               "modelopt.torch.opt.plugins.save_sharded_modelopt_state": _no_modelopt_state,
               "modelopt.torch.opt.plugins.restore_modelopt_state": _no_modelopt_state})
_placeholder_entry(
    "nvidia-resiliency-ext", "nvidia_resiliency_ext",
    "training/pretrain.py imports nvidia_resiliency_ext.inprocess.CallWrapper for a type annotation (in-process "
    "restart, off by default); PyPI's only Python 3.12 release (0.4.1) is older than megatron-core 0.19's "
    "minimum (0.6.0), which then fails in megatron.core.dist_checkpointing")
_placeholder_entry(
    "megatron-energon", "megatron.energon",
    "megatron/bridge/data/builders and the diffusion recipes import megatron-energon (multimodal data, ~40 "
    "packages) at module level and subclass its task encoders; GPT pretraining never uses it (classes are "
    "subclassable, its decorators return what they decorate)", permissive=True)


@register_patch("cpu.bridge.import-training-modules", group=IMPORTS_GROUP, target="importlib:import_module",
                why="Bridge's training modules are imported once here, with the placeholders above; the "
                    "placeholders are then removed from sys.modules (the modules keep what they bound)")
def _import_bridge(importlib_module, context):
    importlib.import_module("megatron.training.training")  # has_nvidia_modelopt is read before any placeholder
    importlib.import_module("megatron.training.checkpointing")
    with _PLACEHOLDERS.serving(dict(_PLACEHOLDERS.packages)):
        for name in BRIDGE_MODULES:
            importlib.import_module(name)
    _PLACEHOLDERS.only_for_lora.clear()


# -- Bridge's CUDA calls ---------------------------------------------------------------------------------------
for _module, _why in {
    "megatron.bridge.training.setup": "start-time tensor on 'cuda'",
    "megatron.bridge.training.initialize": "torch.cuda.set_device / device_count (seeding is gated on a device); "
                                          "JIT warm-up tensors on 'cuda'; MoE aux-loss scale on current_device()",
    "megatron.bridge.models.model_provider": "torch.cuda.set_device; model_module.cuda(current_device())",
    "megatron.bridge.data.loaders": "do_train/valid/test flags broadcast on 'cuda'",
    "megatron.bridge.training.train": "exit-duration flag on 'cuda'; empty_cache; synchronize",
    "megatron.bridge.training.eval": "loss totals on 'cuda'",
    "megatron.bridge.training.checkpointing": "iteration / RNG tensors on 'cuda'; cuda RNG state; empty_cache",
    "megatron.bridge.training.utils.train_utils": "loss totals, norms and memory report on 'cuda'",
    "megatron.bridge.training.utils.flop_utils": "FLOPs statistics tensors on 'cuda'",
    "megatron.bridge.utils.common_utils": "torch.cuda.set_device(LOCAL_RANK)",
}.items():
    torch_on_cpu(GROUP, _module, _why)

as_if_cuda_entry(GROUP, "megatron.bridge.training.gpt_step:get_batch_from_iterator",
                 "every batch field is moved with .cuda(non_blocking=True)")


@register_patch("cpu.bridge.initialize-without-cuda", group=GROUP,
                target="megatron.bridge.training.setup:initialize_megatron",
                why="setup() calls initialize_megatron, which asserts CUDA unless allow_no_cuda")
def _initialize_without_cuda(setup, context):
    setup.initialize_megatron = functools.partial(setup.initialize_megatron, allow_no_cuda=True)


@register_patch("cpu.bridge.local-layer-spec", group=GROUP,
                target="megatron.bridge.models.gpt_provider:transformer_engine_layer_spec",
                why="GPTModelProvider's default layer spec is TransformerEngine's, which cannot be built without "
                    "TE: the provider's own local (megatron-core) spec, which follows the same config")
def _local_layer_spec(gpt_provider, context):
    gpt_provider.transformer_engine_layer_spec = gpt_provider.local_layer_spec


@register_patch("cpu.bridge.cpu-initialization", group=GROUP, target="megatron.bridge.models.model_provider:get_model",
                why="Bridge's get_model resets the provider's use_cpu_initialization to its own argument (False from "
                    "setup: initialise on the GPU) and then moves the chunks with .cuda(): on CPU the config's "
                    "model.use_cpu_initialization is kept (full weights initialised, then split: the same weights "
                    "for every TP/PP layout) and .cuda() returns the module")
def _cpu_initialization(model_provider, context):
    get_model = model_provider.get_model

    @functools.wraps(get_model)
    def get_model_on_cpu(provider, *args, **kwargs):
        kwargs["use_cpu_initialization"] = bool(kwargs.get("use_cpu_initialization")
                                                or provider.use_cpu_initialization)
        with cuda_calls_return_self(type_names=False):
            return get_model(provider, *args, **kwargs)

    model_provider.get_model = get_model_on_cpu


@register_patch("cpu.bridge.dist-optimizer-load-template", group=GROUP,
                target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_state_dict",
                why="Bridge resumes the recipes' distributed optimizer by building its sharded state dict before "
                    "the first step; over plain torch Adam (no TransformerEngine / apex: every CPU run) its "
                    "state_dict asserts on the missing Adam step: the state is materialised first (megatron-core's "
                    "own dummy step, as for its fsdp_dtensor format, at lr 0 so weight decay leaves the weights "
                    "alone), then overwritten by the load")
def _dist_optimizer_load_template(distrib_optimizer, context):
    cls = distrib_optimizer.DistributedOptimizer
    sharded_state_dict = cls.sharded_state_dict

    signature = inspect.signature(sharded_state_dict)

    @functools.wraps(sharded_state_dict)
    def with_state_to_overwrite(self, *args, **kwargs):
        if signature.bind(self, *args, **kwargs).arguments.get("is_loading") and not self.optimizer.state:
            groups = self.optimizer.param_groups
            rates = [group["lr"] for group in groups]
            for group in groups:  # the dummy step must not move the weights (weight decay): lr 0
                group["lr"] = 0.0
            try:
                self._init_optimizer_states_with_dummy_values()
            finally:
                for group, rate in zip(groups, rates):
                    group["lr"] = rate
        return sharded_state_dict(self, *args, **kwargs)

    cls.sharded_state_dict = with_state_to_overwrite


@register_patch("cpu.bridge.dist-optimizer-adam-step", group=GROUP,
                target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
                why="over plain torch Adam the loaded iteration count ('step' of the saved param groups) does not "
                    "reach the per-parameter Adam state (it keeps the dummy step's 1; megatron-core 0.19.2 also "
                    "shares one step tensor between all parameters, which then counts every parameter's update): "
                    "each parameter gets its own tensor holding the loaded step, so a resumed run's bias correction "
                    "is the straight run's")
def _dist_optimizer_adam_step(distrib_optimizer, context):
    cls = distrib_optimizer.DistributedOptimizer
    load_state_dict = cls.load_state_dict

    @functools.wraps(load_state_dict)
    def load_with_steps(self, state_dict, *args, **kwargs):
        result = load_state_dict(self, state_dict, *args, **kwargs)
        steps = {group["step"] for group in state_dict.get("optimizer", {}).get("param_groups", ()) if "step" in group}
        if len(steps) == 1:
            step = float(next(iter(steps)))
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)
        return result

    cls.load_state_dict = load_with_steps


def enable_cpu_bridge() -> bool:
    """Apply the CPU redirections for Bridge's ``pretrain()`` if CUDA is unavailable (idempotent): True if it
    patched. Call it before importing anything from ``megatron.bridge``."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return False
    from megatron_let.compat.cpu_megatron_lm import enable_cpu_megatron_lm

    enable_cpu_megatron_lm()
    apply_patches(IMPORTS_GROUP)
    count = apply_patches(GROUP)
    _ENABLED = True
    _log.info("Megatron-Bridge CPU redirections enabled (%d patches)", count)
    return True
