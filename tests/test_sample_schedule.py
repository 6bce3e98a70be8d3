"""Sample-based schedules in the lean trainer (no Megatron-LM needed; runs in CI): --train-samples,
--lr-*-samples and --rampup-batch-size as Megatron-LM reads them, and LET's stop resolved on that
schedule (default fraction, --let-stop-fraction, --let-stop-samples, --let-stop-iter); a resume keeps
the checkpoint's stop step when only schedule flags changed."""


import pytest

from let_testing import make_tiny_llama, parse_log, run_lean

MODEL = ["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
         "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", "1e-3", "--mock-data", "--vocab-size", 128,
         "--log-interval", 1, "--eval-iters", 0, "--eval-interval", 100]
# as tests/test_megatron_lm_launch.py: 48 samples, global batch ramped 4 -> 8 over 16 samples
SAMPLE_FLAGS = ["--train-samples", 48, "--rampup-batch-size", 4, 4, 16, "--lr-warmup-samples", 8,
                "--lr-decay-samples", 48]


def run(*args):
    return run_lean(*args, timeout=240)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("t") / "teacher"), vocab_size=256)


def let(teacher, *extra):
    return ["--let-teacher", teacher, "--let-target-layer", 1, "--let-lambda", 0.5, "--let-projector", "linear",
            *extra]


def test_schedule_matches_megatron_lm_update_train_iters():
    from megatron_let.megatron_versions import rampup_calculator_class
    from megatron_let.weight.stop import TrainingSchedule

    if rampup_calculator_class() is not None:  # up to 0.18: --rampup-batch-size 4 4 16
        ramp = TrainingSchedule(None, 48, 8, 2, 1, [4, 4, 16])
    else:  # 0.19 ignores --rampup-batch-size (so does LET's stop) and ramps with --step-batch-size-schedule
        assert TrainingSchedule(None, 48, 8, 2, 1, [4, 4, 16]).batch_sizes(3) == [8, 8, 8]
        ramp = TrainingSchedule(None, 48, 8, 2, 1, step_batch_size_schedule="0:4 16:8")
    assert ramp.batch_sizes(8) == [4, 4, 4, 4, 8, 8, 8, 8]
    assert ramp.total_iterations() == 8  # Megatron-LM's loop, hand-run: 5 ramp-up steps + (48 - 24) // 8
    assert ramp.iteration_reaching(12) == 3 and ramp.iteration_reaching(13) == 4 and ramp.samples_after(5) == 24
    flat = TrainingSchedule(None, 50, 8)
    assert flat.total_iterations() == 6 and flat.iteration_reaching(12) == 2  # 50 // 8, ceil(12 / 8)


@pytest.mark.parametrize("stop, stop_iter, stop_sample", [
    ([], 3, 12),                             # default 0.25 of 48 samples = 12: after iteration 3
    (["--let-stop-fraction", 0.5], 5, 24),
    (["--let-stop-samples", 20], 5, 24),
    (["--let-stop-iter", 6], 6, 32),
], ids=["default", "fraction", "samples", "iter"])
def test_sample_based_lean_run_stops_let_where_samples_say(stop, stop_iter, stop_sample, teacher):
    proc = run(*MODEL, *SAMPLE_FLAGS, *let(teacher, *stop))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = parse_log(proc.stdout)
    assert sorted(logged) == list(range(1, 9))  # the 8 iterations Megatron-LM derives
    assert [logged[i]["global batch size"] for i in range(1, 9)] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert [logged[i]["consumed samples"] for i in range(1, 9)] == [4, 8, 12, 16, 24, 32, 40, 48]
    assert f"LET stops at iteration {stop_iter} = sample {stop_sample}" in proc.stdout
    assert [i for i in range(1, 9) if logged[i].get("let lambda", 0) > 0] == list(range(1, stop_iter + 1))
    # the lr schedule in samples: warm-up over 8 samples (2 iterations of 4), then linear decay to 0 at 48
    assert logged[2]["learning rate"] == pytest.approx(1e-3) and logged[8]["learning rate"] == pytest.approx(0)


def test_resume_keeps_the_checkpoints_stop_when_only_the_schedule_changed(tmp_path, teacher):
    ckpt = tmp_path / "ckpt"
    first = run(*MODEL, *SAMPLE_FLAGS, *let(teacher), "--save", ckpt, "--save-interval", 2, "--exit-interval", 2)
    assert first.returncode == 0 and "LET stops at iteration 3 = sample 12" in first.stdout, first.stderr[-2000:]
    longer = [str(a) for a in SAMPLE_FLAGS]
    longer[1], longer[-1] = "96", "96"  # a longer job: 0.25 of it would now be iteration 5
    proc = run(*MODEL, *longer, *let(teacher), "--load", ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LET keeps the checkpoint's stop iteration 3 (the current schedule flags would give 5)" in proc.stdout
    logged = parse_log(proc.stdout)
    assert logged[3].get("let lambda", 0) > 0 and logged[4].get("let lambda", 0) == 0


@pytest.mark.parametrize("flags, fragment", [
    (["--train-iters", 4, "--train-samples", 32], "give exactly one of --train-iters N"),
    (["--train-samples", 32, "--lr-decay-iters", 4], "--lr-decay-iters is for iteration-based training"),
    (["--train-iters", 4, "--rampup-batch-size", 4, 4, 16], "--rampup-batch-size is for sample-based training"),
    (["--train-samples", 32, "--rampup-batch-size", 4, 4], "--rampup-batch-size takes 3 values"),
    (["--train-samples", 32, "--rampup-batch-size", 3, 4, 16], "--rampup-batch-size 3 4 16: START must be"),
    (["--train-samples", 32, "--let-teacher", "x", "--let-target-layer", 1, "--let-stop-iter", 2,
      "--let-stop-samples", 8], "give one of --let-stop-iter, --let-stop-samples, --let-stop-fraction"),
], ids=["both", "mixed-lr", "ramp-iters", "ramp-arity", "ramp-step", "two-stops"])
def test_schedule_flag_errors_are_one_line(flags, fragment):
    proc = run(*MODEL, *flags)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert fragment in errors[0], errors[0]
