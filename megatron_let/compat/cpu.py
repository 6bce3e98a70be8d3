"""Run megatron-core on a machine without CUDA (gloo backend): the registry group ``cpu-core``.

megatron-core hard-codes CUDA where CPU training reaches it (``device="cuda"`` allocations,
``torch.cuda.synchronize()``, the CUDA RNG state, ``Tensor.cuda()``, ``param.type() == "torch.cuda.FloatTensor"``).
:func:`enable_cpu_megatron` redirects exactly those, at run time and only when ``torch.cuda.is_available()`` is
False; no Megatron file is edited or copied. Each entry below says what it changes and why
(:mod:`megatron_let.patch_registry`; the two mechanisms are :mod:`megatron_let.compat.cuda_on_cpu`'s).

tests/cpu_compat_smoke.py checks the result: TP, TP+SP, PP, interleaved PP, DP, the distributed optimizer,
torch_dist and fully parallel save/load reproduce the single-process losses and grad norms (< 1e-6 relative,
fp32). Not covered (CUDA-only code, not a redirection): TransformerEngine, context parallelism, CUDA graphs,
several distributed-optimizer instances, overlapped communication streams, optimizer CPU offloading, fp16
loss scaling, async save.

On CPU the RNG tracker's default state *is* torch's global generator, which weight init, dropout outside TP
regions and a DataLoader without its own generator share: give data loaders their own ``torch.Generator``.
The torch_dist saver starts a helper process that re-imports ``__main__``: guard scripts with
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import sys
import types

import torch

from megatron_let.compat.cuda_on_cpu import as_if_cuda_entry, is_cuda_device, torch_on_cpu
from megatron_let.patch_registry import apply_patches, register_patch

__all__ = ["enable_cpu_megatron"]

_log = logging.getLogger(__name__)
_ENABLED = False
GROUP = "cpu-core"
_TRITON_MODULE = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


@register_patch("cpu.triton-stub", group=GROUP, target="megatron.core.transformer.custom_layers",
                why="megatron.training.initialize imports batch_invariant_kernels, which imports triton (absent "
                    "without CUDA): a stub whose enable_batch_invariant_mode refuses (a CUDA kernel feature). "
                    "Here, not in cpu-training, because resolving cpu-training's targets imports megatron.training")
def _triton_stub(custom_layers, context):
    if _TRITON_MODULE in sys.modules:
        return
    try:
        importlib.import_module("triton")
        return
    except ImportError:
        pass

    def enable_batch_invariant_mode(*args, **kwargs):
        raise RuntimeError("--batch-invariant-mode needs triton and CUDA; not available on CPU.")

    stub = types.ModuleType(_TRITON_MODULE, "megatron_let CPU stub: the real module needs triton (CUDA).")
    stub.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules[_TRITON_MODULE] = stub


for _module, _why in {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor and the local multi_tensor_l2_norm (grad norm) "
                           "allocate on CUDA",
    "megatron.core.transformer.utils": "get_default_causal_mask: device='cuda'",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq / rotary freqs moved to "
                                                                    "torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/reduce-scatter outputs on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random": "the RNG tracker seeds and reads the torch.cuda RNG state",
    "megatron.core.pipeline_parallel.schedules": "token counter torch.zeros(..., device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "shape/recv buffers on torch.cuda.current_device(); "
                                                         "torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "param/grad buffers on torch.cuda.current_device(); "
                                                       "0.19 orders the all-reduce on current_stream()",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather/scatter buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.clip_grads": "grad-norm / zero-count tensors on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "the writer calls torch.cuda.synchronize "
                                                                    "after the host copy",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save verification all-reduce on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange buffers on 'cuda'",
    "megatron.core.transformer.moe.router": "router weights moved to and aux-loss tensors built on "
                                            "torch.cuda.current_device()",
    "megatron.core.transformer.moe.experts": "expert weights on torch.cuda.current_device()",
    "megatron.core.transformer.moe.moe_utils": "aux-loss tracker values on 'cuda'",
}.items():
    torch_on_cpu(GROUP, _module, _why)

for _target, _why in {
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups":
        "raises TypeError unless param.type() is torch.cuda.{Float,Half,BFloat16}Tensor",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero":
        "fully reshardable save with --overlap-param-gather: gathered buffers moved with .cuda()",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__":
        "the same type() check for bf16/fp16 params",
    "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32":
        "asserts grad.type() == 'torch.cuda.FloatTensor' (the name optimizer.py calls)",
    "megatron.core.dist_checkpointing.strategies.fully_parallel:exchange_by_distribution":
        "fully parallel load: exchanged shards are moved with .cuda()",
    "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer":
        "weight.data.cuda() before the tied-embedding all-reduce (PP > 1)",
}.items():
    as_if_cuda_entry(GROUP, _target, _why, type_names=True)


@register_patch("cpu.rng-tracker-on-cpu-generator", group=GROUP,
                target="megatron.core.tensor_parallel.random:_set_cuda_rng_state",
                why="fork() and activation recompute swap the tracker's states with _get/_set_cuda_rng_state: "
                    "they act on the CPU generator (the tracker keeps its seeding, seed + 2718 + tp_rank, so "
                    "dropout stays TP-rank-aware); fork()'s 'CPU RNG state changed within GPU RNG context' "
                    "warning is dropped, the tracked generator being the CPU one")
def _rng_tracker(random, context):
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    class _DropSameGeneratorWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(random.__name__).addFilter(_DropSameGeneratorWarning())


@register_patch("cpu.torch-norm-sequence-parallel", group=GROUP,
                target="megatron.core.transformer.torch_norm:WrappedTorchNorm",
                why="torch LayerNorm/RMSNorm (local spec) refuse sequence parallelism; a norm acts per token, so "
                    "it is built without it and its params are tagged sequence_parallel (their partial grads "
                    "are all-reduced across TP by finalize_model_grads)")
def _torch_norm(torch_norm, context):
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


@register_patch("cpu.unbatched-p2p", group=GROUP,
                target="megatron.core.pipeline_parallel.p2p_communication:_batched_p2p_ops",
                why="on gloo batch_isend_irecv matches two ranks' messages in posting order: with PP=2 the "
                    "previous and next stage are one rank, and the interleaved schedule's two-way exchanges "
                    "land in swapped buffers (wrong losses, no error); batch_p2p_comm=True uses the unbatched "
                    "_p2p_ops, which keeps the directions apart")
def _unbatched_p2p(p2p, context):
    unbatched = p2p._p2p_ops
    p2p._batched_p2p_ops = lambda **kwargs: list(unbatched(**kwargs).values())


@register_patch("cpu.sharded-tensor-init-on-cpu", group=GROUP,
                target="megatron.core.dist_checkpointing.mapping:ShardedTensor.init_data",
                why='fully parallel load calls ShardedTensor.init_data("cuda"), whose init_fn=torch.empty is '
                    "bound at import (out of the torch stand-in's reach): the device becomes cpu")
def _sharded_tensor_init(mapping, context):
    real_init_data = mapping.ShardedTensor.init_data

    @functools.wraps(real_init_data)
    def init_data(self, device, *args, **kwargs):
        return real_init_data(self, "cpu" if is_cuda_device(device) else device, *args, **kwargs)

    mapping.ShardedTensor.init_data = init_data


@register_patch("cpu.moe-gemm-without-te", group=GROUP,
                target="megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction",
                why="the router's gating GEMM tests te_general_gemm is not None, a name bound only when "
                    "TransformerEngine imports (a NameError without it): bound to None, torch.mm runs")
def _moe_gemm(moe_utils, context):
    vars(moe_utils).setdefault("te_general_gemm", None)


@register_patch("cpu.hybrid-final-norm", group=GROUP, since="0.19",
                target="megatron.core.models.hybrid.hybrid_block:TENorm",
                why="HybridStack builds its final norm with TENorm whatever its spec says ('Hybrid always uses "
                    "TransformerEngine'): megatron-core's torch norm takes the same arguments and follows "
                    "config.normalization")
def _hybrid_final_norm(hybrid_block, context):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def enable_cpu_megatron() -> bool:
    """Apply the ``cpu-core`` entries if CUDA is unavailable (idempotent): True if it patched (the first call
    on a machine without CUDA). Raises :class:`~megatron_let.patch_registry.PatchTargetMissing`, naming the
    entry, for a megatron-core whose layout moved (before patching anything)."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return False
    count = apply_patches(GROUP)
    _ENABLED = True
    _log.info("megatron-core CPU redirections enabled (%d patches)", count)
    return True
