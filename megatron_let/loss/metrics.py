"""LET scalars: accumulated where the target layer lives, reduced to every rank for logging."""

from typing import Dict, Optional

import torch
import torch.distributed as dist


class IntervalMean:
    """Mean of the values added since the last ``pop`` (a log interval's average of a per-iteration scalar)."""

    def __init__(self):
        self._sum, self._count = 0.0, 0

    def add(self, value: float) -> None:
        self._sum += value
        self._count += 1

    def pop(self) -> Optional[float]:
        """The mean, or None if nothing was added; starts the next interval."""
        if not self._count:
            return None
        mean = self._sum / self._count
        self._sum, self._count = 0.0, 0
        return mean


class LETMetrics:
    """Token-weighted sums of lambda * (1 - cos) and of cos since the last report.

    Sums are taken after the TP/CP reduction done in the hook, so each value is
    already the whole micro-batch's. ``report`` adds them over the pipeline
    group (only the stage owning layer k has non-zero sums) and the
    data-parallel group, so every rank returns the same numbers.
    """

    def __init__(self):
        self._sums: Optional[torch.Tensor] = None  # [weighted_loss_sum, cos_sum, tokens]

    def add(self, weighted_loss_sum: torch.Tensor, cos_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        values = torch.stack([weighted_loss_sum.detach().double(), cos_sum.detach().double(),
                              tokens.detach().double()])
        self._sums = values if self._sums is None else self._sums + values

    def report(self, lambda_: float, device: torch.device, groups=()) -> Dict[str, float]:
        """Reduce over ``groups`` (e.g. pipeline, data parallel), reset, return the log scalars."""
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        sums = sums.to(device)
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sums, group=group)
        self._sums = None
        loss_sum, cos_sum, tokens = sums.tolist()
        if tokens == 0:
            return {"let lambda": lambda_}
        return {"let loss": loss_sum / tokens, "let cos": cos_sum / tokens, "let lambda": lambda_}
