"""User-facing errors: each message names the flag (or the iteration and rank) and the fix."""

import os
import sys


class LETConfigError(ValueError):
    """A configuration that cannot work; caught by the entry points, printed as one line."""


class LETNonFiniteError(RuntimeError):
    """The alignment loss was NaN/Inf and --let-on-nonfinite is 'error'."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous one still loads."""


def print_error(program: str, message) -> None:
    """The one line an entry point prints for a refusal (``<program>: error: ...``, argparse's form), once: rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
