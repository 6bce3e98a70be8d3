"""Nothing a user saved is lost or overwritten because of the directory flags (issue 32), on whichever
trainer this stack runs (the lean trainer on megatron-core 0.16, Megatron-LM's pretrain() on 0.19).

Each directory flag (--save, --load, --let-export-dir, --let-teacher, --let-teacher-tokenizer,
--tensorboard-dir) against the others: a launch that would write over or into what it reads, export
without a checkpoint, or export over existing files is refused in one line naming the flag and the fix,
exit 2, before any process group (the port is held) and with the checkpoint byte-identical. An export is
written under a temporary name: one killed midway never looks finished, and its re-run says what to do.
"""

import os
import sys
from argparse import Namespace

import pytest

from let_testing import MEGATRON_LM_MODEL, ROOT, launch, make_tiny_llama, megatron_lm_source, refused, tree_hash

MEGATRON_LM = megatron_lm_source() is not None  # which trainer launch() runs here
if MEGATRON_LM:
    MODEL = MEGATRON_LM_MODEL
else:
    MODEL = ["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
             "--micro-batch-size", 2, "--lr", "1e-3", "--mock-data", "--vocab-size", 128, "--log-interval", 1,
             "--eval-iters", 0, "--eval-interval", 100]
BASE = [*MODEL, "--train-iters", 2]


def let(teacher):
    return ["--let-teacher", teacher, "--let-target-layer", 1, "--let-projector", "linear"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A real LET checkpoint (2 iterations, optimizer and projector) on this stack's trainer, and its teacher."""
    root = tmp_path_factory.mktemp("run_directories")
    teacher = make_tiny_llama(str(root / "teacher"), vocab_size=128 if MEGATRON_LM else 256)  # >= the target's
    ckpt = root / "ckpt"
    proc = launch([*BASE, *let(teacher), "--save", ckpt, "--save-interval", 2])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return Namespace(root=root, ckpt=str(ckpt), teacher=teacher)


# Each case: (flags, fragments of the one line) from (work, tmp_path); every path it names is made here.
def _gguf_repository(tmp_path):
    """A directory as GGUF repositories on the Hub ship it: several quantisations, a README, no config.json."""
    hub = tmp_path / "tiny-GGUF"
    hub.mkdir()
    for name in ("tiny.Q8_0.gguf", "tiny.Q4_K_M.gguf", "README.md"):
        (hub / name).write_bytes(b"GGUF")
    return str(hub)


def _empty(tmp_path, name="empty"):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


def _unfinished_export(tmp_path):
    """What an export killed midway leaves: its .partial sibling (the --let-export-dir itself never exists)."""
    _with_file(tmp_path / "export.partial", "iter_0000002")
    return str(tmp_path / "export")


def _with_file(path, name="notes.txt"):
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, name), "w").write("mine")
    return str(path)


CASES = {
    "export_is_load": lambda w, t: (
        ["--load", w.ckpt, "--let-export-dir", w.ckpt],
        ["--let-export-dir", "is the --load directory", "overwrite the checkpoint it reads", "new directory"]),
    "export_without_load": lambda w, t: (
        ["--let-export-dir", t / "export"], ["--let-export-dir needs --load"]),
    "export_without_checkpoint": lambda w, t: (
        ["--load", _empty(t), "--let-export-dir", t / "export"],
        ["--let-export-dir needs a checkpoint to export", f"--load {t / 'empty'}",
         "latest_checkpointed_iteration.txt", "point --load at"]),
    "export_inside_load": lambda w, t: (
        ["--load", w.ckpt, "--let-export-dir", os.path.join(w.ckpt, "export")],
        ["--let-export-dir", "is inside the --load directory", "new directory outside it"]),
    "export_contains_save": lambda w, t: (
        ["--load", w.ckpt, "--save", t / "export" / "ckpt", "--let-export-dir", t / "export"],
        ["--let-export-dir", "contains the --save directory"]),
    "export_is_tensorboard_dir": lambda w, t: (
        ["--load", w.ckpt, "--tensorboard-dir", t / "export", "--let-export-dir", t / "export"],
        ["--let-export-dir", "is the --tensorboard-dir directory"]),
    "export_inside_teacher": lambda w, t: (
        [*let(w.teacher), "--load", w.ckpt, "--let-export-dir", os.path.join(w.teacher, "export")],
        ["--let-export-dir", "is inside the --let-teacher directory"]),
    "export_not_empty": lambda w, t: (
        ["--load", w.ckpt, "--let-export-dir", _with_file(t / "export")],
        ["--let-export-dir", "is not empty", "notes.txt", "give a new directory or remove that one"]),
    "export_left_unfinished": lambda w, t: (
        ["--load", w.ckpt, "--let-export-dir", _unfinished_export(t)],
        ["--let-export-dir", "did not finish", f"rm -r {t / 'export.partial'}", "run the export again"]),
    "save_inside_teacher": lambda w, t: (
        [*let(w.teacher), "--save", os.path.join(w.teacher, "ckpt")],
        ["--save", "is inside the --let-teacher directory", "give --save a directory outside it"]),
    "save_is_gguf_teacher_directory": lambda w, t: (
        [*let(os.path.join(_gguf_repository(t), "tiny.Q8_0.gguf")), "--save", t / "tiny-GGUF"],
        ["--save", "is the --let-teacher directory"]),
    "save_is_teacher_tokenizer": lambda w, t: (
        [*let(w.teacher), "--let-teacher-tokenizer", _empty(t, "tokenizer"), "--save", t / "tokenizer"],
        ["--save", "is the --let-teacher-tokenizer directory"]),
    "tensorboard_is_teacher": lambda w, t: (
        [*let(w.teacher), "--tensorboard-dir", w.teacher],
        ["--tensorboard-dir", "is the --let-teacher directory", "outside it"]),
    "data_cache_is_teacher": lambda w, t: (
        [*let(w.teacher), "--data-cache-path", w.teacher],
        ["--data-cache-path", "is the --let-teacher directory", "outside it"]),
    "save_holds_another_checkpoint": lambda w, t: (
        ["--save", w.ckpt], ["--save", "already holds a checkpoint (iteration 2)", f"pass --load {w.ckpt}",
                             "give --save a new directory"]),
    "gguf_repository_is_ambiguous": lambda w, t: (
        [*let(_gguf_repository(t))],
        ["--let-teacher", "2 .gguf files and no config.json", "tiny.Q4_K_M.gguf, tiny.Q8_0.gguf",
         f"--let-teacher {t / 'tiny-GGUF' / 'tiny.Q4_K_M.gguf'}"]),
}
# Megatron-LM's start-up costs ~20 s a launch on CPU: there every case runs through its own parser in
# process (test_refused_on_this_parser), and these end to end (and the re-runs in the export tests).
END_TO_END = list(CASES) if not MEGATRON_LM else ["export_is_load", "export_without_checkpoint", "export_inside_load",
                                                  "save_inside_teacher", "tensorboard_is_teacher",
                                                  "save_holds_another_checkpoint", "gguf_repository_is_ambiguous"]


def _case(name, work, tmp_path):
    flags, fragments = CASES[name](work, tmp_path)
    return [str(a) for a in (*BASE, *flags)], fragments


@pytest.mark.parametrize("name", END_TO_END)
def test_refused_before_anything(name, work, tmp_path):
    args, fragments = _case(name, work, tmp_path)
    before = sorted(os.listdir(tmp_path))
    refused(args, files=[work.ckpt, work.teacher], fragments=fragments)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created (no export directory, no .partial)


@pytest.mark.parametrize("name", list(CASES))
def test_refused_on_this_parser(name, work, tmp_path, monkeypatch):
    """Every case through this stack's own parser (Megatron-LM's parse_args, or the lean trainer's) and the
    launch checks, as the entry point runs them: the refusal reads the namespace that trainer really builds."""
    from megatron_let.errors import LETConfigError

    args, fragments = _case(name, work, tmp_path)
    before = tree_hash(work.ckpt, work.teacher)
    with pytest.raises(LETConfigError) as error:
        if MEGATRON_LM:
            from megatron_let.integrations.megatron_lm import LETMegatronLM, _check_before_start, import_pretrain_gpt

            monkeypatch.setattr(sys, "argv", ["pretrain_gpt_let.py", *args])
            _check_before_start(LETMegatronLM(import_pretrain_gpt()).extra_args_provider())
        else:
            from megatron_let.preflight import check_launch
            from megatron_let.training.arguments import parse_args

            check_launch(parse_args(args), megatron_lm=False)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)
    assert "\n" not in str(error.value)
    assert tree_hash(work.ckpt, work.teacher) == before


def test_checks_that_let_good_launches_through(work, tmp_path):
    """The same flags a normal job uses are not refused: --save equal to --load (resume), a fresh export
    directory (absent or empty), a .gguf teacher alone in its directory, tensorboard next to the checkpoint."""
    from megatron_let.preflight.paths import check_directories

    lone = tmp_path / "lone-GGUF"
    lone.mkdir()
    (lone / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    for flags in ({"save": work.ckpt, "load": work.ckpt, "let_teacher": work.teacher},
                  {"save": tmp_path / "new", "load": work.ckpt, "tensorboard_dir": tmp_path / "tb"},
                  {"load": work.ckpt, "let_export_dir": tmp_path / "export"},
                  {"load": work.ckpt, "let_export_dir": _empty(tmp_path)},
                  {"let_teacher": str(lone), "save": tmp_path / "ckpt2", "tensorboard_dir": work.ckpt}):
        check_directories(Namespace(**{k: str(v) for k, v in flags.items()}))


def _export_args(work, export):
    return [*BASE, *let(work.teacher), "--load", work.ckpt, "--no-load-rng", "--let-export-dir", export]


def test_export_writes_the_model_and_a_rerun_is_refused(work, tmp_path):
    """A correct export works (the model without the projector; the checkpoint untouched), and running it
    again is refused instead of writing over it."""
    export = tmp_path / "export"
    before = tree_hash(work.ckpt)
    proc = launch(_export_args(work, export))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"without LET state to {export}" in proc.stdout and "consumed samples" not in proc.stdout
    assert (export / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    keys = (export / "iter_0000002" / ".metadata").read_bytes()
    assert b"decoder.layers." in keys and b"let_alignment" not in keys
    assert b"let_alignment" in open(os.path.join(work.ckpt, "iter_0000002", ".metadata"), "rb").read()
    assert not os.path.exists(f"{export}.partial") and tree_hash(work.ckpt) == before
    exported = tree_hash(export)
    refused(_export_args(work, export), files=[work.ckpt, export],
            fragments=["--let-export-dir", "is not empty (a finished export)", "latest_checkpointed_iteration.txt"])
    assert tree_hash(export) == exported


# The job killed as a scheduler kills it: the whole process group (its helper processes too) at once.
KILL_AT_RENAME = """import os, runpy, signal, sys
os.setsid()
export, replace = os.path.realpath(os.environ["EXPORT_DIR"]), os.replace
def killed_at_rename(src, dst, *args, **kwargs):  # every file written, the final rename not done
    if os.path.realpath(str(dst)) == export:
        os.killpg(0, signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = os.rename = killed_at_rename
sys.argv = [os.environ["SCRIPT"], *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_interrupted_export_never_looks_finished(work, tmp_path):
    """An export killed at the last moment (everything written, not yet renamed) leaves no --let-export-dir,
    only its .partial sibling; the re-run says to remove it."""
    export, runner = tmp_path / "export", tmp_path / "kill_at_rename.py"
    runner.write_text(KILL_AT_RENAME)
    proc = launch(_export_args(work, export), script=str(runner), timeout=240,
                  env_extra={"EXPORT_DIR": str(export), "SCRIPT": os.path.join(ROOT, "pretrain_gpt_let.py")})
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    partial = f"{export}.partial"
    assert not os.path.exists(export)  # nothing that could be taken for a finished export
    assert os.path.isfile(os.path.join(partial, "iter_0000002", ".metadata"))  # killed after the writes
    refused(_export_args(work, export), files=[work.ckpt, partial],
            fragments=["--let-export-dir", "did not finish", f"rm -r {partial}", "run the export again"])
    assert not os.path.exists(export)
