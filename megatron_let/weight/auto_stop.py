"""``--let-stop auto``: stop LET once the alignment no longer helps the LM objective.

The rule (docs/auto-lambda.md, "Automatic stop"). At layer k's output h_k the probe (megatron_let/loss/probe.py)
measures, over every micro-batch of the global batch, the alignment loss's gradient ``g_A`` (at unit weight) and
the LM loss's ``g_LM`` (from the layers above). Everything the alignment does to layers 1..k goes through h_k, and
to first order a step along -g_A (what the alignment asks of layers 1..k) lowers the LM loss iff
<g_A, g_LM> > 0. Per iteration t

    cos_t = sum <g_A, g_LM> / sqrt(sum ||g_A||^2 * sum ||g_LM||^2)      (the global batch's two gradients)

is logged as ``let grad cos``. The first ``warmup`` iterations never count; once cos_t < ``threshold`` on
``window`` consecutive counted iterations, the last being iteration s of the log (1-based, as Megatron-LM
numbers it), s becomes LET's stop step, exactly as ``--let-stop-iter s`` would be: the weight is 0 from the
next iteration on and the teacher is released. The given stop step stays the latest stop (a window filling at
or after it changes nothing), and the schedule's decay towards it applies until then. An iteration without a
usable measurement (nothing measured, not finite, or a rank flagged non-finite) neither counts nor breaks the
window.

The decision is taken on every rank from the same all-reduced sums (Python floats), so every rank stops at
the same step. State: ``state`` (``stopped_at``, ``below``) is a plain dict mutated in place; LET's checkpoint
state holds this very dict (``launch.let_state``), as for --let-lambda auto: a resume continues the window, and
one past ``stopped_at`` stays stopped without reading the teacher.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from megatron_let.loss.metrics import IntervalMean
from megatron_let.loss.probe import ALIGN_SQ, DOT, LM_SQ


class AutoStop:
    """Counts the iterations whose cosine between g_A and g_LM at h_k is below the threshold; decides the stop."""

    def __init__(self, threshold: float, window: int, warmup: int):
        self.threshold, self.window, self.warmup = float(threshold), int(window), int(warmup)
        self.state: Dict[str, Optional[int]] = {"stopped_at": None, "below": 0}  # mutated in place only
        self._cos = IntervalMean()  # logging: "let grad cos" since the last report

    @classmethod
    def from_config(cls, config) -> "AutoStop":
        return cls(*(config.stop_auto_setting(name) for name in ("threshold", "window", "warmup")))

    @property
    def stopped_at(self) -> Optional[int]:
        """The iteration (0-based, as a stop step) from which LET is off, or None."""
        return self.state["stopped_at"]

    def update(self, sums, iteration: int, stop_iter: int, skip: bool = False) -> Optional[float]:
        """Fold the all-reduced probe ``sums`` of the step that started at ``iteration`` (0-based) in; returns
        cos_t, or None (nothing usable). When the window fills, ``stopped_at`` becomes ``iteration + 1`` (a stop
        step, as ``stop_iter``: the first step without LET), if that is before ``stop_iter``."""
        lm_sq, align_sq, dot = float(sums[LM_SQ]), float(sums[ALIGN_SQ]), float(sums[DOT])
        if skip or not (lm_sq > 0 and align_sq > 0) or not all(map(math.isfinite, (lm_sq, align_sq, dot))):
            return None
        cosine = dot / (math.sqrt(lm_sq) * math.sqrt(align_sq))
        self._cos.add(cosine)
        if self.stopped_at is not None or iteration < self.warmup:
            return cosine
        self.state["below"] = int(self.state["below"]) + 1 if cosine < self.threshold else 0
        if self.state["below"] >= self.window and iteration + 1 < stop_iter:
            self.state["stopped_at"] = iteration + 1
        return cosine

    def describe(self) -> str:
        return (f"LET stops automatically at iteration {self.stopped_at}: cos(g_align, g_LM) < {self.threshold:g} "
                f"for {self.window} iterations")

    def report(self) -> Dict[str, float]:
        """``let grad cos``: cos(g_A, g_LM) at layer k, averaged over the iterations since the last report."""
        value = self._cos.pop()
        return {} if value is None else {"let grad cos": value}

    def load_state_dict(self, saved: Optional[dict]) -> None:
        """Continue a checkpoint's window and decision (in place: the checkpoint state holds this dict)."""
        if saved:
            stopped = saved.get("stopped_at")
            self.state.update({"stopped_at": None if stopped is None else int(stopped),
                               "below": int(saved.get("below", 0))})
