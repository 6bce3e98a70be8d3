"""User-facing errors: each message names the flag (or the iteration and rank) and the fix."""


class LETConfigError(ValueError):
    """A configuration that cannot work; caught by the entry points, printed as one line."""


class LETNonFiniteError(RuntimeError):
    """The alignment loss was NaN/Inf and --let-on-nonfinite is 'error'."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous one still loads."""
