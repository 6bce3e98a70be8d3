"""Paired comparison of a LET run with its baseline: loss at matched steps, steps to equal loss, plot.

A speed-up is the baseline's step count divided by the (linearly interpolated) step at which LET's
validation curve first reaches the baseline's loss at that step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple


def steps_to_reach(curve: Dict[int, float], level: float) -> Optional[Tuple[float, bool]]:
    """First step where the (linearly interpolated) validation curve reaches ``level``.

    Returns (step, exact): exact is False when already the first evaluation is at or below level (the
    curve before it is unknown: the step is an upper bound); None if never.
    """
    points = sorted(curve.items())
    if not points:
        return None
    if points[0][1] <= level:
        return points[0][0], False
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= level:
            return s0 + (s1 - s0) * (l0 - level) / (l0 - l1), True
    return None


def _reach(step: int, curve: Dict[int, float], level: float) -> dict:
    reach = steps_to_reach(curve, level)
    return {"let_steps_to_baseline": reach[0] if reach else None, "upper_bound": bool(reach and not reach[1]),
            "speedup": (step / reach[0]) if reach else None}


def paired_comparison(baseline_valid: Dict[int, float], let_valid: Dict[int, float]) -> dict:
    """``rows`` per common validation step and a ``summary`` at the last one."""
    steps = sorted(set(baseline_valid) & set(let_valid))
    rows = [{"step": s, "baseline": baseline_valid[s], "let": let_valid[s], "diff": let_valid[s] - baseline_valid[s],
             **_reach(s, let_valid, baseline_valid[s])} for s in steps]
    final = steps[-1]
    last = rows[-1]
    summary = {"final_step": final, "baseline_final_val": last["baseline"], "let_final_val": last["let"],
               "final_diff": last["diff"], "let_steps_to_baseline_final": last["let_steps_to_baseline"],
               "upper_bound": last["upper_bound"], "speedup": last["speedup"]}
    return {"rows": rows, "summary": summary}


def fmt_steps(row_or_summary: dict, key: str = "let_steps_to_baseline") -> str:
    v = row_or_summary.get(key)
    if v is None:
        return "not reached"
    return f"<= {v:.0f}" if row_or_summary.get("upper_bound") else f"{v:.1f}"


def fmt_speedup(d: dict) -> str:
    if d.get("speedup") is None:
        return "-"
    return f">= {d['speedup']:.2f}x" if d.get("upper_bound") else f"{d['speedup']:.2f}x"


def loss_axis_limits(base_log: dict, let_log: dict, teacher_val_loss: Optional[float] = None,
                     margin: float = 0.05) -> Tuple[float, float]:
    """The loss axis from the data: every plotted train and validation point (and the teacher's line)
    inside, with ``margin`` of the range as room on both sides."""
    values = [v for log in (base_log, let_log) for v in log["valid"].values()]
    values += [m["lm loss"] for log in (base_log, let_log) for m in log["train"].values() if "lm loss" in m]
    values += [teacher_val_loss] if teacher_val_loss is not None else []
    values = [v for v in values if math.isfinite(v)]
    lo, hi = min(values), max(values)
    pad = margin * (hi - lo) or 0.1
    return lo - pad, hi + pad


def plot_loss_curves(base_log: dict, let_log: dict, rows: list, path: Path, title: str, stop_iter: int,
                     total_iters: int, teacher_val_loss: Optional[float] = None) -> None:
    """Train and validation curves of both runs (top) and LET - baseline at each validation (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120, sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    for name, log, color in (("baseline", base_log, "tab:blue"), ("LET", let_log, "tab:orange")):
        train = sorted((i, m["lm loss"]) for i, m in log["train"].items() if "lm loss" in m)
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.3, lw=1, label=f"{name} train lm loss")
        ax.plot(*zip(*sorted(log["valid"].items())), color=color, marker="o", ms=4, lw=2,
                label=f"{name} validation loss")
    for axis in (ax, dx):
        axis.axvline(stop_iter, color="gray", ls="--", lw=1, label=f"LET stop (iter {stop_iter})" if axis is ax else None)
        axis.grid(alpha=0.3)
    if teacher_val_loss is not None:
        ax.axhline(teacher_val_loss, color="tab:green", ls=":", lw=1.2,
                   label=f"teacher val loss ({teacher_val_loss:.2f})")
    ax.set_ylim(*loss_axis_limits(base_log, let_log, teacher_val_loss))
    ax.set_ylabel("lm loss (nats/token)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper right")  # the curves start high on the left and end low on the right
    steps = [r["step"] for r in rows]
    diffs = [r["diff"] for r in rows]
    width = 0.6 * (steps[1] - steps[0]) if len(steps) > 1 else 1.0
    dx.bar(steps, diffs, width=width, color=["tab:green" if d < 0 else "tab:red" for d in diffs])
    dx.axhline(0, color="black", lw=0.8)
    dx.set_ylabel("LET - baseline\nval loss", fontsize=9)
    dx.set_xlabel("iteration")
    dx.set_xlim(0, total_iters * 1.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
