"""Resuming a LET checkpoint: what a launch may drop or restate, on whichever trainer this stack selects.

Python 3.11 (megatron-core 0.16.1) runs pretrain_gpt_let.py on the lean trainer, Python 3.12 (0.19) on
Megatron-LM's own pretrain(); the same cases run on both (issue 32, items 3, 5, 6, 7):

- a checkpoint saved while LET was aligning, resumed without --let-* flags, is refused in one line that holds
  the checkpoint's own flags (pasted back, they resume cleanly) and ``--let-teacher none``, which ends LET on
  purpose; past the stop step a resume without flags trains on;
- defaults typed out (``--let-lambda auto --let-lambda-auto-fraction 3.0``) are no change: no warning, and the
  checkpoint's stop step stands;
- ``let lambda`` is in every log line while LET runs (0 in --let-lambda auto's first iteration);
- (3.12) a checkpoint of TP1 resumes at TP2 and PP2 with a learned projector and logs TP1's numbers.
"""

import os
import re
import shlex
import shutil

import pytest

from let_testing import (MEGATRON_LM_MODEL as MODEL_ARGS, ROOT, launch, lean_trainer_selectable, make_tiny_llama,
                         megatron_lm_source, one_line_error, parse_log, refused, torchrun)

LEAN = lean_trainer_selectable()
LEAN_MODEL = ["--num-layers", 4, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
              "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "1e-3", "--mock-data", "--vocab-size", 127,
              "--log-interval", 1, "--eval-iters", 0, "--eval-interval", 100]
MODEL = [*(LEAN_MODEL if LEAN else MODEL_ARGS), "--lr-decay-iters", 8]  # one lr schedule whatever --train-iters
TRAIN_ITERS, STOP = 8, 2  # --let-stop-fraction's default 0.25 of 8


def needs_a_trainer():
    if not LEAN and megatron_lm_source() is None:
        pytest.skip("pretrain_gpt_let.py has no trainer on this stack")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"), vocab_size=128)


def let_flags(teacher):
    """The checkpoint's LET: defaults for lambda (auto) and the stop step (a quarter of --train-iters)."""
    return ["--let-teacher", teacher, "--let-target-layer", 1, "--let-projector", "linear"]


def train(args, expect_ok=True):
    proc = launch(args)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoints(teacher, tmp_path_factory):
    """One LET run saved at iterations 1 (LET aligning: its stop step is 2) and 2 (past it); each test gets
    copies whose tracker names one of them (the lean trainer has no --ckpt-step)."""
    needs_a_trainer()
    root = tmp_path_factory.mktemp("resume_safety")
    saved = root / "saved"
    train([*MODEL, *let_flags(teacher), "--train-iters", TRAIN_ITERS, "--save", saved, "--save-interval", 1,
           "--exit-interval", 2])
    assert sorted(os.listdir(saved)) == ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"]
    return saved


def at(checkpoints, tmp_path, iteration: int):
    """A copy of the checkpoints whose tracker names ``iteration``."""
    copy = shutil.copytree(checkpoints, tmp_path / f"at{iteration}")
    (copy / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return copy


def resume(checkpoint, *extra, iters=TRAIN_ITERS):
    """Megatron-LM asserts the saved lr / weight-decay schedule unless told to take the new --train-iters'."""
    override = ["--override-opt_param-scheduler"] if iters != TRAIN_ITERS and not LEAN else []
    return [*MODEL, "--train-iters", iters, "--load", checkpoint, *override, *extra]


# ------------------------------------------------------------------ item 3: LET dropped on resume
@pytest.mark.parametrize("extra", [[], ["--no-load-optim", "--no-load-rng"]], ids=["plain", "no_load_optim"])
def test_resume_without_let_flags_while_aligning_is_refused(checkpoints, teacher, tmp_path, extra):
    ckpt = at(checkpoints, tmp_path, 1)
    line = refused(resume(ckpt, "--save", ckpt, "--save-interval", 1, *extra), files=[ckpt],
                   fragments=["--let-teacher is missing", f"--load {ckpt} (iteration 1)", f"stop step is {STOP}",
                              f"--let-teacher {teacher} --let-target-layer 1 --let-projector linear",
                              "--let-teacher none"])
    assert "--let-lambda" not in line  # defaults are not restated


def test_the_refusals_flags_resume_cleanly(checkpoints, tmp_path):
    """The flags the refusal names, pasted back, resume LET as saved: no 'settings differ' warning."""
    ckpt = at(checkpoints, tmp_path, 1)
    line = one_line_error(launch(resume(ckpt), hold_port=True))
    flags = shlex.split(re.search(r"LET flags: (.*?); or end LET", line).group(1))
    proc = train(resume(ckpt, *flags, "--exit-interval", 2))
    assert "settings differ" not in proc.stdout + proc.stderr
    logged = parse_log(proc.stdout)
    assert sorted(logged) == [2] and logged[2]["let loss"] > 0, proc.stdout[-3000:]


def test_let_teacher_none_ends_let_and_says_so(checkpoints, tmp_path):
    ckpt = at(checkpoints, tmp_path, 1)
    proc = train(resume(ckpt, "--let-teacher", "none", "--exit-interval", 2))
    assert f"LET ended at iteration 1 by --let-teacher none (the checkpoint's stop step was {STOP})" in proc.stdout
    logged = parse_log(proc.stdout)
    assert sorted(logged) == [2] and "lm loss" in logged[2] and not any(k.startswith("let ") for k in logged[2])


def test_let_teacher_none_with_other_let_flags_is_refused(checkpoints, tmp_path):
    ckpt = at(checkpoints, tmp_path, 1)
    refused(resume(ckpt, "--let-teacher", "none", "--let-target-layer", 1), files=[ckpt],
            fragments=["--let-target-layer", "given with --let-teacher none"])


def test_resume_without_let_flags_past_the_stop_step_trains_on(checkpoints, tmp_path):
    ckpt = at(checkpoints, tmp_path, 2)
    proc = train(resume(ckpt, "--exit-interval", 3))
    assert "error:" not in proc.stderr and "LET ended" not in proc.stdout
    logged = parse_log(proc.stdout)
    assert sorted(logged) == [3] and not any(k.startswith("let ") for k in logged[3])


def test_ckpt_step_names_the_checkpoint_checked(checkpoints, tmp_path):
    """Megatron-LM's --ckpt-step 1 resumes the aligning checkpoint although the tracker names the past one."""
    if LEAN:
        pytest.skip("--ckpt-step is Megatron-LM's flag")
    ckpt = at(checkpoints, tmp_path, 2)
    refused(resume(ckpt, "--ckpt-step", 1), files=[ckpt], fragments=["(iteration 1)", "--let-teacher none"])


def test_hybrid_script_refuses_the_same(checkpoints, tmp_path):
    """pretrain_hybrid_let.py runs the same launch check (the LET state is read whatever model wrote it)."""
    if LEAN:
        pytest.skip("pretrain_hybrid_let.py needs megatron-core 0.19 (Python 3.12)")
    ckpt = at(checkpoints, tmp_path, 1)
    args = [str(a) for a in resume(ckpt)]
    del args[args.index("--num-layers"):args.index("--num-layers") + 2]  # the pattern gives the layers
    refused([*args, "--hybrid-layer-pattern", "*-*-*-*-"], files=[ckpt], script="pretrain_hybrid_let.py",
            fragments=["--let-teacher is missing", "--let-teacher none"])


# ------------------------------------------------------------------ item 5: defaults typed out are no change
def test_defaults_written_out_keep_the_checkpoints_stop_step(checkpoints, teacher, tmp_path):
    """--train-iters 16 would put the default stop step at 4; with the checkpoint's own settings (defaults typed
    out) the checkpoint's stop step 2 stands and no 'settings differ' warning is printed."""
    ckpt = at(checkpoints, tmp_path, 1)
    proc = train(resume(ckpt, *let_flags(teacher), "--let-lambda", "auto", "--let-lambda-auto-fraction", "3.0",
                        "--let-stop-fraction", "0.25", "--let-stop", "schedule", "--exit-interval", 2, iters=16))
    assert "settings differ" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert f"LET keeps the checkpoint's stop iteration {STOP} (the current schedule flags would give 4)" in proc.stdout


def test_a_real_change_still_warns_and_moves_the_stop_step(checkpoints, teacher, tmp_path):
    ckpt = at(checkpoints, tmp_path, 1)
    proc = train(resume(ckpt, *let_flags(teacher), "--let-lambda-auto-fraction", "2.0", "--exit-interval", 2,
                        iters=16))
    assert "LET settings differ from the checkpoint's: lambda_auto_fraction" in proc.stdout
    assert "LET keeps" not in proc.stdout


def test_every_derived_default_compares_resolved():
    """Each field whose None stands for a derived value equals that value typed out, both ways, and an old
    checkpoint's config (fields missing) compares as the defaults."""
    from megatron_let.config import DEFAULT_STOP_AUTO, LETConfig
    from megatron_let.resume import changed_settings, refuse_unusable_projector

    base = dict(teacher="/t", target_layer=1)
    pairs = [({}, dict(lambda_auto_fraction=3.0)), ({}, dict(stop_fraction=0.25)), ({}, dict(teacher_layer=-1)),
             ({}, dict(teacher_layer=2)),  # the teacher's final layer: it has 2
             (dict(projector="mlp"), dict(projector="mlp", projector_hidden_size=32)),
             (dict(token_alignment="causal-span"), dict(token_alignment="causal-span", teacher_tokenizer="/t")),
             (dict(stop="auto"), dict(stop="auto", **{f"stop_auto_{k}": v for k, v in DEFAULT_STOP_AUTO.items()})),
             (dict(lambda0=1.0), dict(lambda0=1))]
    for left, right in pairs:
        for saved, now in ((left, right), (right, left)):
            assert changed_settings(LETConfig(**base, **saved).to_dict(), LETConfig(**base, **now),
                                    hidden_size=32, teacher_layers=2) == [], (saved, now)
    old = {"teacher": "/t", "target_layer": 1, "lambda0": "auto"}  # a checkpoint predating most fields
    assert changed_settings(old, LETConfig(**base, lambda_auto_fraction=3.0), hidden_size=32) == []
    assert changed_settings(old, LETConfig(**base, lambda_auto_fraction=2.0)) == ["lambda_auto_fraction"]
    assert changed_settings(LETConfig(**base).to_dict(), LETConfig(**base, teacher_layer=1), 32, 2) == ["teacher_layer"]
    assert changed_settings(LETConfig(**base).to_dict(), LETConfig(**base, lambda0=0.3)) == ["lambda0"]  # the mode only
    mlp = {"config": LETConfig(**base, projector="mlp").to_dict()}
    refuse_unusable_projector(mlp, LETConfig(**base, projector="mlp", projector_hidden_size=32), hidden_size=32)


# ------------------------------------------------------------------ item 6: let lambda in every line
def test_let_lambda_is_logged_from_the_first_iteration(teacher, tmp_path):
    """--let-lambda auto only measures in its first iteration (weight 0): the column is there, at 0."""
    needs_a_trainer()
    proc = train([*MODEL, *let_flags(teacher), "--train-iters", 2, "--let-stop-iter", 50])
    logged = parse_log(proc.stdout)
    assert logged[1]["let lambda"] == 0.0 and logged[2]["let lambda"] > 0, proc.stdout[-3000:]


def test_megatron_lm_line_gets_zero_lambda_back():
    """Megatron-LM up to 0.18 prints only entries whose interval average is > 0: the wrapper of its print puts
    a zero 'let lambda' / 'let loss' (and a negative 'let cos') back, in LET's order, while LET runs."""
    import types

    from megatron_let.driver import LETDriver
    from megatron_let.integrations.megatron_lm import LETMegatronLM, _log_let_scalars, _signed_scalars_in_line

    printed = []
    training = types.SimpleNamespace(training_log=lambda loss_dict, total, *a, **k: None,
                                     print_rank_last=printed.append)
    integration = LETMegatronLM(script=None)
    let = types.SimpleNamespace(finished=False, report=lambda: {"let loss": 0.0, "let cos": -0.25, "let lambda": 0.0,
                                                                "let ratio": 0.5})
    integration.driver = LETDriver(let, 1, 8, printed.append)
    _log_let_scalars(training, integration)  # the registry's entries let.training-log and let.print-rank-last
    _signed_scalars_in_line(training, integration)
    training.training_log({}, {}, skipped_iter=0)
    training.print_rank_last(" iteration 1/ 8 | consumed samples: 8 | lm loss: 4.8E+00 | let ratio: 5.0E-01 |"
                             " loss scale: 1.0 |")
    assert printed[-1].endswith("lm loss: 4.8E+00 | let loss: 0.000000E+00 | let cos: -2.500000E-01 | "
                                "let lambda: 0.000000E+00 | let ratio: 5.0E-01 | loss scale: 1.0 |"), printed[-1]


# ------------------------------------------------------------------ item 7: resume under another TP / PP
@pytest.mark.skipif(LEAN or megatron_lm_source() is None, reason="Megatron-LM's loop (Python 3.12, megatron-core 0.19)")
def test_resume_at_tp2_and_pp2_matches_tp1(teacher, tmp_path):
    """Saved at TP1 iteration 2 with a learned projector while LET aligns; resumed at TP1, TP2 and PP2 (RNG state
    is per layout: --no-load-rng everywhere; dropout is 0), iterations 3 and 4 log the same lm loss and let loss."""
    script = os.path.join(ROOT, "pretrain_gpt_let.py")
    flags = [*MODEL_ARGS, "--let-teacher", teacher, "--let-target-layer", 3, "--let-lambda", 0.5,
             "--let-stop-iter", 100, "--let-projector", "linear", "--train-iters", 4, "--init-method-std", 0.02]
    ckpt = tmp_path / "tp1"
    torchrun(script, 1, [*flags, "--save", ckpt, "--save-interval", 2, "--exit-interval", 2], timeout=600,
             megatron_lm=True)
    logs = {}
    for name, nproc, parallel in (("tp1", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", 2]),
                                  ("pp2", 2, ["--pipeline-model-parallel-size", 2])):
        proc = torchrun(script, nproc, [*flags, *parallel, "--load", ckpt, "--no-load-rng"], timeout=600,
                        megatron_lm=True)
        logs[name] = parse_log(proc.stdout)
        assert sorted(logs[name]) == [3, 4], (name, proc.stdout[-3000:])
    for name, logged in logs.items():  # shown with -s or on failure
        print(name, " ".join(f"{key} {logged[i][key]:.6e}" for i in (3, 4) for key in ("lm loss", "let loss")))
    assert all(logs["tp1"][i]["let loss"] > 0 for i in (3, 4))  # LET still aligns after the resume
    for name in ("tp2", "pp2"):
        for key in ("lm loss", "let loss"):
            for iteration in (3, 4):
                assert logs[name][iteration][key] == pytest.approx(logs["tp1"][iteration][key], rel=1e-5), \
                    (name, key, iteration)
