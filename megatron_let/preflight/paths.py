"""The directories a run reads and writes, checked against each other before anything is written."""

from __future__ import annotations


def check_directories(args) -> None:
    """Refuse a launch whose writes could overwrite what it reads (to be filled: issue 32)."""
