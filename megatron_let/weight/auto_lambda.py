"""``--let-lambda auto``: the alignment's weight set from the run, as a fraction of the LM loss's pull.

The rule (docs/auto-lambda.md). At layer k's output h_k two gradients arrive in the backward pass: the
LM loss's (``g_LM``, from the layers above; exactly the ``grad_output`` LET's autoscaler receives) and
the alignment loss's at unit weight (``g_A``: d(alignment loss)/d h_k with the schedule's own factors,
one ``torch.autograd.grad`` over the small projector + cosine graph in the forward hook). Over one
iteration (every micro-batch, every rank) their norms give

    r_t = ||g_LM||_t / ||g_A||_t,    log R_t = beta log R_(t-1) + (1 - beta) log r_t  (R = r_1 at first),

and the weight of the step starting at iteration s is

    lambda(s) = fraction * R_(s-1) * decay(s),   decay(s) = the --let-schedule shape with lambda0 = 1,

so the alignment's pull at h_k, ``lambda * ||g_A||``, stays ``fraction * decay(s)`` of the LM's, and reaches
0 at the stop step exactly as a fixed lambda does. The EMA is taken of log r (a geometric mean): r is a
ratio, and an LM loss spike that multiplies ||g_LM|| by 10 for one iteration then moves R by 10^(1-beta)
(x1.26), not by +10% of the spike (x4.6 in the CPU smoke run, docs/auto-lambda.md). The first LET iteration only measures (weight 0: no
ratio is known before a backward pass, and no extra backward is run to get one). Measuring costs one small
autograd call per micro-batch and one all-reduce of a few numbers per iteration, riding on the end-of-
iteration collective both trainers already run (``LateToEarlyTraining.nonfinite_ranks``).

Reduction (megatron_let/loss/probe.py measures both gradients: ``GradientProbe.contribution``): the norms are
sums of squares over the whole global batch, as the gradient norm is a sum of squares over every parameter
shard, then one all-reduce over all ranks:

- pipeline: only the stage (model chunk) holding layer k has h_k; both gradients live there (the LM's
  arrives there through the pipeline's backward p2p), so other stages contribute 0;
- tensor parallel without sequence parallelism: h_k and both gradients are replicated on every TP rank
  (the next layer's column-parallel input all-reduces its gradient), so only TP rank 0 contributes, as
  the grad norm counts a TP-duplicated parameter once; with sequence parallelism h_k is split over the
  sequence across TP ranks: every rank contributes its tokens;
- context parallel: each CP rank holds its own tokens of h_k: every rank contributes;
- data parallel: each replica ran its own micro-batches of the global batch: every replica contributes.

Both gradients carry the same schedule factors (loss scale, cp / num_microbatches, or the per-token
normalisation), so r_t is free of them, of the layout and of fp16's dynamic loss scale; the EMA of the
ratio therefore resumes exactly under another layout. An iteration whose ratio is not finite (an fp16
overflow, no token in the batch) or that some rank flagged non-finite leaves the EMA unchanged.

State: ``state`` (``ema_log_ratio``, ``updates``) is a plain dict mutated in place; LET's checkpoint state
holds this very dict (``launch.let_state``), so Megatron-LM, which keeps that state in ``args`` and pickles
it at every save, saves the current value without a hook of its own.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from megatron_let.config import DEFAULT_LAMBDA_AUTO_FRACTION
from megatron_let.loss.probe import pull_ratio

EMA_BETA = 0.9  # weight of the history per iteration (~10 iterations of memory); not a flag


class AutoLambda:
    """Keeps the smoothed ratio of the two pulls at layer k (measured by megatron_let/loss/probe.py), gives the weight."""

    def __init__(self, fraction: float = DEFAULT_LAMBDA_AUTO_FRACTION, beta: float = EMA_BETA):
        self.fraction = float(fraction)
        self.beta = float(beta)
        self.state: Dict[str, object] = {"ema_log_ratio": None, "updates": 0}  # mutated in place only

    # -- weight --------------------------------------------------------------------------------
    @property
    def scale(self) -> Optional[float]:
        """fraction * R, or None before the first measurement (that iteration only measures)."""
        log_ratio = self.state["ema_log_ratio"]
        return None if log_ratio is None else self.fraction * math.exp(log_ratio)

    def weight(self, decay: float) -> float:
        """The effective lambda of an iteration whose schedule shape (lambda0 = 1) is ``decay``."""
        scale = self.scale
        return 0.0 if scale is None or decay == 0.0 else scale * decay

    # -- end of iteration (every rank, the same reduced numbers) -----------------------------------
    def update(self, sums, skip: bool = False) -> Optional[float]:
        """Fold one iteration's all-reduced ``sums`` [lm_sq, align_sq, ...] (the probe's) into the EMA; returns
        r_t or None (nothing measured, not finite, or ``skip``). Pure Python floats: identical on every rank."""
        if skip:
            return None
        ratio = pull_ratio(sums)
        if ratio is None:
            return None
        previous, log_ratio = self.state["ema_log_ratio"], math.log(ratio)
        self.state["ema_log_ratio"] = log_ratio if previous is None else \
            self.beta * previous + (1.0 - self.beta) * log_ratio
        self.state["updates"] = int(self.state["updates"]) + 1
        return ratio

    # -- checkpoint ------------------------------------------------------------------------------
    def load_state_dict(self, saved: Optional[dict]) -> None:
        """Continue a checkpoint's EMA (in place: the checkpoint state holds this dict)."""
        if saved:
            self.state.update({"ema_log_ratio": saved.get("ema_log_ratio"), "updates": int(saved.get("updates", 0))})
