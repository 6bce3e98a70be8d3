"""LET for users who keep their own copy of Megatron-LM's ``pretrain_gpt.py``.

Two parts:

- :func:`enable_let`, the hook the patch calls. ``patches/pretrain_gpt.core_v0.16.1.patch`` adds
  to the ``__main__`` block of ``pretrain_gpt.py``::

      from megatron_let.integrations.patching import enable_let
      pretrain = enable_let(globals(), pretrain)

  ``enable_let`` hands the script's own namespace to :class:`megatron_let.integrations.megatron_lm.LETMegatronLM`
  (the same wiring ``pretrain_gpt_let.py`` uses: ``get_batch`` / ``mtp_on_this_rank`` on LET's
  stage, ``training_log``) and returns ``pretrain`` with its model provider, forward step and
  ``extra_args_provider`` wrapped. Without ``--let-teacher`` every wrapper passes straight through.

- a command that applies and verifies the patch::

      python -m megatron_let.integrations.patching apply PATH/TO/pretrain_gpt.py [--backup]
      python -m megatron_let.integrations.patching check PATH/TO/pretrain_gpt.py
      python -m megatron_let.integrations.patching revert PATH/TO/pretrain_gpt.py

  ``apply`` is idempotent (an already patched file is left alone) and uses ``patch``, or ``git
  apply`` where ``patch`` is missing; the patched file must compile. Exit codes: 0 done / patched,
  1 not patched (``check``), 2 cannot apply (with the reason).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Optional

from megatron_let.patch_registry import register_patch

__all__ = ["enable_let", "default_patch", "is_patched", "apply_patch", "revert_patch", "main"]

# one patch per __main__ layout: core_v0.16/0.17 (pretrain parses the arguments), core_v0.18/0.19 (the script does)
PATCH_NAMES = ("pretrain_gpt.core_v0.16.1.patch", "pretrain_gpt.core_v0.19.0.patch")
PATCH_NAME = PATCH_NAMES[0]
MARKER = "from megatron_let.integrations.patching import enable_let"
# What LETMegatronLM needs from pretrain_gpt.py (core_v0.16 layout); older scripts lack them.
_REQUIRED_SOURCE = ("def get_batch(data_iterator, vp_stage", "mtp_on_this_rank", "def forward_step(",
                    "def train_valid_test_datasets_provider(", "model_provider")


class PatchError(RuntimeError):
    """The patch cannot be applied or reverted; the message says why."""


# -- the hook called by the patched pretrain_gpt.py -------------------------------------------------

class _Namespace:
    """Attribute view of a module's globals() (``__main__`` under python, torchrun or runpy alike)."""

    def __init__(self, namespace: dict):
        object.__setattr__(self, "_namespace", namespace)

    def __getattr__(self, name):
        try:
            return self._namespace[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self._namespace[name] = value


def enable_let(namespace, pretrain: Callable) -> Callable:
    """Wire LET into the calling ``pretrain_gpt.py`` and return its ``pretrain`` with LET's wrappers.

    ``namespace`` is the script's ``globals()`` (or the module). The registry's ``let-script`` entries replace
    ``get_batch`` and the full-batch predicate there, the ``let-megatron-lm`` entries wrap megatron.training's
    loop (see :mod:`megatron_let.integrations.megatron_lm`), and the ``let-patched-script`` entries below wrap
    the script's ``pretrain`` (and, from 0.18, its ``parse_and_validate_args``). LET flag errors end the run
    with one line and exit code 2 (1 for a non-finite alignment loss), as in ``pretrain_gpt_let.py``.
    """
    from megatron_let.errors import LETConfigError, LETNonFiniteError
    from megatron_let.integrations.megatron_lm import LETMegatronLM, _on_this_device
    from megatron_let.patch_registry import apply_patches

    module = _on_this_device(_Namespace(namespace) if isinstance(namespace, dict) else namespace)
    integration = LETMegatronLM(module)
    integration.install()
    module.pretrain = pretrain
    apply_patches(PATCHED_SCRIPT_GROUP, integration, module=module)
    pretrain_wrapped = module.pretrain

    @functools.wraps(pretrain)
    def pretrain_with_let(*args, **kwargs):
        try:
            return pretrain_wrapped(*args, **kwargs)
        except (LETConfigError, LETNonFiniteError) as error:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{os.path.basename(sys.argv[0] or 'pretrain_gpt.py')}: error: {error}",
                      file=sys.stderr, flush=True)
            raise SystemExit(2 if isinstance(error, LETConfigError) else 1) from None

    pretrain_with_let.let_integration = integration
    return pretrain_with_let


# -- the registry's entries for a patched script's own pretrain() call -------------------------------------------
PATCHED_SCRIPT_GROUP = "let-patched-script"


def _wrap_pretrain(script, integration, with_container: bool) -> None:
    """The script's ``pretrain`` with LET's forward step and model hook: up to 0.17 the model provider and
    ``extra_args_provider`` (pretrain() parses the arguments), from 0.18 the config container's pre-wrap hook."""
    pretrain = script.pretrain
    signature = inspect.signature(pretrain)

    @functools.wraps(pretrain)
    def pretrain_with_let(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        arguments["forward_step_func"] = integration.forward_step(arguments["forward_step_func"])
        if arguments.get("model_provider") is not None:  # up to 0.18
            arguments["model_provider"] = integration.model_provider(arguments["model_provider"])
        if with_container:
            arguments["cfg_container"].model.pre_wrap_hooks.append(integration.attach)
        else:
            arguments["extra_args_provider"] = integration.extra_args_provider(arguments.get("extra_args_provider"))
        return pretrain(**arguments)

    script.pretrain = pretrain_with_let


register_patch("let.patched-script.pretrain", group=PATCHED_SCRIPT_GROUP, target=":pretrain", until="0.18",
               why="pretrain() parses the arguments and builds the model: LET's flags join its "
                   "extra_args_provider, the model provider attaches LET, the forward step notes train/eval"
               )(functools.partial(_wrap_pretrain, with_container=False))
register_patch("let.patched-script.pretrain-container", group=PATCHED_SCRIPT_GROUP, target=":pretrain",
               since="0.18", why="pretrain(cfg_container, ...): LET attaches through the model config's pre-wrap "
                                 "hooks, the forward step notes train/eval"
               )(functools.partial(_wrap_pretrain, with_container=True))


@register_patch("let.patched-script.parse-args", group=PATCHED_SCRIPT_GROUP, target=":parse_and_validate_args",
                since="0.18", why="from 0.18 the script parses the arguments before pretrain(): LET's --let-* "
                                  "group joins the extra_args_provider there")
def _let_flags_in_parse(script, integration) -> None:
    parse = script.parse_and_validate_args

    @functools.wraps(parse)
    def parse_with_let(*args, extra_args_provider=None, **kwargs):
        return parse(*args, extra_args_provider=integration.extra_args_provider(extra_args_provider), **kwargs)

    script.parse_and_validate_args = parse_with_let


# -- applying the patch ------------------------------------------------------------------------------

def _patch_directory() -> str:
    candidates = [os.environ.get("MEGATRON_LET_PATCHES"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "patches"),
                  os.path.join(sys.prefix, "share", "megatron-let", "patches")]
    for directory in filter(None, candidates):
        if os.path.isfile(os.path.join(directory, PATCH_NAME)):
            return directory
    raise PatchError(f"{PATCH_NAME} not found (looked in {', '.join(filter(None, candidates))}); pass --patch FILE "
                     "or set MEGATRON_LET_PATCHES to the project's patches/ directory.")


def default_patch(path: Optional[str] = None) -> str:
    """The patch of this project's patches/ (or $MEGATRON_LET_PATCHES) for ``path``: the one that applies to it,
    or reverses from it where it is patched; the core_v0.16.1 one when none does (its error message says why)."""
    directory = _patch_directory()
    patches = [os.path.join(directory, name) for name in PATCH_NAMES if os.path.isfile(os.path.join(directory, name))]
    if path is not None and os.path.isfile(path):
        patched = MARKER in _read(path)
        for patch_file in patches:
            if _run_patch(path, patch_file, reverse=patched, dry_run=True)[0]:
                return patch_file
    return patches[0]


def _tool() -> str:
    if shutil.which("patch"):
        return "patch"
    if shutil.which("git"):
        return "git"
    raise PatchError("neither `patch` nor `git` is installed; install one (e.g. apt-get install patch).")


def _run_patch(target: str, patch_file: str, reverse: bool = False, dry_run: bool = False):
    """(ok, output) of applying ``patch_file`` to ``target`` (any file name) with patch or git apply."""
    if _tool() == "patch":
        cmd = ["patch", "--batch", "--forward" if not reverse else "--reverse", "--fuzz=0",
               "--no-backup-if-mismatch", "--reject-file=-", "--silent"]
        if dry_run:
            cmd.append("--dry-run")
        with open(patch_file, "rb") as stdin:
            proc = subprocess.run([*cmd, target], stdin=stdin, capture_output=True)
        return proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace").strip()
    # git apply wants the file under the name the diff gives it: work on a copy in a temp dir
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "pretrain_gpt.py")
        shutil.copyfile(target, copy)
        cmd = ["git", "apply", "--whitespace=nowarn"]
        if reverse:
            cmd.append("--reverse")
        if dry_run:
            cmd.append("--check")
        proc = subprocess.run([*cmd, os.path.abspath(patch_file)], cwd=tmp, capture_output=True,
                              env=dict(os.environ, GIT_CEILING_DIRECTORIES=os.path.dirname(tmp)))  # no repo: git apply acts like patch
        if proc.returncode == 0 and not dry_run:
            shutil.copyfile(copy, target)
        return proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace").strip()


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise PatchError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def is_patched(path: str, patch_file: Optional[str] = None) -> bool:
    """True if the LET patch is applied to ``path`` exactly (it reverses cleanly)."""
    if MARKER not in _read(path):
        return False
    ok, _ = _run_patch(path, patch_file or default_patch(path), reverse=True, dry_run=True)
    return ok


def _compiles(path: str) -> None:
    try:
        py_compile.compile(path, cfile=os.path.join(tempfile.gettempdir(), "let_patch_check.pyc"), doraise=True)
    except py_compile.PyCompileError as error:
        raise PatchError(f"{path} does not compile after patching: {error.msg}") from None


def apply_patch(path: str, patch_file: Optional[str] = None, backup: bool = False) -> str:
    """Apply the LET patch to ``path``; returns 'applied' or 'already applied'. Raises PatchError."""
    patch_file = patch_file or default_patch(path)
    source = _read(path)
    if MARKER in source:
        if is_patched(path, patch_file):
            _compiles(path)
            return "already applied"
        raise PatchError(f"{path} already calls megatron_let (`{MARKER}`) but not as {os.path.basename(patch_file)} "
                         "does: it was patched by hand or edited since; check it by eye or restore the original.")
    missing = [needle for needle in _REQUIRED_SOURCE if needle not in source]
    if missing:
        raise PatchError(f"{path} lacks {missing}: LET's Megatron-LM integration needs the pretrain_gpt.py layout of "
                         "Megatron-LM core_v0.16..core_v0.19 (get_batch(data_iterator, vp_stage), mtp_on_this_rank). "
                         "Use pretrain_gpt_let.py, or a newer Megatron-LM.")
    ok, output = _run_patch(path, patch_file, dry_run=True)
    if not ok:
        raise PatchError(f"{os.path.basename(patch_file)} does not apply to {path} (its __main__ block differs from "
                         f"core_v0.16.x..core_v0.17.x and core_v0.19.0):\n{output}\nAdd the two lines by hand before "
                         "`pretrain, store = inprocess_restart...`: `from megatron_let.integrations.patching import enable_let` "
                         "and `pretrain = enable_let(globals(), pretrain)`.")
    if backup:
        shutil.copyfile(path, path + ".orig")
    ok, output = _run_patch(path, patch_file)
    if not ok:  # the dry run passed: only an I/O problem gets here
        raise PatchError(f"applying {os.path.basename(patch_file)} to {path} failed:\n{output}")
    try:
        _compiles(path)
    except PatchError:
        _run_patch(path, patch_file, reverse=True)
        raise
    if not is_patched(path, patch_file):
        raise PatchError(f"{path}: the patch was applied but does not verify; restore the original")
    return "applied"


def revert_patch(path: str, patch_file: Optional[str] = None) -> str:
    """Remove the LET patch from ``path``; returns 'reverted' or 'not applied'."""
    patch_file = patch_file or default_patch(path)
    if MARKER not in _read(path):
        return "not applied"
    if not is_patched(path, patch_file):
        raise PatchError(f"{path} calls megatron_let but not as {os.path.basename(patch_file)} does; "
                         "remove the LET lines by hand.")
    ok, output = _run_patch(path, patch_file, reverse=True)
    if not ok:
        raise PatchError(f"reverting {os.path.basename(patch_file)} on {path} failed:\n{output}")
    return "reverted"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_let.integrations.patching",
                                     description="Enable LET in your own copy of Megatron-LM's pretrain_gpt.py.")
    parser.add_argument("command", choices=("apply", "check", "revert"),
                        help="apply: patch the file (idempotent); check: is it patched and does it compile; "
                             "revert: remove the patch")
    parser.add_argument("path", help="your pretrain_gpt.py")
    parser.add_argument("--patch", default=None, help=f"patch file (default: the one of patches/{{{','.join(PATCH_NAMES)}}} that fits)")
    parser.add_argument("--backup", action="store_true", help="apply: keep the original as PATH.orig")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.command == "apply":
            print(f"{args.path}: LET patch {apply_patch(args.path, args.patch, args.backup)}")
            return 0
        if args.command == "revert":
            print(f"{args.path}: LET patch {revert_patch(args.path, args.patch)}")
            return 0
        if not is_patched(args.path, args.patch):
            state = "patched differently (by hand?)" if MARKER in _read(args.path) else "not patched"
            print(f"{args.path}: {state}; run `{prog} apply {args.path}`", file=sys.stderr)
            return 1
        _compiles(args.path)
        print(f"{args.path}: LET patch applied; the file compiles")
        return 0
    except PatchError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
