"""--let-stop auto (issue 27): LET stops once cos(g_A, g_LM) at layer k's output stays below a threshold for a
window of iterations, never later than the given stop step (megatron_let/weight/auto_stop.py). Here: the cosine by hand
on one process through megatron-core's schedule (fixed lambda and --let-lambda auto), the stop decision and the
teacher's release, the stop step as the upper bound, the flags, and a resume past the automatic stop that
never reads the teacher (build_let, and pretrain_gpt_let.py end to end). Under the layouts: test_auto_lambda_layouts."""

import argparse
import gc
import math
import shutil
import weakref

import pytest
from megatron.core.pipeline_parallel import get_forward_backward_func

from let_testing import (LEAN_MODEL as MODEL, LOSS_SCALE, M, MBS, SCRIPT, SEQ, VOCAB, alignment_grad, make_tiny_llama,
                         microbatches, parse_log, tiny_transformer_config, torchrun)
from megatron_let import LateToEarlyTraining, LETConfig, LETConfigError, add_let_args, let_config_from_args
from megatron_let.config import DEFAULT_STOP_AUTO
from megatron_let.loss.autoscaler import MeasuredLETLossAutoScaler
from megatron_let.training.model import build_gpt_chunks
from megatron_let.training.step import forward_step


def _build(teacher, **settings):
    let = LateToEarlyTraining(LETConfig(teacher=teacher, target_layer=1, stop="auto", **settings))
    config = tiny_transformer_config()
    (model,) = build_gpt_chunks(config, VOCAB, SEQ, let=let)
    config.grad_scale_func = lambda loss: loss * LOSS_SCALE
    return let, model


def _iteration(let, model, iteration, batches=None):
    """One training iteration's forward/backward (no optimizer step) and the end-of-iteration collective."""
    let.begin_iteration(iteration, M)
    batches = batches if batches is not None else list(microbatches(iteration))
    get_forward_backward_func()(forward_step_func=lambda it, m: forward_step(it, m, let=let),
                                data_iterator=iter(batches), model=[model], num_microbatches=M,
                                seq_length=SEQ, micro_batch_size=MBS)
    model.zero_grad(set_to_none=True)
    if not let.finished:
        assert let.nonfinite_ranks() == []
    return let.report()


@pytest.mark.parametrize("lambda0", [0.3, "auto"])
def test_cosine_equals_hand_computation(megatron_world1, tiny_teacher, lambda0):
    """let grad cos = sum <g_A, g_LM> / sqrt(sum ||g_A||^2 sum ||g_LM||^2) over the iteration's micro-batches,
    with g_LM the gradient arriving at layer k from above and g_A the alignment loss's at unit weight (with the
    schedule's factors), both written out here from hooks on layer k and a cosine by hand; and let ratio = lambda
    ||g_A|| / ||g_LM||. Measured with a fixed lambda as with auto (iteration 0 of auto: at weight 0)."""
    let, model = _build(tiny_teacher, lambda0=lambda0, stop_iter=10, stop_auto_threshold=-1.1,
                        stop_auto_window=1, stop_auto_warmup=0)
    layer = model.decoder.layers[0]
    seen = []

    def before_let(module, args, output):
        seen.append({"h": output[0].detach().clone()})

    def after_let(module, args, output):
        entry = seen[-1]
        output[0].register_hook(lambda grad: entry.update(lm=grad.detach().clone()))

    layer.register_forward_hook(before_let, prepend=True)
    layer.register_forward_hook(after_let)
    cosines = []
    for iteration in range(3):
        seen.clear()
        batches = list(microbatches(iteration))
        report = _iteration(let, model, iteration, batches)
        dot = lm_sq = align_sq = 0.0
        for entry, batch in zip(seen, batches):
            align = (LOSS_SCALE / M * alignment_grad(let, model, entry["h"], batch)).double()
            lm = entry["lm"].double()
            dot += (align * lm).sum().item()
            lm_sq += lm.pow(2).sum().item()
            align_sq += align.pow(2).sum().item()
        expected = dot / math.sqrt(lm_sq * align_sq)
        assert report["let grad cos"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
        # the realised pull fraction, logged whenever the probe measures (fixed lambda too)
        assert report["let ratio"] == pytest.approx(report["let lambda"] * math.sqrt(align_sq / lm_sq), rel=1e-6)
        cosines.append(report["let grad cos"])
    assert len(set(cosines)) == 3 and all(-1 <= c <= 1 for c in cosines)
    assert let.auto_stop.state == {"stopped_at": None, "below": 0} and not let.finished  # never below -1.1


def test_stops_after_the_window_and_frees_the_teacher(megatron_world1, tiny_teacher, capsys):
    """Threshold 1.1 (every cosine is below), window 2, warm-up 1: iteration 0 (0-based) does not count,
    1 and 2 do, so LET stops at iteration 3 (the log's numbering: the decision at the end of logged iteration 3,
    weight 0 from logged iteration 4 on), 7 iterations before --let-stop-iter; logged once; the teacher released
    and the hook gone as at a scheduled stop."""
    let, model = _build(tiny_teacher, lambda0=0.3, stop_iter=10, stop_auto_threshold=1.1, stop_auto_window=2,
                        stop_auto_warmup=1)
    for iteration in range(3):
        report = _iteration(let, model, iteration)
        assert report["let lambda"] == pytest.approx(0.3 * (1 - iteration / 10)) and "let grad cos" in report
        if iteration == 0:
            teacher_model = weakref.ref(let.teacher.model)
    assert let.auto_stop.state == {"stopped_at": 3, "below": 2} and not let.finished
    lines = [line for line in capsys.readouterr().out.splitlines() if "automatically" in line]
    assert lines == [" LET stops automatically at iteration 3: cos(g_align, g_LM) < 1.1 for 2 iterations"]
    report = _iteration(let, model, 3)
    assert report == {"let lambda": 0.0} and let.finished and let._teacher is None
    gc.collect()
    assert teacher_model() is None
    assert model.let_alignment._hook is None  # the target layer runs as without LET (interp: no projector)
    assert _iteration(let, model, 4) == {"let lambda": 0.0}
    assert "automatically" not in capsys.readouterr().out


def test_the_stop_step_stays_the_upper_bound(megatron_world1, tiny_teacher):
    """Threshold -1.1 (never below): the schedule runs unchanged to --let-stop-iter 3 and stops there. Threshold
    1.1 with a window that fills only on the last LET iteration: no automatic stop (the stop step comes first)."""
    for threshold, window in ((-1.1, 1), (1.1, 3)):
        let, model = _build(tiny_teacher, lambda0=0.3, stop_iter=3, stop_auto_threshold=threshold,
                            stop_auto_window=window, stop_auto_warmup=0)
        lambdas = [_iteration(let, model, it)["let lambda"] for it in range(3)]
        assert lambdas == [0.3 * (1 - it / 3) for it in range(3)]
        assert let.auto_stop.stopped_at is None and not let.finished
        assert let.auto_stop.state["below"] == (0 if threshold < 0 else 3)
        assert _iteration(let, model, 3) == {"let lambda": 0.0} and let.finished and let._teacher is None


def test_off_and_fixed_lambda_measures_nothing(megatron_world1, tiny_teacher):
    """Without --let-stop auto and with a fixed lambda there is no probe: the hook injects with the plain
    autoscaler, as before."""
    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=0.3, stop_iter=4))
    assert let.probe is None and let.auto_stop is None and let.auto_lambda is None
    (model,) = build_gpt_chunks(tiny_transformer_config(), VOCAB, SEQ, let=let)
    applied = []
    original = MeasuredLETLossAutoScaler.apply
    MeasuredLETLossAutoScaler.apply = lambda *args: applied.append(1) or original(*args)
    try:
        _iteration(let, model, 0)
    finally:
        MeasuredLETLossAutoScaler.apply = original
    assert not applied
    fixed_auto = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=0.3, stop_iter=4,
                                               stop="auto"))
    assert fixed_auto.probe is not None and fixed_auto.probe.dot and fixed_auto.auto_lambda is None
    auto_only = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0="auto", stop_iter=4))
    assert auto_only.probe is not None and not auto_only.probe.dot  # g_A is not kept without --let-stop auto


def _parse(*flags):
    return add_let_args(argparse.ArgumentParser()).parse_args(
        ["--let-teacher", "/t", "--let-target-layer", "2", "--let-stop-iter", "10", *map(str, flags)])  # (last wins)


def test_flags():
    config = let_config_from_args(_parse("--let-stop", "auto"))
    assert config.stop == "auto" and [config.stop_auto_setting(n) for n in ("threshold", "window", "warmup")] == \
        [DEFAULT_STOP_AUTO["threshold"], DEFAULT_STOP_AUTO["window"], DEFAULT_STOP_AUTO["warmup"]]
    config = let_config_from_args(_parse("--let-stop", "auto", "--let-stop-auto-threshold", -0.05,
                                         "--let-stop-auto-window", 5, "--let-stop-auto-warmup", 0))
    assert (config.stop_auto_setting("threshold"), config.stop_auto_setting("window"),
            config.stop_auto_setting("warmup")) == (-0.05, 5, 0)
    assert let_config_from_args(_parse()).stop == "schedule"
    with pytest.raises(LETConfigError, match="--let-stop-auto-window is only used with --let-stop auto"):
        let_config_from_args(_parse("--let-stop-auto-window", 5))
    with pytest.raises(LETConfigError, match="--let-stop-auto-window must be >= 1"):
        let_config_from_args(_parse("--let-stop", "auto", "--let-stop-auto-window", 0))
    with pytest.raises(LETConfigError, match="--let-stop-auto-warmup must be >= 0"):
        let_config_from_args(_parse("--let-stop", "auto", "--let-stop-auto-warmup", -1))
    with pytest.raises(LETConfigError, match="finite"):
        let_config_from_args(_parse("--let-stop", "auto", "--let-stop-auto-threshold", "nan"))
    with pytest.raises(SystemExit):
        _parse("--let-stop", "early")


def test_unusable_iterations_neither_count_nor_break_the_window():
    from megatron_let.weight.auto_stop import AutoStop

    stop = AutoStop(threshold=0.0, window=2, warmup=0)
    assert stop.update([4.0, 1.0, -1.0], 0, stop_iter=10) == -0.5 and stop.state["below"] == 1
    assert stop.update([0.0, 0.0, 0.0], 1, stop_iter=10) is None  # nothing measured (a second call)
    assert stop.update([float("inf"), 1.0, 1.0], 1, stop_iter=10) is None  # fp16 overflow
    assert stop.update([4.0, 1.0, -1.0], 1, stop_iter=10, skip=True) is None  # a rank flagged non-finite
    assert stop.state == {"stopped_at": None, "below": 1}
    assert stop.update([4.0, 1.0, 1.0], 2, stop_iter=10) == 0.5 and stop.state["below"] == 0  # helps: reset
    stop.update([4.0, 1.0, -1.0], 3, stop_iter=10)
    stop.update([4.0, 1.0, -1.0], 4, stop_iter=10)
    assert stop.state == {"stopped_at": 5, "below": 2}
    assert stop.report() == {"let grad cos": pytest.approx((-0.5 + 0.5 - 0.5 - 0.5) / 4)}


@pytest.mark.parametrize("flags", [["--let-stop", "auto"], []])
def test_a_resume_past_the_decision_never_reads_the_teacher(tmp_path, flags):
    """build_let from a checkpoint that stopped automatically at 4, resumed at 5, the teacher gone: LET is finished
    at once, says so, and carries the decision into its next checkpoints, with --let-stop auto or without it."""
    from megatron_let.integrations.launch import build_let

    args = _parse("--let-teacher", tmp_path / "gone", *flags)
    args.__dict__.update(seed=1, num_layers=4, hidden_size=64, train_iters=20, global_batch_size=8,
                         micro_batch_size=1)
    decided = {"stopped_at": 4, "below": 2}
    saved = {"config": LETConfig(teacher=str(tmp_path / "gone"), target_layer=2, stop_iter=10, stop="auto").to_dict(),
             "stop_iter": 10, "stop_samples": 80, "teacher_hidden_size": 48, "auto_stop": dict(decided)}
    lines = []
    let = build_let(args, None, "the target's vocabulary", lines.append, saved, resume_iteration=5)
    assert let.finished and let._teacher is None and let.checkpoint_state()["auto_stop"] == decided
    assert " LET stopped automatically at iteration 4 (--let-stop auto, from the checkpoint)" in lines
    assert let.begin_iteration(5, 1) == 0.0


def test_resume_past_the_automatic_stop_stays_stopped_without_the_teacher(tmp_path):
    """pretrain_gpt_let.py, threshold 1.1, window 2, no warm-up: LET stops automatically at iteration 2 (before
    --let-stop-iter 4), logged once; saved at 3; resumed from 3 with the teacher gone: still stopped (no teacher
    read), the same log lines for 4 and 5 and the same saved state as the straight run."""
    from megatron.core import dist_checkpointing

    teacher = make_tiny_llama(str(tmp_path / "teacher"), vocab_size=256)  # the mock data has 129 ids
    common = [*MODEL, "--train-iters", 5, "--let-teacher", teacher, "--let-target-layer", 2, "--let-lambda", 0.3,
              "--let-stop-iter", 4, "--let-stop", "auto", "--let-stop-auto-threshold", 1.1,
              "--let-stop-auto-window", 2, "--let-stop-auto-warmup", 0, "--let-projector", "linear",
              "--save-interval", 3]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    out = torchrun(SCRIPT, 1, [*common, "--save", straight_dir]).stdout
    straight = parse_log(out)
    assert out.count("LET stops automatically") == 1
    assert " LET stops automatically at iteration 2: cos(g_align, g_LM) < 1.1 for 2 iterations" in out
    assert all(straight[it]["let lambda"] > 0 and "let grad cos" in straight[it] for it in (1, 2))
    assert all(straight[it]["let lambda"] == 0 and "let grad cos" not in straight[it] for it in (3, 4, 5))
    shutil.copytree(straight_dir / "iter_0000003", resumed_dir / "iter_0000003")
    (resumed_dir / "latest_checkpointed_iteration.txt").write_text("3")
    shutil.move(teacher, str(tmp_path / "teacher-gone"))
    out = torchrun(SCRIPT, 1, [*common, "--save", resumed_dir, "--load", resumed_dir]).stdout
    resumed = parse_log(out)
    assert " LET stopped automatically at iteration 2 (--let-stop auto, from the checkpoint)" in out
    assert "LET stops automatically" not in out and "LET teacher features" not in out
    drop = "elapsed time per iteration (ms)"
    assert sorted(resumed) == [4, 5]
    for it in (4, 5):
        assert {k: v for k, v in resumed[it].items() if k != drop} == \
            {k: v for k, v in straight[it].items() if k != drop}, it

    def saved(root, iteration):
        return dist_checkpointing.load_common_state_dict(str(root / f"iter_{iteration:07d}"))["let"]["auto_stop"]

    assert saved(straight_dir, 3) == saved(straight_dir, 5) == saved(resumed_dir, 5) == \
        {"stopped_at": 2, "below": 2}
