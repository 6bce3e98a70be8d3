"""Teacher-feature normalisation (``--let-teacher-norm``), applied to the teacher's states right before
the cosine.

Real LLM teachers put most of their final-layer energy in a few "massive activation" dimensions
(SmolLM2-135M: 54% in 16 of 576), so ``mean(1 - cos)`` is mostly met by copying those few.

* ``none`` (the paper): the teacher's states as they are.
* ``layernorm``: each token's vector centred and scaled over its dimensions (no parameters, no state).
* ``center``: the teacher's mean state subtracted (per dimension, no scaling). Massive activations are
  largely constant over tokens (SmolLM2-135M: the mean state is 36% of its energy; any two of its
  states have cosine 0.37 on average), so a constant output already meets much of ``1 - cos``;
  centring leaves only what varies from token to token, the dimensions keeping their own scales.
  Measured (docs/convergence.md, issue 14): at CPU scale every normalisation here costs gain; ``none`` stays default.
* ``standardize``: each DIMENSION centred and scaled by the teacher's own mean and std over tokens, so
  every feature counts alike.

``center`` and ``standardize`` estimate their statistics the same way: sums over every token of the
first ``--let-teacher-norm-iters`` iterations, all-reduced over the ranks that hold different tokens
(data parallel, and TP under sequence parallel / CP), so every rank and every layout holds the same
numbers; iteration t uses the sums of iterations < t (the first iteration only measures: it adds no LET
loss), then they are frozen. They are buffers of the ``let_alignment`` submodule: saved in the sharded
checkpoint (replicated), so a resume continues exactly. After the stop step the hook is gone and they
are never used again.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_let.config import TEACHER_NORMS
ESTIMATED = ("center", "standardize")  # modes with statistics: estimated, frozen, checkpointed


class TeacherFeatureNorm(nn.Module):
    """``norm(teacher [s, b, h], mask [s, b], groups)`` -> normalised teacher states (fp32), or None while
    ``center`` / ``standardize`` have no statistics yet (the first iteration)."""

    def __init__(self, mode: str, size: int, estimate_iters: int = 20):
        super().__init__()
        if mode not in TEACHER_NORMS:
            raise ValueError(f"unknown teacher norm {mode!r}")
        self.mode, self.size, self.estimate_iters = mode, size, estimate_iters
        self.iteration = 0
        self._mean = self._inv_std = None
        if mode in ESTIMATED:  # float64 sums: identical on every rank, layouts differ only by rounding;
            # both modes keep all three, so their checkpoints share one layout (center's holds the std too)
            self.register_buffer("token_count", torch.zeros((), dtype=torch.float64))
            self.register_buffer("feature_sum", torch.zeros(size, dtype=torch.float64))
            self.register_buffer("feature_sq_sum", torch.zeros(size, dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (Float16Module's ``.bfloat16()``) do not: the sums stay fp64."""
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def begin_iteration(self, iteration: int) -> None:
        """Freeze the statistics iteration ``iteration`` uses: the sums of every iteration before it."""
        self.iteration = iteration
        if self.mode not in ESTIMATED or (self._mean is not None and iteration > self.estimate_iters):
            return  # frozen: nothing to recompute
        if self.token_count.item() == 0:
            self._mean = self._inv_std = None
            return
        mean = self.feature_sum / self.token_count
        self._mean = mean.float()
        if self.mode == "standardize":  # center only subtracts the mean
            var = (self.feature_sq_sum / self.token_count - mean * mean).clamp(min=0)
            eps = 1e-6 * var.mean().clamp(min=1e-30)  # dead dimensions stay finite
            self._inv_std = (var + eps).rsqrt().float()

    @property
    def estimating(self) -> bool:
        return self.mode in ESTIMATED and self.iteration < self.estimate_iters

    def forward(self, teacher: torch.Tensor, mask: torch.Tensor,
                groups: Iterable[Optional[dist.ProcessGroup]] = ()) -> Optional[torch.Tensor]:
        if self.mode == "none":
            return teacher
        x = teacher.float()
        if self.mode == "layernorm":
            return F.layer_norm(x, (x.shape[-1],))
        if self.estimating:
            self._accumulate(x, mask, groups)
        if self._mean is None:
            return None
        centred = x - self._mean.to(x.device)
        return centred if self.mode == "center" else centred * self._inv_std.to(x.device)

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor, mask: torch.Tensor, groups) -> None:
        flat, weight = x.reshape(-1, x.shape[-1]).double(), mask.reshape(-1, 1).to(torch.float64)
        sums = torch.cat([weight.sum().reshape(1), (flat * weight).sum(0), (flat * flat * weight).sum(0)])
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sums, group=group)
        sums = sums.to(self.token_count.device)
        self.token_count += sums[0]
        self.feature_sum += sums[1:1 + self.size]
        self.feature_sq_sum += sums[1 + self.size:]


@torch.no_grad()
def feature_energy_report(teacher: torch.Tensor, mask: torch.Tensor, tops=(1, 16)) -> str:
    """'top 1 / top 16 of 576 dims hold 14% / 54% of the energy, the mean state 36%' for masked teacher
    states [s, b, h]: concentration in a few dimensions, and how much of it is constant over tokens
    (what ``center`` removes)."""
    x = teacher.float().reshape(-1, teacher.shape[-1])
    weight = mask.reshape(-1, 1).to(x.dtype)
    energy = (x * x * weight).sum(0).sort(descending=True).values
    total = energy.sum().clamp(min=1e-30)
    count = weight.sum().clamp(min=1)
    mean_state = (x * weight).sum(0) / count
    tops = [t for t in tops if t < energy.numel()]
    shares = [100 * energy[:t].sum().item() / total.item() for t in tops]
    constant = 100 * (count * mean_state.square().sum()).item() / total.item()
    return (f"top {' / top '.join(map(str, tops))} of {energy.numel()} dims hold "
            f"{' / '.join(f'{s:.0f}%' for s in shares)} of the energy, the mean state {constant:.0f}%")
