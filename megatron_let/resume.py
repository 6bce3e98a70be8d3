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
from typing import Optional, Tuple

from megatron_let.config import DEFAULT_STOP_AUTO, LAMBDA_AUTO, STOP_AUTO, LETConfig, resolved_settings
from megatron_let.errors import LETConfigError

ESTIMATED_NORMS = ("center", "standardize")  # megatron_let/loss/teacher_norm.py: width-shaped, checkpointed


def changed_settings(saved_config: dict, config: LETConfig, hidden_size: Optional[int] = None,
                     teacher_layers: Optional[int] = None) -> list:
    """Names of LET settings whose resolved values differ from a checkpoint's: a default typed out
    (``--let-lambda-auto-fraction 3.0``) equals the None a checkpoint stores for it, and fields a checkpoint
    predates count as defaults (config.resolved_settings)."""
    saved = resolved_settings(saved_config, hidden_size, teacher_layers)
    current = resolved_settings(config.to_dict(), hidden_size, teacher_layers)
    return sorted(k for k in current if saved[k] != current[k]
                  and (k not in _USED_ONLY_WITH or _USED_ONLY_WITH[k](saved) and _USED_ONLY_WITH[k](current)))


# settings that mean something only in one mode: a mode change is named by the mode's own field alone
_USED_ONLY_WITH = {
    "lambda_auto_fraction": lambda s: s["lambda0"] == LAMBDA_AUTO,
    "projector_hidden_size": lambda s: s["projector"] == "mlp",
    "teacher_tokenizer": lambda s: s["token_alignment"] != "exact",
    **{f"stop_auto_{name}": (lambda s: s["stop"] == STOP_AUTO) for name in DEFAULT_STOP_AUTO},
}


def _saved(saved_config: dict, name: str):
    """A checkpoint's setting; one it predates counts as that field's default."""
    return saved_config.get(name, next(f.default for f in fields(LETConfig) if f.name == name))


def refuse_unusable_projector(saved: dict, config: LETConfig, reset_projector: bool = False,
                              hidden_size: Optional[int] = None) -> None:
    """Refuse --let-projector / --let-projector-hidden-size changes the saved projector cannot serve
    (checked before the teacher is read: it holds even past the stop step). ``hidden_size``: the target's,
    the mlp's default width (a width typed out at that default is no change)."""
    old = saved.get("config")
    if not old or reset_projector:
        return
    kind = _saved(old, "projector")
    if kind != config.projector:
        _refuse("--let-projector", kind, config.projector)
    old_width = resolved_settings(old, hidden_size)["projector_hidden_size"]
    new_width = resolved_settings(config.to_dict(), hidden_size)["projector_hidden_size"]
    if kind == "mlp" and old_width != new_width:
        _refuse("--let-projector-hidden-size", old_width, new_width)


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


def read_saved_let_state(args) -> Tuple[dict, Optional[int]]:
    """(LET state, iteration) of the checkpoint ``--load`` resumes from, for both trainers (they share Megatron-LM's
    layout): the tracker's latest iteration, or ``--ckpt-step N``'s (Megatron-LM then loads iteration N).
    ({}, None) for a fresh start, ``--finetune`` (training restarts at iteration 0: the old LET state does not
    apply), a release checkpoint, or one without LET state; ({}, N) where the common state cannot be read.
    ``--no-load-optim`` / ``--no-load-rng`` change neither: the iteration and LET state still resume."""
    from megatron_let.checkpoint_files import iteration_dir, latest_iteration

    load = getattr(args, "load", None)
    latest = latest_iteration(load)  # None: no tracker, or a release checkpoint (no training state to resume)
    if latest is None or getattr(args, "finetune", False):
        return {}, None
    step = getattr(args, "ckpt_step", None)
    iteration = latest if step is None else int(step)
    try:
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(iteration_dir(load, iteration))
    except Exception:  # noqa: BLE001 - not a torch_dist checkpoint: nothing LET can read from it
        return {}, iteration
    return saved_let_state(common), iteration


def aligning_at(saved: dict, iteration: Optional[int]) -> bool:
    """Was LET still aligning at ``iteration`` in this checkpoint: before its stop step and not stopped by
    ``--let-stop auto``? (Past either, LET is over and a resume needs no --let-* flag.)"""
    if not saved.get("config") or iteration is None:
        return False
    stop = saved.get("stop_iter")
    auto_stopped = (saved.get("auto_stop") or {}).get("stopped_at")
    return not (stop is not None and iteration >= stop) and not (auto_stopped is not None and iteration >= auto_stopped)
