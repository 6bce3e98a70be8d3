"""Checks of one launch that need only its parsed flags and the file system.

Every trainer runs :func:`check_launch` right after parsing its command line, before any process
group exists and before anything is written, so a launch that would lose or silently change saved
work (an export over the checkpoint it reads, a resume that drops LET, ...) stops in seconds with one
line naming the flag and the fix. One module per concern:

- :mod:`megatron_let.preflight.paths`: the directories the run reads and writes, against each other;
- :mod:`megatron_let.preflight.resume_state`: what the checkpoint under ``--load`` says LET was doing;
- :mod:`megatron_let.preflight.cpu`: settings a machine without a GPU cannot run (Megatron-LM's loop).
"""

from __future__ import annotations


def check_launch(args, megatron_lm: bool) -> None:
    """Raise :class:`~megatron_let.errors.LETConfigError` for a launch that must not start.

    ``args``: the parsed flags (Megatron-LM's ``parse_args`` namespace before ``validate_args``, or the
    lean trainer's validated one); ``megatron_lm``: which loop will run them."""
    from megatron_let.preflight import cpu, paths, resume_state

    paths.check_directories(args)
    resume_state.check_resume(args)
    if megatron_lm:
        cpu.check_cpu_settings(args)
