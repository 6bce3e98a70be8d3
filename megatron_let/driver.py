"""LETDriver: LET's per-iteration work, written once for every training loop.

A loop (Megatron-LM's ``pretrain()``, the lean trainer, Megatron-Bridge's ``pretrain()``) calls on every rank::

    data_iterator = driver.begin_iteration(iteration, num_microbatches, data_iterator)  # before the schedule
    ...the schedule's forward step hands layer k's stage its micro-batch (let.set_microbatch)...
    if driver.end_iteration(iteration):          # after backward, before the optimizer step
        skip the optimizer step                  # --let-on-nonfinite skip
    log(driver.scalars())                        # "let loss", "let cos", "let lambda", ...
    checkpoint["let"] = driver.checkpoint_state()

and :meth:`strip_for_export` before writing ``--let-export-dir``. Every collective LET needs runs in these
calls, in the same order on every rank, never inside the schedule's forward step (where ranks of different
pipeline stages are at different micro-batches).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_let.controller import LateToEarlyTraining
from megatron_let.errors import LETNonFiniteError


# LET scalars that may be <= 0, which the loops' log lines drop (Megatron-LM up to 0.18 prints a loss-dict entry
# only when its interval average is > 0; 0.19 and Bridge >= 0): "let lambda" and so "let loss" are 0 in
# --let-lambda auto's first iteration (it only measures), the cosines may be negative.
SIGNED_SCALARS = ("let loss", "let cos", "let lambda", "let grad cos")
_REPORT_ORDER = ("let loss", "let cos", "let lambda", "let ratio", "let grad cos")


class LETDriver:
    """The loop-facing side of one process's :class:`LateToEarlyTraining` (``let``; None: LET off, every call
    passes through)."""

    def __init__(self, let: Optional[LateToEarlyTraining], micro_batch_size: int, seq_length: int,
                 log: Callable[[str], None]):
        self.let = let
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.log = log  # one line on the logging rank (Megatron-LM's print_rank_last)
        self._placement_reported = False
        self._signed = {key: [0.0, 0] for key in SIGNED_SCALARS}  # [sum, iterations] over the log interval

    @property
    def active(self) -> bool:
        """LET runs (before its stop step); False once the teacher is released, and without LET."""
        return self.let is not None and not self.let.finished

    # -- iteration -----------------------------------------------------------------------------------
    def begin_iteration(self, iteration: int, num_microbatches: int, data_iterator, precompute: bool = True):
        """lambda for the step starting at ``iteration`` (0-based); with ``--let-teacher-placement spread``,
        the iteration's micro-batches are read up front where an iterator exists, their tokens given to every
        rank of the replica's model-parallel group, and each rank runs its share of the teacher. Returns the
        iterator(s) the schedule must read: the same micro-batches, replayed."""
        if not self.active:
            return data_iterator
        self.let.begin_iteration(iteration, num_microbatches)
        if not (precompute and self.let.spreads_teacher):
            return data_iterator
        from megatron.core.rerun_state_machine import RerunDataIterator

        iterators = list(data_iterator) if isinstance(data_iterator, list) else [data_iterator]
        batches = None
        for i, iterator in enumerate(iterators):
            if iterator is not None:  # every chunk's iterator yields the same micro-batches
                read = [next(iterator) for _ in range(num_microbatches)]
                batches = batches or read
                iterators[i] = RerunDataIterator(iter(read))
        tokens = None if batches is None else torch.cat([batch["tokens"] for batch in batches])
        self.let.precompute_teacher(self._tokens_from_group(tokens, num_microbatches), self.micro_batch_size)
        self._report_placement()
        return iterators if isinstance(data_iterator, list) else iterators[0]

    def _tokens_from_group(self, tokens: Optional[torch.Tensor], num_microbatches: int) -> torch.Tensor:
        """The iteration's tokens on every rank of the replica's model-parallel group, from its lowest rank
        that read them (Megatron-LM reads batches on some stages and TP ranks only)."""
        from megatron.core import parallel_state

        from megatron_let.loss.placement import replica_group

        device = current_device()
        group = replica_group(parallel_state.get_context_parallel_world_size())
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        source = torch.tensor([rank if tokens is not None else size], device=device)
        dist.all_reduce(source, op=dist.ReduceOp.MIN, group=group)
        if int(source.item()) == size:
            raise RuntimeError("LET spread placement: no rank of the model-parallel group has a data iterator.")
        tokens = tokens.to(device) if tokens is not None else \
            torch.empty((num_microbatches * self.micro_batch_size, self.seq_length), dtype=torch.int64, device=device)
        dist.broadcast(tokens, src=dist.get_global_rank(group, int(source.item())), group=group)
        return tokens

    def _report_placement(self) -> None:
        """Once: the teacher's rows per rank of the group in the first iteration (the split really happened)."""
        if self._placement_reported:
            return
        from megatron.core import parallel_state

        from megatron_let.loss.placement import gather_counts, replica_group

        self._placement_reported = True
        group = replica_group(parallel_state.get_context_parallel_world_size())
        rows = [int(r) for r in gather_counts(self.let.work.rows, group, current_device())]
        self.log(f" LET spread placement: teacher sequences per rank of the model-parallel group in the first "
                 f"iteration: {rows}")

    def end_iteration(self, iteration: int) -> bool:
        """After the backward pass, before the optimizer step, on every rank (a collective): True when the
        step must be skipped (``--let-on-nonfinite skip`` and a NaN/Inf alignment loss on some rank);
        ``--let-on-nonfinite error`` raises :class:`LETNonFiniteError` naming the iteration and ranks."""
        if not self.active:
            return False
        bad_ranks = self.let.nonfinite_ranks()  # also the probe's all-reduce (--let-lambda / --let-stop auto)
        if not bad_ranks:
            return False
        if self.let.config.on_nonfinite == "error":
            raise LETNonFiniteError(
                f"non-finite LET alignment loss at iteration {iteration + 1} on rank(s) {bad_ranks}: the teacher "
                f"({self.let.config.teacher}) produced NaN/Inf hidden states or the target diverged; use "
                "--let-on-nonfinite skip to skip such steps.")
        self.log(f" LET: non-finite alignment loss at iteration {iteration + 1} on rank(s) {bad_ranks}: "
                 "optimizer step skipped (--let-on-nonfinite skip)")
        return True

    # -- log, checkpoint, export ---------------------------------------------------------------------
    def scalars(self) -> Dict[str, float]:
        """LET's scalars since the last call, the same on every rank (a collective over PP and DP); after the stop
        step only ``let lambda`` (0). Empty without LET."""
        return self.let.report() if self.let is not None else {}

    def scalars_into(self, loss_dict: dict, skipped: bool) -> None:
        """:meth:`scalars` as tensors in the iteration's ``loss_dict`` (while LET runs), which Megatron-LM's and
        Bridge's ``training_log`` average over the log interval into their line, TensorBoard and W&B."""
        if not self.active:
            return
        for key, value in self.scalars().items():
            loss_dict[key] = torch.tensor(value, dtype=torch.float32, device=current_device())
            if key in self._signed and not skipped:
                self._signed[key][0] += value
                self._signed[key][1] += 1

    def signed_scalars_into_line(self, message):
        """The log line with the interval averages of :data:`SIGNED_SCALARS` the loop's ``training_log`` dropped,
        where it would have printed them (in ``LateToEarlyTraining.report``'s order); other messages unchanged."""
        if not (isinstance(message, str) and " consumed samples:" in message):
            return message
        for key, (total, count) in self._signed.items():
            if count and f" {key}:" not in message:
                later = _REPORT_ORDER[_REPORT_ORDER.index(key) + 1:]
                anchor = next((f" {k}:" for k in later if f" {k}:" in message), " loss scale:")
                message = message.replace(anchor, f" {key}: {total / count:.6E} |{anchor}", 1)
            self._signed[key] = [0.0, 0]
        return message

    def checkpoint_state(self) -> Optional[dict]:
        """What a checkpoint keeps of LET (:meth:`LateToEarlyTraining.checkpoint_state`); None without LET."""
        return None if self.let is None else self.let.checkpoint_state()

    def strip_for_export(self, model: List) -> None:
        """--let-export-dir: LET ends here and the chunks lose their alignment module (the projector), so the
        export is a plain Megatron checkpoint."""
        if self.let is not None:
            self.let.finish()
        for chunk in model:
            while hasattr(chunk, "module"):
                chunk = chunk.module
            if hasattr(chunk, "let_alignment"):
                del chunk.let_alignment


def current_device() -> torch.device:
    """This rank's device: its GPU, or the CPU without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
