"""LET under full activation recomputation: layer k runs twice, the loss is counted once.

With ``--recompute-granularity full`` megatron-core's ``TransformerBlock._checkpointed_forward``
runs layer k inside ``tensor_parallel.checkpoint`` (``CheckpointFunction``): first in the forward
pass under ``torch.no_grad()`` (nothing is kept but the chunk's input), then again in the backward
pass with grad enabled, and backpropagates through that second run. The hook on layer k therefore:

- in the no-grad run: takes the micro-batch's tokens (handed over by ``set_microbatch`` just before
  this forward), computes the teacher's states for it **once**, and pushes them here;
- in the recompute run: pops them (first in, first out) and attaches the alignment loss there, so
  its gradient flows through the recomputed graph like the LM loss's; metrics are counted there, once.

FIFO is exact for megatron-core's schedules: on the one model chunk holding layer k, micro-batches
run their forward passes in order and their backward passes in the same order (no pipelining,
1F1B and interleaved 1F1B alike). Whatever is left at the start of an iteration means a no-grad
training-mode forward had no backward: that is refused rather than letting states slip into the
next micro-batch.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Optional


def in_checkpointed_forward(config, training: bool) -> bool:
    """True in the no-grad first run of a layer under full recompute (call only when grad is off).

    ``TransformerBlock`` takes ``_checkpointed_forward`` exactly when ``recompute_granularity ==
    'full'`` and the block is training; its first run of each layer is then under no_grad."""
    return training and getattr(config, "recompute_granularity", None) == "full"


class RecomputeStash:
    """Per-micro-batch teacher targets of layer k, from the no-grad run to the recompute run."""

    def __init__(self):
        self._entries: Deque[Any] = deque()

    def push(self, entry: Any) -> None:
        self._entries.append(entry)

    def pop(self) -> Optional[Any]:
        """The oldest stashed micro-batch's targets; None when layer k is not recomputed
        (no full recompute, or ``--recompute-method block`` leaves layer k out)."""
        return self._entries.popleft() if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def check_drained(self) -> None:
        """At an iteration's start every stashed micro-batch must have been recomputed."""
        if self._entries:
            count = len(self._entries)
            self._entries.clear()
            raise RuntimeError(
                f"LET: {count} micro-batch(es) ran the target layer's forward under full recompute "
                "without a backward pass; run training-mode forwards with grad enabled, or call "
                "model.eval() for forward-only passes.")

    def clear(self) -> None:
        self._entries.clear()
