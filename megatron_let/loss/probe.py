"""The two gradients at layer k's output h_k, measured per iteration for ``--let-lambda auto`` and ``--let-stop auto``.

In the backward pass of every micro-batch two gradients arrive at h_k: the LM loss's (``g_LM``, from the layers
above: the ``grad_output`` of LET's autoscaler) and the alignment loss's at unit weight (``g_A``, one
``torch.autograd.grad`` over the small projector + cosine graph in the forward hook). This rank's sums since the
iteration began, in fp64:

    [sum ||g_LM||^2, sum ||g_A||^2, sum <g_A, g_LM>]

The dot product is measured only for ``--let-stop auto`` (``dot=True``): it keeps g_A (one tensor of h_k's size,
in h_k's dtype) per micro-batch from its forward to its backward; without it nothing is kept and slot 2 stays 0.

Reduction (``contribution``): sums over the whole global batch, then one all-reduce over all ranks on the
end-of-iteration collective (``LateToEarlyTraining.nonfinite_ranks``): only the stage holding layer k has h_k
(others add 0); under tensor parallelism without sequence parallelism h_k and both gradients are replicated on
every TP rank, so only TP rank 0 adds (as the grad norm counts a TP-duplicated parameter once); with sequence
parallelism each TP rank adds its tokens; CP and DP ranks each add their own tokens / micro-batches.
docs/auto-lambda.md, "The reduction".
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

SLOTS = 3  # [sum ||g_LM||^2, sum ||g_A||^2, sum <g_A, g_LM>]
LM_SQ, ALIGN_SQ, DOT = range(SLOTS)


class GradientProbe:
    """This rank's per-iteration sums of the two gradients at h_k (no device sync inside the schedule)."""

    def __init__(self, dot: bool = False):
        self.dot = bool(dot)
        self._local: Optional[torch.Tensor] = None

    @staticmethod
    def contribution(sequence_parallel: bool, tp_size: int, tp_rank: int) -> float:
        """1 where this rank's part of h_k is its own, 0 for a TP replica's duplicate (module docstring)."""
        return 1.0 if sequence_parallel or tp_size == 1 or tp_rank == 0 else 0.0

    def measure(self, align_grad: torch.Tensor, weight: float = 1.0) -> Callable[[torch.Tensor], None]:
        """Add ``weight * ||g_A||^2`` now; return the callback the autoscaler's backward gives g_LM to (it adds
        ``weight * ||g_LM||^2`` and, with ``dot``, ``weight * <g_A, g_LM>``)."""
        self._add(ALIGN_SQ, align_grad.detach().double().pow(2).sum() * weight)
        kept = align_grad.detach() if self.dot else None

        def on_lm_grad(grad: torch.Tensor) -> None:
            lm = grad.detach().double()
            self._add(LM_SQ, lm.pow(2).sum() * weight)
            if kept is not None:
                self._add(DOT, (kept.double() * lm).sum() * weight)

        return on_lm_grad

    def _add(self, slot: int, value: torch.Tensor) -> None:
        if self._local is None:
            self._local = torch.zeros(SLOTS, dtype=torch.float64, device=value.device)
        self._local[slot] = self._local[slot] + value

    def take_local(self, device: torch.device) -> torch.Tensor:
        """This rank's sums since the last call (zeros if it measured nothing), then reset."""
        local, self._local = self._local, None
        return torch.zeros(SLOTS, dtype=torch.float64, device=device) if local is None else local.to(device)


def pull_ratio(sums) -> Optional[float]:
    """r = ||g_LM|| / ||g_A|| from all-reduced ``sums``, or None (nothing measured, not finite, or 0)."""
    lm_sq, align_sq = float(sums[LM_SQ]), float(sums[ALIGN_SQ])
    if not (lm_sq > 0 and align_sq > 0):
        return None
    ratio = math.sqrt(lm_sq) / math.sqrt(align_sq)
    return ratio if math.isfinite(ratio) else None
