"""What a resume may change of LET, decided in one place for both trainers.

A checkpoint holds LET state only in the ``let_alignment`` submodule: a learned projector (linear /
mlp, shaped by the teacher's width, the projector kind and its hidden size) and the statistics of
--let-teacher-norm center / standardize (shaped by the teacher's width). Settings that shape neither
(target layer, lambda, schedule, stop, token alignment, ...) may change on resume: a warning says so.
A change the saved tensors cannot serve would load as a size mismatch, or crash at the first step, so
it is refused with one line before anything is loaded or written; ``--let-reset-projector`` starts a
fresh projector instead.
"""

from __future__ import annotations

from dataclasses import fields

from megatron_let.config import LETConfig
from megatron_let.errors import LETConfigError

ESTIMATED_NORMS = ("center", "standardize")  # megatron_let/teacher_norm.py: width-shaped, checkpointed


def changed_settings(saved_config: dict, config: LETConfig) -> list:
    """Names of LET settings that differ from a checkpoint's (fields it predates count as defaults)."""
    defaults = {f.name: f.default for f in fields(LETConfig)}
    current = config.to_dict()
    return sorted(k for k in current if {**defaults, **saved_config}.get(k) != current[k])


def _saved(saved_config: dict, name: str):
    """A checkpoint's setting; one it predates counts as that field's default."""
    return saved_config.get(name, next(f.default for f in fields(LETConfig) if f.name == name))


def refuse_unusable_projector(saved: dict, config: LETConfig, reset_projector: bool = False) -> None:
    """Refuse --let-projector / --let-projector-hidden-size changes the saved projector cannot serve
    (checked before the teacher is read: it holds even past the stop step)."""
    old = saved.get("config")
    if not old or reset_projector:
        return
    kind = _saved(old, "projector")
    if kind != config.projector:
        _refuse("--let-projector", kind, config.projector)
    if kind == "mlp" and _saved(old, "projector_hidden_size") != config.projector_hidden_size:
        _refuse("--let-projector-hidden-size", _saved(old, "projector_hidden_size"), config.projector_hidden_size)


def refuse_unusable_width(saved: dict, config: LETConfig, width: int, reset_projector: bool = False) -> None:
    """Refuse a teacher whose output width differs from the checkpoint's when a learned projector or
    teacher-norm statistics were saved at the old width (an interp projector just follows the teacher)."""
    old_width = saved.get("teacher_hidden_size")
    if not saved.get("config") or old_width is None or old_width == width:
        return
    norm = config.teacher_norm in ESTIMATED_NORMS and _saved(saved["config"], "teacher_norm") in ESTIMATED_NORMS
    if norm:  # a fresh estimate cannot start mid-training (it only runs in the first iterations)
        raise LETConfigError(
            f"--let-teacher {config.teacher!r} is {width} wide but the checkpoint's --let-teacher-norm "
            f"{config.teacher_norm} statistics are for a {old_width}-wide teacher; resume with the checkpoint's "
            f"teacher ({saved['config'].get('teacher')!r}) or with --let-teacher-norm none / layernorm.")
    if config.projector != "interp" and not reset_projector:
        _refuse("--let-teacher", f"{saved['config'].get('teacher')!r} ({old_width} wide)",
                f"{config.teacher!r} ({width} wide)")


def _refuse(flag: str, saved_value, new_value) -> None:
    raise LETConfigError(
        f"{flag}: the checkpoint's learned LET projector was trained for {saved_value}, this run asks for "
        f"{new_value}, which it cannot serve; resume with the checkpoint's setting, or add --let-reset-projector "
        "to start a fresh projector (the rest of the model resumes as saved).")


def saved_let_state(common) -> dict:
    """The LET state of a checkpoint's common dict, whichever trainer wrote it: the lean trainer keeps it
    under ``let``, Megatron-LM in its saved ``args.let_state`` (Megatron-LM pickles args in every
    checkpoint). {} when there is none, so a checkpoint of one trainer is checked the same by the other."""
    if not isinstance(common, dict):
        return {}
    state = common.get("let") or getattr(common.get("args"), "let_state", None)
    return dict(state) if state else {}
