"""What the checkpoint under --load says LET was doing, checked against this launch's flags.

A checkpoint saved while LET was still aligning (before its stop step, not stopped by ``--let-stop auto``)
resumed without ``--let-teacher`` (a relaunch script that lost the --let-* flags) would train on without LET
and say nothing: the run silently becomes a different experiment. It is refused here, before any process group
or write, with the checkpoint's own flags to paste back; ``--let-teacher none`` ends LET there on purpose.
Past the stop step LET is over, so a resume without flags is fine.
"""

from __future__ import annotations

from megatron_let.config import TEACHER_NONE, let_config_from_args, let_flags
from megatron_let.errors import LETConfigError
from megatron_let.resume import aligning_at, read_saved_let_state


def check_resume(args) -> None:
    """Refuse a resume that would drop LET silently (both trainers, both scripts)."""
    if getattr(args, "let_teacher", None) not in (None, TEACHER_NONE):
        return  # LET on: build_let checks the flags against the checkpoint
    let_config_from_args(args)  # LET off: --let-* flags given with it are refused here, not after start-up
    if getattr(args, "let_teacher", None) == TEACHER_NONE or getattr(args, "let_export_dir", None):
        return  # LET ended on purpose (build_let logs it), or an export: nothing trains
    saved, iteration = read_saved_let_state(args)
    if not aligning_at(saved, iteration):
        return
    raise LETConfigError(
        f"--let-teacher is missing, but the checkpoint in --load {args.load} (iteration {iteration}) was saved while "
        f"LET was still aligning (its stop step is {saved.get('stop_iter')}), so this run would go on without LET "
        f"and not say so. Resume with the checkpoint's LET flags: {let_flags(saved['config'])}; or end LET here on "
        f"purpose with --let-teacher {TEACHER_NONE}.")
