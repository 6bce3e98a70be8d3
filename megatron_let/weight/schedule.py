"""lambda(iteration): the late-to-early-step weight of the alignment loss."""

import math


def let_lambda(iteration: int, lambda0: float, stop_iter: int, kind: str = "linear") -> float:
    """Weight for the step that starts at ``iteration`` (0-based); exactly 0 from ``stop_iter`` on.

    linear (the paper): lambda0 * (S - s) / S; constant: lambda0 until S;
    cosine: lambda0 * (1 + cos(pi s / S)) / 2.
    """
    if iteration >= stop_iter or lambda0 == 0:
        return 0.0
    progress = max(iteration, 0) / stop_iter
    if kind == "linear":
        return lambda0 * (1.0 - progress)
    if kind == "constant":
        return float(lambda0)
    if kind == "cosine":
        return lambda0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LET schedule {kind!r}")
