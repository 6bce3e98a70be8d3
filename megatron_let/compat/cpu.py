"""Run megatron-core on a CPU-only machine (gloo backend).

megatron-core hard-codes CUDA in the places CPU training reaches:
``torch.cuda.current_device()`` / ``device="cuda"`` allocations,
``torch.cuda.synchronize()``, the CUDA RNG state, ``Tensor.cuda()`` and
``param.type() == "torch.cuda.FloatTensor"`` checks.  ``enable_cpu_megatron()``
redirects exactly those, at runtime, and only when ``torch.cuda.is_available()``
is False; with CUDA it does nothing.  No megatron file is edited or copied.

Three mechanisms; every target is listed, with its reason, in a table below:

1. ``_TORCH_ON_CPU_MODULES``: the module-global ``torch`` of these megatron
   modules becomes ``_TorchOnCpu``, which forwards everything to the real
   ``torch`` except: a tensor factory given a CUDA ``device`` builds on CPU;
   ``torch.cuda.current_device()`` is ``cpu``; ``torch.cuda.synchronize()`` is
   a no-op; ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` act on the
   CPU generator.  Code outside these modules never sees it.
2. ``_CUDA_LOOKING_TENSORS``: functions that call ``Tensor.cuda()`` or compare
   ``Tensor.type()`` with ``"torch.cuda.*Tensor"`` are wrapped; only while
   they run, ``t.cuda()`` returns ``t`` and a CPU tensor's ``type()`` reads
   ``torch.cuda.<X>Tensor``.
3. ``_SINGLE_PATCHES``: six small patches whose docstrings say why (RNG
   tracker on the CPU generator, torch norms under sequence parallelism,
   unbatched P2P on gloo, ``ShardedTensor.init_data``, the MoE router's GEMM
   without TransformerEngine, HybridStack's final norm without TransformerEngine).

Verified by tests/cpu_compat_smoke.py (TP, TP+SP, PP, interleaved PP, DP,
distributed optimizer, torch_dist and fully parallel save/load reproduce the
single-process losses and grad norms to < 1e-6 relative in fp32).

Not covered (CUDA-only code, not a redirection): TransformerEngine, context
parallelism, CUDA graphs, several distributed-optimizer instances, overlapped
communication streams, optimizer CPU offloading, fp16 loss scaling, async save.

Behaviour to know on CPU:
- The tracker's default state *is* torch's global CPU generator: weight init
  (``use_cpu_initialization``), dropout outside TP regions and anything else
  drawing from it (e.g. a DataLoader without its own generator) share one
  stream, so give data loaders their own ``torch.Generator``.
- The torch_dist saver starts a helper process that re-imports ``__main__``:
  guard scripts with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import types
import warnings

import torch

from megatron_let import megatron_versions

__all__ = ["enable_cpu_megatron"]

# Which megatron-core versions this was verified with (tests/cpu_compat_smoke.py passes on them) is
# megatron_let.megatron_versions' TESTED: a tested version runs without a warning; older than supported
# is refused.

# 1. Modules whose global ``torch`` becomes ``_TorchOnCpu``: why each one.
_TORCH_ON_CPU_MODULES = {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor and the local "
    "multi_tensor_l2_norm (grad norm) allocate on CUDA",
    "megatron.core.transformer.utils": "get_default_causal_mask: device='cuda'",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq / "
    "rotary freqs moved to torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/reduce-scatter outputs "
    "allocated on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather "
    "buffers allocated on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random": "RNG tracker seeds and reads "
    "torch.cuda RNG state (see also _patch_rng_tracker)",
    "megatron.core.pipeline_parallel.schedules": "token counter "
    "torch.zeros(..., device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "shape/recv buffers on "
    "torch.cuda.current_device(); torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "param/grad buffers on "
    "torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather/scatter buffers on "
    "torch.cuda.current_device()",
    "megatron.core.optimizer.clip_grads": "grad-norm / zero-count tensors on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "writer calls "
    "torch.cuda.synchronize after the host copy",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save "
    "verification all-reduce tensors on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange buffers on 'cuda'",
    "megatron.core.transformer.moe.router": "router weights moved to and aux-loss "
    "tensors built on torch.cuda.current_device()",
    "megatron.core.transformer.moe.experts": "expert weights on torch.cuda.current_device()",
    "megatron.core.transformer.moe.moe_utils": "aux-loss tracker values on 'cuda'",
}

# 2. (module, "Class.method" or "function"): why it needs CUDA-looking tensors.
_CUDA_LOOKING_TENSORS = {
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups"):
        "raises TypeError unless param.type() is torch.cuda.{Float,Half,BFloat16}Tensor",
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"):
        "fully reshardable save with --overlap-param-gather: gathered buffers moved with .cuda()",
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"):
        "same type() check for bf16/fp16 params",
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"):
        "asserts grad.type() == 'torch.cuda.FloatTensor' (the name optimizer.py calls)",
    ("megatron.core.dist_checkpointing.strategies.fully_parallel", "exchange_by_distribution"):
        "fully parallel load: exchanged shards are moved with .cuda()",
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"):
        "weight.data.cuda() before the tied-embedding all-reduce (PP > 1)",
}

_log = logging.getLogger(__name__)
_ENABLED = False


# --------------------------------------------------------------------------
# 1. the torch stand-in
# --------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _factory_on_cpu(factory):
    """Wrap a torch tensor factory: a CUDA ``device=`` becomes CPU."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


class _NoStream:
    """What a CUDA stream or event does on CPU: nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as the patched modules see it. Streams and events are no-ops: from 0.19 the DDP grad
    buffers order their all-reduce on ``torch.cuda.current_stream()`` even without overlap."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: torch.device("cpu")
        self.synchronize = lambda device=None: None
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.Stream = _NoStream
        self.Event = _NoStream
        self.current_stream = lambda *args, **kwargs: _NoStream()
        self.stream = lambda *args, **kwargs: contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like",
              "zeros_like", "ones_like", "full_like", "rand", "randn", "randint")


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the patched modules see it: everything else is the real one."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# --------------------------------------------------------------------------
# 2. CUDA-looking tensors for the duration of one call
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _cuda_looking_tensors():
    """Temporarily: ``t.cuda()`` -> ``t``; ``t.type()`` of a CPU tensor -> 'torch.cuda.X'."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("type", "cuda")}
    real_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = real_type(self, *args, **kwargs)
        if not args and not kwargs and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        for name, attr in saved.items():
            if attr is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, attr)


def _with_cuda_looking_tensors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_looking_tensors():
            return fn(*args, **kwargs)

    return wrapper


def _resolve(module_name: str, path: str):
    """(owner, attribute name, raw attribute) for 'func' or 'Class.method'."""
    module = importlib.import_module(module_name)
    owner_name, _, attr = path.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    return owner, attr, vars(owner)[attr]


def _wrap(owner, attr: str, raw) -> None:
    if isinstance(raw, (staticmethod, classmethod)):
        setattr(owner, attr, type(raw)(_with_cuda_looking_tensors(raw.__func__)))
    else:
        setattr(owner, attr, _with_cuda_looking_tensors(raw))


# --------------------------------------------------------------------------
# 3. single-purpose patches (each takes the megatron module it patches)
# --------------------------------------------------------------------------
def _patch_rng_tracker(random) -> None:
    """Make megatron's CudaRNGStatesTracker track CPU generator states.

    With the torch stand-in, ``tracker.add`` seeds/reads the CPU generator; the
    two helpers below are what ``fork`` and activation recompute use to swap
    states.  The tracker keeps its own seeding (``seed + 2718 + tp_rank`` for the
    model-parallel state), so dropout stays seeded and TP-rank-aware.
    """
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )

    class _DropSameGeneratorWarning(logging.Filter):
        # fork() warns if the CPU generator moved inside a "GPU" RNG context;
        # on CPU the tracked generator *is* the CPU generator, so it always does.
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(random.__name__).addFilter(_DropSameGeneratorWarning())


def _patch_torch_norm(torch_norm) -> None:
    """Let torch LayerNorm/RMSNorm (local spec) run under sequence parallelism.

    The norm acts per token, so it is correct on a sequence shard; its weight
    grads are partial per TP rank, and megatron all-reduces the grads of params
    tagged ``sequence_parallel`` across TP (finalize_model_grads).
    """
    cls = torch_norm.WrappedTorchNorm
    real_new = cls.__new__

    def __new__(klass, config, *args, **kwargs):
        if not config.sequence_parallel:
            return real_new(klass, config, *args, **kwargs)
        no_sp = copy.copy(config)
        no_sp.sequence_parallel = False
        norm = real_new(klass, no_sp, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(__new__)


def _patch_batched_p2p(p2p) -> None:
    """``batch_p2p_comm=True`` uses megatron's unbatched P2P ops on CPU.

    With gloo, ``batch_isend_irecv`` matches the messages between two ranks in
    posting order.  With PP=2 the previous and the next stage are the same
    rank, so when the interleaved schedule sends and receives in both
    directions at once the tensors land in swapped buffers: wrong losses, no
    error.  ``_p2p_ops`` keeps the two directions apart (two process groups).
    """
    unbatched = p2p._p2p_ops

    def _batched_p2p_ops(**kwargs):
        return list(unbatched(**kwargs).values())

    p2p._batched_p2p_ops = _batched_p2p_ops


def _patch_sharded_tensor_init(mapping) -> None:
    """``ShardedTensor.init_data("cuda")`` (fully parallel load) allocates on CPU.

    Its default ``init_fn=torch.empty`` is bound at import, out of reach of the
    torch stand-in, so the device argument is redirected here instead.
    """
    cls = mapping.ShardedTensor
    real_init_data = cls.init_data

    @functools.wraps(real_init_data)
    def init_data(self, device, *args, **kwargs):
        return real_init_data(self, "cpu" if _is_cuda_device(device) else device, *args, **kwargs)

    cls.init_data = init_data


def _patch_hybrid_final_norm(hybrid_block) -> None:
    """``HybridStack`` builds its final norm with ``TENorm`` whatever its spec says (0.19: "Hybrid always
    uses TransformerEngine"); without TE that raises ImportError. megatron-core's torch norm takes the same
    arguments (config, hidden_size, eps) and follows ``config.normalization`` as TENorm does."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def _patch_moe_gemm_without_te(moe_utils) -> None:
    """The MoE router's gating GEMM tests ``te_general_gemm is not None``, a name bound only when
    TransformerEngine imports: without TE it is a NameError. Bind it to None, so torch.mm runs."""
    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# 3. module -> (attributes it must have, patch function); see each docstring.
_SINGLE_PATCHES = {
    "megatron.core.transformer.moe.moe_utils": (("RouterGatingLinearFunction",), _patch_moe_gemm_without_te),
    "megatron.core.tensor_parallel.random": (
        ("_get_cuda_rng_state", "_set_cuda_rng_state"), _patch_rng_tracker),
    "megatron.core.transformer.torch_norm": (("WrappedTorchNorm",), _patch_torch_norm),
    "megatron.core.pipeline_parallel.p2p_communication": (
        ("_batched_p2p_ops", "_p2p_ops"), _patch_batched_p2p),
    "megatron.core.dist_checkpointing.mapping": (("ShardedTensor",), _patch_sharded_tensor_init),
    # (since 0.19: HybridModel; the third item is the first megatron-core version that has the module)
    "megatron.core.models.hybrid.hybrid_block": (("TENorm", "HybridStack"), _patch_hybrid_final_norm, (0, 19, 0)),
}


# --------------------------------------------------------------------------
def _check_version() -> None:
    """Refuse a megatron-core LET does not support; warn once for one the CPU redirections were not tested
    with (the versions are megatron_let.megatron_versions', so a tested version never warns)."""
    found = megatron_versions.core_version()
    if not megatron_versions.is_supported(found):
        raise RuntimeError(f"megatron_let.compat.cpu supports megatron-core {megatron_versions.supported_range()}; "
                           f"found {found}.")
    if not megatron_versions.is_tested(found):
        warnings.warn(f"megatron_let.compat.cpu was verified with megatron-core "
                      f"{', '.join(megatron_versions.TESTED)}; found {found}. Run tests/cpu_compat_smoke.py "
                      "before trusting CPU results.", stacklevel=3)


def enable_cpu_megatron() -> bool:
    """Apply the CPU redirections if CUDA is unavailable (idempotent).

    Returns True if it patched anything (i.e. on the first call on a CPU-only
    machine), False otherwise.  Raises RuntimeError for a megatron-core that is
    too old or whose layout no longer matches the tables above.
    """
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return False
    _check_version()

    try:  # resolve every target first, so a layout change patches nothing
        modules = [importlib.import_module(name) for name in _TORCH_ON_CPU_MODULES]
        for module in modules:
            if vars(module).get("torch") is not torch:
                raise AttributeError(f"{module.__name__} has no global 'torch'")
        wrap_targets = [_resolve(name, path) for name, path in _CUDA_LOOKING_TENSORS]
        single = []
        for name, (attrs, patch, *since) in _SINGLE_PATCHES.items():
            if since and not megatron_versions.in_versions(since=since[0]):
                continue
            module = importlib.import_module(name)
            for attr in attrs:
                getattr(module, attr)
            single.append((patch, module))
    except (ImportError, AttributeError, KeyError) as exc:
        raise RuntimeError(
            f"megatron_let.compat.cpu: megatron-core {megatron_versions.core_version()} does not "
            f"have the layout this module patches ({exc!r})."
        ) from exc

    stand_in = _TorchOnCpu()
    for module in modules:
        module.torch = stand_in
    for owner, attr, raw in wrap_targets:
        _wrap(owner, attr, raw)
    for patch, module in single:
        patch(module)
    _ENABLED = True
    _log.info("megatron-core CPU redirections enabled")
    return True
