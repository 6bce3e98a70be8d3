"""patches/ and ``python -m megatron_let.integrations.patching``: LET in a user's own copy of pretrain_gpt.py.

Always: every patch is a well-formed unified diff (hunk line counts match their headers), only adds a
few lines that call ``megatron_let.integrations.patching.enable_let``, and the command refuses what it cannot
patch with a clear message. With a Megatron-LM checkout (``MEGATRON_LM_PATH``):
the patch applies with ``patch`` and with ``git apply`` to a temp copy of its pretrain_gpt.py, the
result compiles, a second ``apply`` is a no-op, ``check`` passes and ``revert`` restores the file
byte for byte; and the patched script trains 2 iterations on CPU (gloo, mock data, a tiny Hugging
Face teacher) logging the same ``lm loss`` / ``let loss`` / ``let lambda`` as ``pretrain_gpt_let.py``,
and without ``--let-*`` flags logs no LET scalars. With ``MEGATRON_LM_GIT_DIR`` (a Megatron-LM git
directory holding the tags) the patch is also checked against each tag in ``APPLIES_TO``.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from let_testing import (MEGATRON_LM_MODEL as MODEL_ARGS, NEEDS_MEGATRON_LM_CHECKOUT, NEEDS_MEGATRON_LM_GIT_DIR, ROOT,
                         parse_log, torchrun)

PATCHES = sorted(glob.glob(os.path.join(ROOT, "patches", "*.patch")))
PATCH = os.path.join(ROOT, "patches", "pretrain_gpt.core_v0.16.1.patch")
PATCH_019 = os.path.join(ROOT, "patches", "pretrain_gpt.core_v0.19.0.patch")
# tags whose pretrain_gpt.py a patch applies to without fuzz (checked with MEGATRON_LM_GIT_DIR): which patch, and
# whether the command accepts the script (LET needs get_batch(..., vp_stage) and mtp_on_this_rank: core_v0.16+)
APPLIES_TO = {"core_v0.13.1": (PATCH, False), "core_v0.14.0": (PATCH, False), "core_v0.15.0": (PATCH, False),
              "core_v0.15.3": (PATCH, False), "core_v0.16.0": (PATCH, True), "core_v0.16.1": (PATCH, True),
              "core_v0.17.0": (PATCH, True), "core_v0.17.1": (PATCH, True), "core_v0.18.0": (PATCH_019, True),
              "core_v0.18.2": (PATCH_019, True), "core_v0.19.0": (PATCH_019, True)}
DOES_NOT_APPLY = ("core_v0.12.3",)  # __main__ differs: the command says so

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_unified_diff(text: str):
    """[(old_file, new_file, [hunk dicts])]; raises AssertionError on anything malformed."""
    files, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            assert not lines[i].startswith(("+++ ", "@@")), f"line {i + 1}: {lines[i]!r} outside a file header"
            i += 1  # free text before the diff (a description), as patch and git apply allow
            continue
        assert i + 1 < len(lines) and lines[i + 1].startswith("+++ "), f"line {i + 1}: --- without +++"
        old, new = lines[i][4:].split("\t")[0], lines[i + 1][4:].split("\t")[0]
        i += 2
        hunks = []
        while i < len(lines) and lines[i].startswith("@@"):
            match = _HUNK.match(lines[i])
            assert match, f"line {i + 1}: bad hunk header {lines[i]!r}"
            old_start, old_len = int(match.group(1)), int(match.group(2) or 1)
            new_start, new_len = int(match.group(3)), int(match.group(4) or 1)
            i += 1
            body = []
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_len or seen_new < new_len):
                line = lines[i]
                if line.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                tag = line[:1] if line else " "
                assert tag in " +-", f"line {i + 1}: {line!r} inside a hunk"
                seen_old += tag in " -"
                seen_new += tag in " +"
                body.append((tag, line[1:]))
                i += 1
            assert (seen_old, seen_new) == (old_len, new_len), \
                f"hunk at -{old_start} has {seen_old}/{seen_new} lines, header says {old_len}/{new_len}"
            hunks.append(dict(old_start=old_start, new_start=new_start, body=body))
        assert hunks, f"{old}: a file header without hunks"
        files.append((old, new, hunks))
    assert files, "no diff in the file"
    return files


# -- without a checkout ------------------------------------------------------------------------------

def test_patches_exist():
    assert PATCH in PATCHES


@pytest.mark.parametrize("patch", PATCHES, ids=os.path.basename)
def test_patch_is_a_minimal_unified_diff(patch):
    (old, new, hunks), = parse_unified_diff(open(patch).read())
    assert old == "a/pretrain_gpt.py" and new == "b/pretrain_gpt.py"
    removed = [text for hunk in hunks for tag, text in hunk["body"] if tag == "-"]
    added = [text for hunk in hunks for tag, text in hunk["body"] if tag == "+"]
    assert not removed, "the patch should only add lines"
    code = [line.strip() for line in added if line.strip() and not line.strip().startswith("#")]
    assert code == ["from megatron_let.integrations.patching import enable_let", "pretrain = enable_let(globals(), pretrain)"]
    # and it is placed in __main__, before Megatron-LM's in-process-restart wrapper wraps pretrain
    context_after = [text for tag, text in hunks[0]["body"][-3:] if tag == " "]
    assert any("inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)" in line for line in context_after)


def test_enable_let_is_the_public_hook():
    from megatron_let.integrations import patching

    assert callable(patching.enable_let) and patching.MARKER in open(PATCH).read()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_let.integrations.patching", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_cli_refuses_with_reasons(tmp_path):
    missing = _cli("apply", tmp_path / "nope.py")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    old = tmp_path / "pretrain_gpt.py"
    old.write_text("def get_batch(data_iterator):\n    pass\n\nif __name__ == '__main__':\n    pass\n")
    refused = _cli("apply", old)
    assert refused.returncode == 2 and "core_v0.16" in refused.stderr and "pretrain_gpt_let.py" in refused.stderr
    assert old.read_text().startswith("def get_batch(data_iterator):")  # untouched
    unpatched = _cli("check", old)
    assert unpatched.returncode == 1 and "not patched" in unpatched.stderr
    assert _cli("revert", old).stdout.strip().endswith("not applied")


# -- with a Megatron-LM checkout ---------------------------------------------------------------------

def _checkout():
    for path in (os.environ.get("MEGATRON_LM_PATH"),):
        if path and os.path.isfile(os.path.join(path, "pretrain_gpt.py")) and \
                os.path.isdir(os.path.join(path, "megatron", "training")):
            return os.path.abspath(path)
    return None


CHECKOUT = _checkout()
needs_checkout = pytest.mark.skipif(CHECKOUT is None, reason=NEEDS_MEGATRON_LM_CHECKOUT)


@pytest.fixture
def user_copy(tmp_path):
    copy = tmp_path / "pretrain_gpt.py"
    shutil.copyfile(os.path.join(CHECKOUT, "pretrain_gpt.py"), copy)
    return copy


@needs_checkout
def test_apply_check_revert_with_patch(user_copy):
    original = user_copy.read_bytes()
    assert _cli("check", user_copy).returncode == 1
    first = _cli("apply", user_copy)
    assert first.returncode == 0 and first.stdout.strip().endswith("LET patch applied"), first.stderr
    patched = user_copy.read_text()
    assert "pretrain = enable_let(globals(), pretrain)" in patched
    second = _cli("apply", user_copy)
    assert second.returncode == 0 and "already applied" in second.stdout
    assert user_copy.read_text() == patched  # idempotent
    check = _cli("check", user_copy)
    assert check.returncode == 0 and "compiles" in check.stdout
    assert not (user_copy.parent / "pretrain_gpt.py.orig").exists()
    assert _cli("revert", user_copy).returncode == 0
    assert user_copy.read_bytes() == original


@needs_checkout
def test_apply_with_git_apply(user_copy, monkeypatch):
    """Where `patch` is not installed, git apply does the same (on a copy in a temp directory)."""
    import py_compile

    from megatron_let.integrations import patching

    monkeypatch.setattr(patching, "_tool", lambda: "git")
    assert patching.apply_patch(str(user_copy), backup=True) == "applied"
    assert (user_copy.parent / "pretrain_gpt.py.orig").exists()
    py_compile.compile(str(user_copy), cfile=str(user_copy.parent / "x.pyc"), doraise=True)
    assert patching.is_patched(str(user_copy))
    assert patching.apply_patch(str(user_copy)) == "already applied"


@needs_checkout
def test_hand_edited_patch_is_reported(user_copy):
    assert _cli("apply", user_copy).returncode == 0
    user_copy.write_text(user_copy.read_text().replace("pretrain = enable_let(globals(), pretrain)",
                                                       "pretrain = enable_let(globals(), pretrain)  # mine"))
    again = _cli("apply", user_copy)
    assert again.returncode == 2 and "by hand" in again.stderr
    assert _cli("check", user_copy).returncode == 1


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_GIT_DIR"), reason=NEEDS_MEGATRON_LM_GIT_DIR)
@pytest.mark.parametrize("tag", [*APPLIES_TO, *DOES_NOT_APPLY])
def test_patch_across_megatron_lm_tags(tag, tmp_path):
    git_dir = os.environ["MEGATRON_LM_GIT_DIR"]
    shown = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{tag}:pretrain_gpt.py"], capture_output=True)
    if shown.returncode != 0:
        pytest.skip(f"{tag} is not in MEGATRON_LM_GIT_DIR={git_dir}: git --git-dir={git_dir} fetch --tags")
    target = tmp_path / "pretrain_gpt.py"
    target.write_bytes(shown.stdout)
    patch_file, accepted = APPLIES_TO.get(tag, (PATCH, False))
    dry = subprocess.run(["patch", "--dry-run", "--batch", "--forward", "--fuzz=0", str(target)],
                         stdin=open(patch_file), capture_output=True)
    assert (dry.returncode == 0) == (tag in APPLIES_TO), dry.stdout
    result = _cli("apply", target)
    assert result.returncode == (0 if accepted else 2), result.stderr


# -- the patched script trains -----------------------------------------------------------------------

_RUNNER = '''\
"""Run the patched pretrain_gpt.py as `python pretrain_gpt.py` would, after LET's CPU redirections
(which pretrain_gpt_let.py applies itself; a GPU run needs none of this)."""
import os, runpy, sys
os.environ.setdefault("MEGATRON_LM_PATH", {checkout!r})
from megatron_let.integrations.selection import choose_trainer  # imports no megatron: the checkout's goes first
assert choose_trainer().megatron_lm
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_gpt.py")
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''

ITERS = 2


@pytest.fixture(scope="module")
def patched_script(tmp_path_factory):
    if CHECKOUT is None:
        pytest.skip(NEEDS_MEGATRON_LM_CHECKOUT)
    directory = tmp_path_factory.mktemp("user_megatron")
    shutil.copyfile(os.path.join(CHECKOUT, "pretrain_gpt.py"), directory / "pretrain_gpt.py")
    result = _cli("apply", directory / "pretrain_gpt.py")
    assert result.returncode == 0, result.stderr
    (directory / "run_patched.py").write_text(_RUNNER.format(checkout=CHECKOUT))
    return str(directory / "run_patched.py")


@pytest.fixture
def megatron_env(monkeypatch):
    monkeypatch.setenv("MEGATRON_LM_PATH", CHECKOUT)


def _train(script, extra):
    proc = torchrun(script, 1, [*MODEL_ARGS, "--train-iters", ITERS, *extra], timeout=600, megatron_lm=True)
    logged = parse_log(proc.stdout)
    assert set(logged) >= set(range(1, ITERS + 1)), f"no Megatron-LM log lines:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return logged


@pytest.mark.usefixtures("megatron_env")
def test_patched_pretrain_gpt_trains_with_let(patched_script, tiny_teacher):
    let = ["--let-teacher", tiny_teacher, "--let-target-layer", 2, "--let-lambda", 0.5, "--let-stop-iter", 100,
           "--let-projector", "linear"]
    patched = _train(patched_script, let)
    drop_in = _train(os.path.join(ROOT, "pretrain_gpt_let.py"), let)
    for iteration in range(1, ITERS + 1):  # shown with -s
        print(f"iteration {iteration}: patched {patched[iteration]} | pretrain_gpt_let.py {drop_in[iteration]}")
        assert {"lm loss", "let loss", "let cos", "let lambda"} <= set(patched[iteration]), patched[iteration]
        for key in ("lm loss", "let loss", "let lambda"):
            assert patched[iteration][key] == pytest.approx(drop_in[iteration][key], rel=1e-6), \
                f"iteration {iteration} {key}: patched pretrain_gpt.py differs from pretrain_gpt_let.py"
    assert patched[1]["let lambda"] == pytest.approx(0.5)


@pytest.mark.usefixtures("megatron_env")
def test_patched_pretrain_gpt_without_let_is_plain(patched_script):
    logged = _train(patched_script, [])
    assert "lm loss" in logged[1] and not any(key.startswith("let") for key in logged[1])


@pytest.mark.usefixtures("megatron_env")
def test_patched_pretrain_gpt_reports_let_errors(patched_script, tiny_teacher):
    proc = torchrun(patched_script, 1, [*MODEL_ARGS, "--train-iters", ITERS, "--let-teacher", tiny_teacher,
                                        "--let-target-layer", 9, "--let-stop-iter", 10],
                    timeout=600, expect_failure=True, megatron_lm=True)
    assert proc.returncode != 0
    assert "error: --let-target-layer 9 is beyond the model's --num-layers 4" in proc.stderr
