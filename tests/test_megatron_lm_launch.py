"""pretrain_gpt_let.py as users launch it on Megatron-LM (issue 15): sample-based schedules with a
batch-size ramp-up, which trainer runs (and why not Megatron-LM), version checks, and the lean
trainer's LET features under Megatron-LM's pretrain(): --let-on-nonfinite skip, --let-export-dir,
LET's state in Megatron-LM's checkpoints, and a `let cos` that never vanishes from the log line.

Runs that need Megatron-LM skip where megatron.training is absent (megatron-core 0.16 without
MEGATRON_LM_PATH); on megatron-core 0.19 they run on the wheel's megatron.training. The selection and
error-path tests that need no checkout run everywhere.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from let_testing import (MEGATRON_LM_MODEL as MODEL_ARGS, NEEDS_MEGATRON_LM, NEEDS_MEGATRON_LM_CHECKOUT, ROOT, SCRIPT,
                         launch, lean_trainer_selectable, make_tiny_llama, megatron_lm_source, nan_teacher,
                         one_line_error, parse_log, torchrun)

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
OTHER_VERSION_CHECKOUT = os.environ.get("MEGATRON_LM_OTHER_VERSION_PATH", "/work/megatron-lm-0.17.1")
needs_megatron_lm = pytest.mark.skipif(megatron_lm_source() is None, reason=NEEDS_MEGATRON_LM)
needs_checkout = pytest.mark.skipif(not MEGATRON_LM_PATH, reason=NEEDS_MEGATRON_LM_CHECKOUT)


def _has_rampup() -> bool:
    from megatron_let.megatron_versions import rampup_calculator_class

    return rampup_calculator_class() is not None


# sample-based, the global batch 4 for the first 16 samples then 8, 48 samples in all (Megatron-LM's
# update_train_iters: 8 iterations; batch sizes 4 4 4 4 8 8 8 8): --rampup-batch-size up to 0.18, from 0.19
# --step-batch-size-schedule (thresholds in tokens: 16 samples x 32) without --global-batch-size
RAMP = ["--rampup-batch-size", 4, 4, 16] if _has_rampup() else ["--step-batch-size-schedule", "0:4 512:8"]
SAMPLE_FLAGS = ["--train-samples", 48, *RAMP, "--lr-warmup-samples", 8, "--lr-decay-samples", 48]


def _model_args(sample_based: bool = False):
    args = [str(a) for a in MODEL_ARGS]
    if sample_based and not _has_rampup():
        at = args.index("--global-batch-size")
        del args[at:at + 2]
    return args


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"))


def let_flags(teacher, *extra):
    return ["--let-teacher", teacher, "--let-target-layer", 1, "--let-lambda", 0.5, "--let-projector", "linear",
            *extra]


def lambda_iterations(logged: dict) -> list:
    """Iterations whose log line shows a positive `let lambda` (Megatron-LM omits a 0 average)."""
    return sorted(i for i, fields in logged.items() if fields.get("let lambda", 0) > 0)


def expected_stop(logged: dict, samples: int) -> int:
    """The first iteration after which Megatron-LM's own log line reports >= samples consumed."""
    return min(i for i, fields in logged.items() if fields["consumed samples"] >= samples)


# ------------------------------------------------------------------ sample-based stop on Megatron-LM
@needs_megatron_lm
@pytest.mark.parametrize("stop, stop_samples", [
    ([], 12),                               # default: 0.25 of --train-samples 48 = 12 samples
    (["--let-stop-fraction", 0.5], 24),     # 24 samples: iteration 5 (4 x 4 ramp-up, then 8)
    (["--let-stop-samples", 20], 20),       # first iteration with >= 20 consumed: 5
    (["--let-stop-iter", 6], None),         # iteration 6 = sample 32
], ids=["default", "fraction", "samples", "iter"])
def test_sample_based_run_stops_let_where_megatron_lm_counts(stop, stop_samples, teacher):
    proc = torchrun(SCRIPT, 1, [*_model_args(sample_based=True), *SAMPLE_FLAGS, *let_flags(teacher, *stop)],
                    megatron_lm=True)
    logged = parse_log(proc.stdout)
    assert "megatron-let: trainer: Megatron-LM pretrain()" in proc.stdout
    assert "setting training iterations to 8" in proc.stdout  # Megatron-LM's own count
    assert [logged[i]["global batch size"] for i in range(1, 9)] == [4, 4, 4, 4, 8, 8, 8, 8]
    stop_iter = 6 if stop_samples is None else expected_stop(logged, stop_samples)
    samples = logged[stop_iter]["consumed samples"]
    assert f"LET stops at iteration {stop_iter} = sample {int(samples)}" in proc.stdout
    assert lambda_iterations(logged) == list(range(1, stop_iter + 1)), logged


# ------------------------------------------------------------------ which trainer, or why not
@pytest.mark.skipif(not lean_trainer_selectable(), reason="this megatron-core wheel ships megatron.training: "
                    "pretrain_gpt_let.py runs Megatron-LM (test_wheel_runs_megatron_lm_pretrain_and_says_so)")
def test_no_checkout_runs_the_lean_trainer_and_says_so(teacher):
    proc = launch(["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
                   "--micro-batch-size", 2, "--train-iters", 1, "--lr", 1e-3, "--mock-data", "--vocab-size",
                   128, "--eval-iters", 0, "--recompute-granularity", "full"], drop_path=True)
    first = proc.stdout.splitlines()[0]
    assert first.startswith("megatron-let: trainer: lean megatron-core trainer (MEGATRON_LM_PATH is not set"), first
    from importlib.metadata import version

    assert f"megatron.core {version('megatron-core')} from" in first and "tested" in first
    one_line_error(proc)


@pytest.mark.skipif(megatron_lm_source() != "wheel", reason="needs a megatron-core wheel with megatron.training "
                    "(0.17+, Python 3.12)")
def test_wheel_runs_megatron_lm_pretrain_and_says_so(teacher):
    proc = torchrun(SCRIPT, 1, [*_model_args(), "--train-iters", 1, *let_flags(teacher, "--let-stop-iter", 1)],
                    megatron_lm=True)
    first = [line for line in proc.stdout.splitlines() if line.startswith("megatron-let: trainer:")]
    from importlib.metadata import version

    assert len(first) == 1 and first[0].startswith("megatron-let: trainer: Megatron-LM pretrain()"), first
    assert f"megatron.core {version('megatron-core')} from" in first[0] and "site-packages" in first[0], first
    assert "megatron.training from" in first[0] and f"megatron {version('megatron-core')}: tested" in first[0], first
    assert "lm loss" in parse_log(proc.stdout)[1] and "let loss" in parse_log(proc.stdout)[1]


def _megatron_of_version(tmp_path, minor: int) -> str:
    """A copy of the installed megatron (core, and training where the wheel ships it) that says 0.<minor>.0;
    returns a PYTHONPATH that finds it first."""
    import re

    import megatron.core

    installed = os.path.dirname(os.path.dirname(megatron.core.__file__))
    for package in ("core", "training"):
        if os.path.isdir(os.path.join(installed, package)):
            shutil.copytree(os.path.join(installed, package), tmp_path / "megatron" / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
    info_path = tmp_path / "megatron" / "core" / "package_info.py"
    info = re.sub(r"^MINOR = .*$", f"MINOR = {minor}", info_path.read_text(), flags=re.M)
    info_path.write_text(re.sub(r"^PATCH = .*$", "PATCH = 0", info, flags=re.M))
    return f"{tmp_path}{os.pathsep}{ROOT}"


def test_unsupported_megatron_core_is_one_line(tmp_path):
    """A megatron-core older than 0.16 (here a copy of the installed one that says 0.15.0): refused before
    any process group, naming the found and the supported versions, with the fix for where it came from."""
    path = {"PYTHONPATH": _megatron_of_version(tmp_path, 15)}
    line = one_line_error(launch(["--help"], env_extra=path, drop_path=True))
    assert "megatron-core 0.15.0 is not supported: megatron-let supports 0.16 or newer (tested: 0.16.1, 0.19.x)" \
        in line, line
    assert "pip install 'megatron-core>=0.16'" in line, line
    (tmp_path / "pretrain_gpt.py").write_text("")  # now it looks like a Megatron-LM checkout: git's fix
    line = one_line_error(launch(["--help"], env_extra=path, drop_path=True))
    assert f"check out a supported release in it (git -C {tmp_path} checkout core_v0.19.0" in line, line


def test_newer_megatron_core_runs_with_one_warning(tmp_path):
    """A megatron-core newer than the newest tested minor (a copy that says 0.99.0) is not refused: the start-up
    line says "newer than tested" and one warning line follows (the run then stops at a bad LET flag)."""
    proc = launch(["--let-lambda", "abc"], env_extra={"PYTHONPATH": _megatron_of_version(tmp_path, 99)},
                  drop_path=True)
    one_line_error(proc)  # the bad flag, not the version
    assert "not supported" not in proc.stderr
    first = [line for line in proc.stdout.splitlines() if line.startswith("megatron-let: trainer:")]
    assert len(first) == 1 and "megatron 0.99.0: newer than tested (0.16.1, 0.19.x)" in first[0], proc.stdout[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if "newer than tested" in line and "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith("megatron-let: WARNING: megatron-core 0.99.0 is newer "
                                                         "than tested"), proc.stdout[-2000:]


def test_checkout_without_megatron_training_is_refused(tmp_path):
    line = one_line_error(launch(["--help"], env_extra={"MEGATRON_LM_PATH": str(tmp_path)}))
    assert f"MEGATRON_LM_PATH={tmp_path} holds no megatron/training" in line


@needs_checkout
def test_broken_megatron_lm_import_exits_with_the_import_error(tmp_path):
    """A package Megatron-LM's training code needs, missing on the machine (its BERT tokenizer's `six` up to 0.19;
    on main, where `six` is gone, the first of einops, tqdm, numpy it cannot do without): one line naming it and the
    pip command, never a silent fall-back to the lean trainer."""
    for package in ("six", "einops", "tqdm", "numpy"):
        hide = tmp_path / f"hide_{package}"
        hide.mkdir()
        # sitecustomize runs at start-up in the launched process: the import fails there as if not installed
        (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
        proc = launch(["--num-layers", 2, "--let-stop-iter", 1],
                      env_extra={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}", "MEGATRON_LM_PATH": MEGATRON_LM_PATH})
        line = one_line_error(proc)
        if "cannot be imported" in line:
            break
        assert "--let-stop-iter given without --let-teacher" in line, line  # this Megatron-LM runs without it
    else:
        pytest.fail("this Megatron-LM imports without six, einops, tqdm and numpy: hide another package it needs")
    assert f"MEGATRON_LM_PATH={os.path.abspath(MEGATRON_LM_PATH)} but Megatron-LM cannot be imported" in line
    assert f"'{package}'" in line and f"pip install {package}" in line
    assert "megatron-core trainer" not in proc.stdout  # no silent fall-back


@needs_checkout
def test_megatron_core_comes_from_the_checkout(teacher):
    proc = torchrun(SCRIPT, 1, [*_model_args(), "--train-iters", 1, *let_flags(teacher, "--let-stop-iter", 1)],
                    megatron_lm=True)
    first = [line for line in proc.stdout.splitlines() if line.startswith("megatron-let: trainer:")]
    checkout = os.path.abspath(MEGATRON_LM_PATH)
    assert len(first) == 1
    from megatron_let.megatron_versions import version_in_directory

    version = version_in_directory(os.path.join(checkout, "megatron", "core"))
    assert f"megatron.core {version} from {checkout}/megatron/core" in first[0], first
    assert f"megatron.training from {checkout}/megatron/training" in first[0], first


@pytest.mark.skipif(not os.path.isfile(os.path.join(OTHER_VERSION_CHECKOUT, "megatron", "core", "package_info.py")),
                    reason="needs a Megatron-LM checkout of another version than the installed megatron-core: "
                           "git clone --branch core_v0.17.1 https://github.com/NVIDIA/Megatron-LM DIR && "
                           "export MEGATRON_LM_OTHER_VERSION_PATH=DIR")
def test_megatron_core_of_another_version_already_imported_is_refused():
    """A wrapper that imported megatron.core (the pip wheel, 0.16.1) before pointing at a 0.17.1 checkout:
    Megatron-LM 0.17.1's training code would run on megatron.core 0.16.1."""
    code = ("import sys, megatron.core, pretrain_gpt_let; "
            "sys.exit(pretrain_gpt_let.main())")
    env = dict(os.environ, PYTHONPATH=ROOT, MEGATRON_LM_PATH=OTHER_VERSION_CHECKOUT, PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code, "--num-layers", "2"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    line = one_line_error(proc)
    assert "version mismatch: megatron.core 0.16.1 was already imported from" in line
    assert "is Megatron-LM 0.17.1" in line


# ------------------------------------------------------------------ lean-trainer features on Megatron-LM
@needs_megatron_lm
def test_nonfinite_skip_under_megatron_lm(tmp_path, teacher):
    bad = nan_teacher(str(tmp_path / "nan"), teacher)
    proc = torchrun(SCRIPT, 1, [*_model_args(), "--train-iters", 3,
                                *let_flags(bad, "--let-stop-iter", 2, "--let-on-nonfinite", "skip")],
                    megatron_lm=True)
    logged = parse_log(proc.stdout)
    for i in (1, 2):  # before the stop step: the NaN teacher's steps are skipped, training goes on
        assert f"alignment loss at iteration {i} on rank(s) [0]: optimizer step skipped" in proc.stdout
    # (Megatron-LM keeps its first interval's totals: the second line counts both skipped steps)
    assert [logged[i]["number of skipped iterations"] for i in (1, 2, 3)] == [1, 2, 0], logged
    assert "lm loss" in logged[3] and "Unexpected result nan" not in proc.stdout + proc.stderr
    assert torch.isfinite(torch.tensor(logged[3]["lm loss"]))


@needs_megatron_lm
def test_export_and_let_state_in_megatron_lm_checkpoints(tmp_path, teacher):
    ckpt, export, gone = tmp_path / "ckpt", tmp_path / "export", tmp_path / "teacher"
    shutil.copytree(teacher, gone)
    common = [*_model_args(), *let_flags(str(gone), "--let-stop-iter", 2), "--save", ckpt, "--save-interval", 2,
              "--train-iters", 3]
    torchrun(SCRIPT, 1, [*common, "--exit-interval", 2], megatron_lm=True)
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(ckpt / "iter_0000002"))["args"].let_state
    assert saved["stop_iter"] == 2 and saved["stop_samples"] == 16 and saved["config"]["target_layer"] == 1
    assert saved["teacher_hidden_size"] == 48

    # resume with the teacher gone: past the stop step it is never read (its width comes from the checkpoint)
    shutil.rmtree(gone)
    proc = torchrun(SCRIPT, 1, [*common, "--load", ckpt], megatron_lm=True)
    assert " iteration        3/" in proc.stdout and "LET settings differ" not in proc.stdout

    # export: the model without the projector, through Megatron-LM's save_checkpoint; a plain run loads it
    proc = torchrun(SCRIPT, 1, [*_model_args(), *let_flags(teacher, "--let-stop-iter", 2), "--load", ckpt,
                                "--train-iters", 3, "--no-load-rng", "--let-export-dir", export], megatron_lm=True)
    assert f"without LET state to {export}" in proc.stdout and "consumed samples" not in proc.stdout  # no training
    keys = open(export / "iter_0000003" / ".metadata", "rb").read()
    assert b"let_alignment" in open(ckpt / "iter_0000003" / ".metadata", "rb").read()  # the projector was saved
    assert b"decoder.layers." in keys and b"let_alignment" not in keys
    plain = torchrun(SCRIPT, 1, [*_model_args(), "--load", export, "--train-iters", 4, "--no-load-optim",
                                 "--no-load-rng"], megatron_lm=True)
    assert "loaded checkpoint" in plain.stdout and " iteration        4/" in plain.stdout


def _negated_teacher(path, like):
    """The same teacher with its final norm's weight negated: its final hidden states are exactly -h, so
    (with the linear interp projector) every cosine of the run flips sign."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(like)
    with torch.no_grad():
        model.model.norm.weight.neg_()
    model.save_pretrained(path)
    return path


@needs_megatron_lm
def test_negative_let_cos_is_printed(tmp_path, teacher):
    """Megatron-LM prints only positive averages: of a teacher and its negation, one gives let cos < 0."""
    cos = []
    for which in (teacher, _negated_teacher(str(tmp_path / "neg"), teacher)):
        proc = torchrun(SCRIPT, 1, [*_model_args(), "--train-iters", 1, "--init-method-std", 0.02,
                                    *let_flags(which, "--let-stop-iter", 10, "--let-projector", "interp")],
                        megatron_lm=True)
        logged = parse_log(proc.stdout)
        assert "let cos" in logged[1], proc.stdout[-2000:]
        cos.append(logged[1]["let cos"])
    assert min(cos) < 0 < max(cos) and cos[0] == pytest.approx(-cos[1], rel=1e-4), cos
