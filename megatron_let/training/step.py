"""One GPT micro-batch step (Megatron-LM's pretrain_gpt conventions) and one training iteration."""

from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_let.controller import LateToEarlyTraining
from megatron_let.driver import LETDriver
from megatron_let.megatron_versions import batch_on_this_cp_rank
from megatron_let.teachers.token_alignment import pop_alignment


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's three-value loss: summed masked loss, token count, and the logging pair."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.float().view(1)])}


def forward_step(data_iterator: Iterator, model, let: Optional[LateToEarlyTraining] = None):
    """Fetch this micro-batch on every stage (LET's stage needs the tokens too), then run the chunk."""
    batch = dict(next(data_iterator))
    alignment = pop_alignment(batch)  # full-sequence, kept out of CP slicing
    batch = batch_on_this_cp_rank(batch)
    if let is not None:
        let.set_microbatch(batch["tokens"], batch["loss_mask"], alignment)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def reduce_lm_loss(losses_reduced: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """[summed LM loss, token count] over micro-batches, DP ranks and pipeline stages, on every rank."""
    pair = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses_reduced:
            pair += item["lm loss"].double().cpu()
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        pair = pair.to(device)
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(pair, group=parallel_state.get_pipeline_model_parallel_group())
        pair = pair.cpu()
    return pair


def run_schedule(data_iterator, model: List, let: Optional[LateToEarlyTraining], num_microbatches: int,
                 seq_length: int, micro_batch_size: int, forward_only: bool = False) -> torch.Tensor:
    """megatron-core's schedule for this layout over all micro-batches; returns the LM loss pair."""
    losses_reduced = get_forward_backward_func()(
        forward_step_func=partial(forward_step, let=let),
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return reduce_lm_loss(losses_reduced)


def train_step(data_iterator, model: List, optimizer, driver: LETDriver, iteration: int, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> Dict[str, float]:
    """One iteration: LET's begin (spread: the teacher over the group), the schedule's forward/backward over all
    micro-batches, LET's end (non-finite policy), the optimizer step. Returns the iteration's lm loss, grad norm
    and whether the step was skipped; LET's scalars accumulate until ``driver.scalars()`` at log time."""
    data_iterator = driver.begin_iteration(iteration, num_microbatches, data_iterator)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    pair = run_schedule(data_iterator, model, driver.let, num_microbatches, seq_length, micro_batch_size)
    metrics = {"lm loss": (pair[0] / pair[1]).item() if pair[1] > 0 else None}
    if driver.end_iteration(iteration):
        return {**metrics, "grad norm": None, "skipped": 1.0}
    update_successful, grad_norm, _ = optimizer.step()
    return {**metrics, "grad norm": grad_norm, "skipped": 0.0 if update_successful else 1.0}
