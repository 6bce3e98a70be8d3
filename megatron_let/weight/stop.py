"""When LET stops: a fraction of training, a sample count or an iteration, on Megatron-LM's schedule.

Megatron-LM trains for ``--train-iters`` iterations or ``--train-samples`` samples, optionally
ramping the global batch size up (``--rampup-batch-size START INCR SAMPLES`` up to 0.18,
``--step-batch-size-schedule "THRESHOLD:BS ..."`` from 0.19, which ignores the former). LET's lambda is a
function of the iteration, so every form of the stop is resolved to the iteration at which lambda
reaches 0, with the global batch size megatron-core's own num-microbatches calculator gives at each
step (the calculator Megatron-LM's ``update_train_iters`` and training loop use):

- ``--let-stop-iter N``: iteration N;
- ``--let-stop-samples M``: the first iteration after which at least M samples were consumed;
- ``--let-stop-fraction F`` (default 0.25): F of ``--train-iters``, or, for sample-based runs,
  F of ``--train-samples`` as samples (Megatron-LM's lr schedule counts samples there too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_let.errors import LETConfigError

DEFAULT_STOP_FRACTION = 0.25


@dataclass
class TrainingSchedule:
    """The flags that fix how many samples each iteration consumes, named as in Megatron-LM."""

    train_iters: Optional[int]
    train_samples: Optional[int]
    global_batch_size: int
    micro_batch_size: int = 1
    data_parallel_size: int = 1
    rampup_batch_size: Optional[Sequence] = None
    decrease_batch_size_if_needed: bool = False
    step_batch_size_schedule: Optional[str] = None
    seq_length: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "TrainingSchedule":
        samples = getattr(args, "train_samples", None) or None
        # sample-based runs: train_iters is derived from the samples (Megatron-LM sets it late)
        return cls(train_iters=None if samples else getattr(args, "train_iters", None) or None,
                   train_samples=samples,
                   global_batch_size=args.global_batch_size,
                   micro_batch_size=getattr(args, "micro_batch_size", 1) or 1,
                   data_parallel_size=getattr(args, "data_parallel_size", 1) or 1,
                   rampup_batch_size=getattr(args, "rampup_batch_size", None) or None,
                   decrease_batch_size_if_needed=bool(getattr(args, "decrease_batch_size_if_needed", False)),
                   step_batch_size_schedule=getattr(args, "step_batch_size_schedule", None) or None,
                   seq_length=getattr(args, "seq_length", None))

    def __post_init__(self):
        from megatron_let.megatron_versions import rampup_calculator_class

        if self.rampup_batch_size and rampup_calculator_class() is None:
            self.rampup_batch_size = None  # this megatron-core ignores --rampup-batch-size, so must we

    @property
    def _varies(self) -> bool:
        return bool(self.rampup_batch_size or self.step_batch_size_schedule)

    def _calculator(self):
        """megatron-core's own calculator for these flags (the one the training loop uses)."""
        from megatron_let.megatron_versions import build_calculator

        return build_calculator(self)

    def batch_sizes(self, iterations: int) -> List[int]:
        """Global batch size of each of the first ``iterations`` iterations (as the training loop
        updates the calculator with the samples consumed so far before every step)."""
        calculator, consumed, sizes = self._calculator(), 0, []
        for _ in range(iterations):
            calculator.update(consumed, consistency_check=False)
            size = calculator.get_current_running_global_batch_size()
            sizes.append(size)
            consumed += size
        return sizes

    def samples_after(self, iterations: int) -> int:
        """Samples consumed when ``iterations`` iterations are done."""
        if not self._varies:
            return iterations * self.global_batch_size
        return sum(self.batch_sizes(iterations))

    def iteration_reaching(self, samples: int) -> int:
        """The first iteration count after which at least ``samples`` samples were consumed."""
        if not self._varies:
            return -(-samples // self.global_batch_size)
        calculator, consumed, iterations = self._calculator(), 0, 0
        while consumed < samples:
            calculator.update(consumed, consistency_check=False)
            consumed += calculator.get_current_running_global_batch_size()
            iterations += 1
        return iterations

    def total_iterations(self) -> Optional[int]:
        """``args.train_iters`` as Megatron-LM's ``update_train_iters`` derives it (its ramp-up loop
        and its flooring of the last partial batch included)."""
        if self.train_iters:
            return self.train_iters
        if not self.train_samples:
            return None
        if not self._varies:
            return self.train_samples // self.global_batch_size
        if self.step_batch_size_schedule:  # 0.19's update_train_iters: whole batches until the samples are reached
            return self.iteration_reaching(self.train_samples)
        calculator, iterations, consumed = self._calculator(), 0, 0
        while consumed <= int(self.rampup_batch_size[2]) and consumed <= self.train_samples:
            calculator.update(consumed, consistency_check=False)
            consumed += calculator.get_current_global_batch_size()
            iterations += 1
        if self.train_samples > consumed:
            iterations += (self.train_samples - consumed) // self.global_batch_size
        return iterations


@dataclass
class StopStep:
    iteration: int
    samples: int
    source: str  # how it was given, for the start-up line

    def describe(self) -> str:
        return f"LET stops at iteration {self.iteration} = sample {self.samples} ({self.source})"


def resolve_stop(config, schedule: TrainingSchedule) -> StopStep:
    """The stop step of ``config`` (a LETConfig) on ``schedule``; LETConfigError if it cannot be derived."""
    if config.stop_iter is not None:
        return StopStep(config.stop_iter, schedule.samples_after(config.stop_iter),
                        f"--let-stop-iter {config.stop_iter}")
    if config.stop_samples is not None:
        iteration = max(1, schedule.iteration_reaching(config.stop_samples))
        return StopStep(iteration, schedule.samples_after(iteration), f"--let-stop-samples {config.stop_samples}")
    fraction = DEFAULT_STOP_FRACTION if config.stop_fraction is None else config.stop_fraction
    given = f"--let-stop-fraction {fraction:g}" + ("" if config.stop_fraction is not None else " (default)")
    if schedule.train_iters:
        iteration = max(1, int(round(fraction * schedule.train_iters)))
        return StopStep(iteration, schedule.samples_after(iteration), f"{given} of --train-iters {schedule.train_iters}")
    if schedule.train_samples:
        samples = max(1, int(round(fraction * schedule.train_samples)))
        iteration = max(1, schedule.iteration_reaching(samples))
        return StopStep(iteration, schedule.samples_after(iteration),
                        f"{given} of --train-samples {schedule.train_samples}")
    raise LETConfigError("LET needs a stop step: give --let-stop-iter or --let-stop-samples, or "
                         "--train-iters / --train-samples for --let-stop-fraction.")
