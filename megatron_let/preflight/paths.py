"""The directories a run reads and writes, checked against each other before anything is written.

Writes: ``--save`` (checkpoints), ``--tensorboard-dir`` (event files), ``--data-cache-path`` (dataset indexes),
``--wandb-save-dir`` (W&B files), ``--let-export-dir`` (the export).
Reads: ``--load`` (the checkpoint), ``--let-teacher`` (a .gguf file's directory counts), ``--let-teacher-tokenizer``
and ``--tokenizer-model`` (where they are directories). A write may not land on or inside what the run reads
from a model or tokenizer, an export goes to a new or empty directory of its own, and a run may not write
checkpoints over ones it did not load. Megatron-LM itself checks none of this: ``--load CK --let-export-dir CK``
overwrote the training checkpoint, and a ``--load`` without a checkpoint exported a random model.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from megatron_let.checkpoint_files import export_partial_dir
from megatron_let.errors import LETConfigError

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's and the lean trainer's name
BRIDGE_TRACKER = "latest_train_state.pt"  # Megatron-Bridge's

def check_directories(args) -> None:
    """Refuse a launch whose writes could overwrite or pollute what the user saved, in one line naming the
    flag(s) and the fix. ``args``: either trainer's parsed flags (missing attributes count as unset)."""
    export = _flag(args, "let_export_dir")
    if export is not None:
        _check_export(args, export)
    _check_teacher_files(args)
    reads = _read_directories(args)
    writes = [("--save", _flag(args, "save")), ("--tensorboard-dir", _flag(args, "tensorboard_dir")),
              ("--data-cache-path", _flag(args, "data_cache_path")), ("--wandb-save-dir", _flag(args, "wandb_save_dir"))]
    for write_flag, write in writes:
        for read_flag, read in reads:
            if write is not None and _inside(write, read):
                where = "is" if _same(write, read) else "is inside"
                raise LETConfigError(f"{write_flag} {write} {where} the {read_flag} directory {read}: the run would "
                                     f"write into it; give {write_flag} a directory outside it.")
    if export is None:
        _check_save_overwrites(args)


# ---------------------------------------------------------------------------------------------- export
def _check_export(args, export: str) -> None:
    """--let-export-dir: a checkpoint to read under --load, and a new or empty directory of its own."""
    load = _flag(args, "load")
    if load is None:
        raise LETConfigError("--let-export-dir needs --load CHECKPOINT_DIR: the checkpoint to export.")
    problem = _no_checkpoint(load, getattr(args, "ckpt_step", None))
    if problem:
        raise LETConfigError(f"--let-export-dir needs a checkpoint to export, but --load {load} {problem}; point "
                             f"--load at a directory that --save wrote.")
    others = [("--load", load), ("--save", _flag(args, "save")),
              ("--tensorboard-dir", _flag(args, "tensorboard_dir")), *_read_directories(args)]
    for flag, other in others:
        if other is None:
            continue
        if _same(export, other):
            relation = "is"
        elif _inside(export, other):
            relation = "is inside"
        elif _inside(other, export):
            relation = "contains"
        else:
            continue
        harm = "the export would overwrite the checkpoint it reads (optimizer and LET state)" \
            if flag == "--load" and relation == "is" else "the export would mix its files with that directory's"
        raise LETConfigError(f"--let-export-dir {export} {relation} the {flag} directory {other}: {harm}; give "
                             f"--let-export-dir a new directory outside it.")
    partial = export_partial_dir(export)
    if os.path.exists(partial):
        raise LETConfigError(f"--let-export-dir {export}: {partial} is left from an export that did not finish; "
                             f"remove it (rm -r {partial}) and run the export again.")
    if os.path.exists(export) and not os.path.isdir(export):
        raise LETConfigError(f"--let-export-dir {export} is a file, not a directory; give a new directory.")
    if os.path.isdir(export) and os.listdir(export):
        entries = sorted(os.listdir(export))
        done = " (a finished export)" if TRACKER in entries else ""
        raise LETConfigError(f"--let-export-dir {export} is not empty{done}: it holds {', '.join(entries[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}; an export never writes over files, so give a "
                             f"new directory or remove that one first.")


def _no_checkpoint(load: str, ckpt_step) -> Optional[str]:
    """Why ``load`` holds no checkpoint to load (None when it holds one), as both trainers find it:
    ``--ckpt-step N``'s iteration (Megatron-LM), else the one the tracker file names."""
    if not os.path.isdir(load):
        return "does not exist" if not os.path.exists(load) else "is not a directory"
    if ckpt_step:
        name = f"iter_{int(ckpt_step):07d}"
        return None if os.path.isdir(os.path.join(load, name)) else f"has no {name} (--ckpt-step {ckpt_step})"
    tracker = os.path.join(load, TRACKER)
    if not os.path.isfile(tracker):
        if os.path.isfile(os.path.join(load, BRIDGE_TRACKER)):
            return None  # Megatron-Bridge's tracker (a torch file naming the iteration its loader resumes)
        return f"holds no {TRACKER}"
    with open(tracker) as handle:
        text = handle.read().strip()
    name = f"iter_{int(text):07d}" if text.isdigit() else "release" if text == "release" else None
    if name is None:
        return f"has an unreadable {TRACKER} ({text[:20]!r})"
    return None if os.path.isdir(os.path.join(load, name)) else f"has no {name}, which its {TRACKER} names"


# ---------------------------------------------------------------------------------------------- reads
def _teacher_directory(path: Optional[str]) -> Optional[str]:
    """The directory a teacher (or tokenizer) path reads: itself, or a file's directory (a .gguf teacher)."""
    if path is None or not os.path.exists(path):
        return None  # a Hub name or a wrong path: the teacher's own preflight says what is wrong
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _read_directories(args) -> List[Tuple[str, str]]:
    """(flag, directory) of each model or tokenizer directory this run reads and must not write into."""
    reads = [("--let-teacher", _teacher_directory(_flag(args, "let_teacher"))),
             ("--let-teacher-tokenizer", _teacher_directory(_flag(args, "let_teacher_tokenizer")))]
    tokenizer = _flag(args, "tokenizer_model")
    if tokenizer is not None and os.path.isdir(tokenizer):
        reads.append(("--tokenizer-model", tokenizer))
    return [(flag, path) for flag, path in reads if path is not None]


def _check_teacher_files(args) -> None:
    """A directory as GGUF repositories on the Hugging Face Hub ship it: several quantisations and no
    config.json. Which one to load is the user's choice (their sizes and quality differ), never a guess."""
    teacher = _flag(args, "let_teacher")
    if teacher is None or not os.path.isdir(teacher) or os.path.isfile(os.path.join(teacher, "config.json")):
        return
    ggufs = sorted(name for name in os.listdir(teacher) if name.endswith(".gguf"))
    if len(ggufs) > 1:
        raise LETConfigError(f"--let-teacher {teacher} holds {len(ggufs)} .gguf files and no config.json "
                             f"({', '.join(ggufs)}): name the one to load, e.g. --let-teacher "
                             f"{os.path.join(teacher, ggufs[0])}.")


# ---------------------------------------------------------------------------------------------- save
def _check_save_overwrites(args) -> None:
    """--save holding a checkpoint that this run did not load: its saves would replace that run's tracker and
    any checkpoint of the same iteration (a relaunch that forgot --load starts from scratch over them)."""
    save, load = _flag(args, "save"), _flag(args, "load")
    if save is None or (load is not None and _same(save, load)) or not os.path.isfile(os.path.join(save, TRACKER)):
        return
    with open(os.path.join(save, TRACKER)) as handle:
        saved = handle.read().strip()
    started = f"resuming --load {load}" if load is not None else "starting from scratch"
    raise LETConfigError(f"--save {save} already holds a checkpoint (iteration {saved}) that this run, {started}, "
                         f"would overwrite; to resume it pass --load {save}, or give --save a new directory.")


# ---------------------------------------------------------------------------------------------- helpers
def _flag(args, name: str) -> Optional[str]:
    value = getattr(args, name, None)
    return str(value) if value not in (None, "") else None


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _same(a: str, b: str) -> bool:
    return _real(a) == _real(b)


def _inside(a: str, b: str) -> bool:
    """Is ``a`` ``b`` or below it (symbolic links resolved)?"""
    a, b = _real(a), _real(b)
    return os.path.commonpath([a, b]) == b
