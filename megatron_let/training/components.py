"""Small pieces shared by the lean trainer and the tests: process groups, DDP, optimizer."""

import os
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer


def initialize_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1, seed: int = 1234,
                        timeout_minutes: int = 10, ep: int = 1, etp: Optional[int] = None) -> None:
    """torch.distributed from torchrun's env (gloo without CUDA), then megatron's process groups.
    Without CUDA the launcher applies :mod:`megatron_let.compat` first."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)),
                                timeout=timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_parallel() -> None:
    """Leave the process groups together: exiting with gloo work still alive can abort a rank
    ("terminate called without an active exception") after training finished fine."""
    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def wrap_ddp(chunks: List[torch.nn.Module], use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False) -> List[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer)
    return [DistributedDataParallel(chunk.config, ddp_config, chunk,
                                    disable_bucketing=(index > 0))
            for index, chunk in enumerate(chunks)]


def build_optimizer(model: List[DistributedDataParallel], optimizer_config: OptimizerConfig):
    """megatron-core's optimizer, then the schedule hooks Megatron-LM wires into the config."""
    optimizer = get_megatron_optimizer(optimizer_config, model)
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if len(model) == 1:
        config.no_sync_func = model[0].no_sync
    else:
        config.no_sync_func = [chunk.no_sync for chunk in model]
    return optimizer
