"""Settings Megatron-LM's loop cannot run on a machine without a GPU, refused in one line each."""

from __future__ import annotations


def check_cpu_settings(args) -> None:
    """Refuse GPU-only settings without CUDA (to be filled: issue 32)."""
