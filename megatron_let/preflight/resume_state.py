"""What the checkpoint under --load says LET was doing, checked against this launch's flags."""

from __future__ import annotations


def check_resume(args) -> None:
    """Refuse a resume that would change LET silently (to be filled: issue 32)."""
