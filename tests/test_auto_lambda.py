"""--let-lambda auto (issue 27): the weight is fraction x the smoothed ratio of the LM loss's to the alignment's
gradient norm at layer k's output, decayed by the schedule (megatron_let/weight/auto_lambda.py). Here: the rule by
hand on one process through megatron-core's schedule, and the flags. The layouts, full recompute, the stop at
iteration 0 and resume are in test_auto_lambda_layouts.py."""

import argparse
import math

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from let_testing import LOSS_SCALE, M, MBS, SEQ, VOCAB, alignment_grad, microbatches, tiny_transformer_config
from megatron_let import LateToEarlyTraining, LETConfig, LETConfigError, add_let_args, let_config_from_args
from megatron_let.config import DEFAULT_LAMBDA_AUTO_FRACTION
from megatron_let.training.model import build_gpt_chunks
from megatron_let.training.step import forward_step
from megatron_let.weight.auto_lambda import EMA_BETA

FRACTION, STOP = 0.2, 4


@pytest.mark.parametrize("projector", ["linear", "interp"])
def test_weight_equals_hand_computation_from_gradient_norms(megatron_world1, tiny_teacher, projector):
    """Three iterations through megatron-core's schedule (2 micro-batches, a loss scale): iteration 0 only
    measures (weight 0); then lambda(s) = fraction * EMA(||g_LM|| / ||g_A||) * (1 - s / stop), with g_LM the
    gradient arriving at layer k from above and g_A the alignment loss's at unit weight, both written out here
    from hooks on layer k and a cosine by hand; and the gradient really injected at h_k is lambda * g_A."""
    config = tiny_transformer_config()
    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0="auto", stop_iter=STOP,
                                        lambda_auto_fraction=FRACTION, projector=projector))
    (model,) = build_gpt_chunks(config, VOCAB, SEQ, let=let)
    config.grad_scale_func = lambda loss: loss * LOSS_SCALE
    layer = model.decoder.layers[0]
    seen = []  # per micro-batch: raw h_k, and the gradients at h_k (total) and after LET (from above)

    def before_let(module, args, output):
        entry = {"h": output[0].detach().clone()}
        output[0].register_hook(lambda grad: entry.update(total=grad.detach().clone()))
        seen.append(entry)

    def after_let(module, args, output):
        entry = seen[-1]
        output[0].register_hook(lambda grad: entry.update(lm=grad.detach().clone()))

    layer.register_forward_hook(before_let, prepend=True)
    layer.register_forward_hook(after_let)

    ratios, expected = [], None
    for iteration in range(3):
        weight = let.begin_iteration(iteration, M)
        if iteration == 0:
            assert weight == 0.0 and let.aligning  # measures only: no ratio is known before a backward
        else:
            assert weight == pytest.approx(expected, rel=1e-12)
        seen.clear()
        batches = list(microbatches(iteration))
        get_forward_backward_func()(forward_step_func=lambda it, m: forward_step(it, m, let=let),
                                    data_iterator=iter(batches), model=[model], num_microbatches=M,
                                    seq_length=SEQ, micro_batch_size=MBS)
        model.zero_grad(set_to_none=True)
        assert let.nonfinite_ranks() == []  # the end-of-iteration collective: folds this iteration in
        lm_sq = align_sq = 0.0
        for entry, batch in zip(seen, batches):
            align = LOSS_SCALE / M * alignment_grad(let, model, entry["h"], batch)
            # (total - lm cancels digits: within float32 rounding of the LM gradient)
            torch.testing.assert_close(entry["total"] - entry["lm"], weight * align, rtol=1e-5,
                                       atol=1e-6 * entry["lm"].abs().max().item())
            lm_sq += entry["lm"].double().pow(2).sum().item()
            align_sq += align.double().pow(2).sum().item()
        ratios.append(math.sqrt(lm_sq) / math.sqrt(align_sq))
        log_ema = math.log(ratios[0])  # the EMA of log r: a geometric mean
        for r in ratios[1:]:
            log_ema = EMA_BETA * log_ema + (1 - EMA_BETA) * math.log(r)
        assert math.exp(let.auto_lambda.state["ema_log_ratio"]) == pytest.approx(math.exp(log_ema), rel=1e-6)
        assert let.report()["let ratio"] == pytest.approx(weight / ratios[-1], rel=1e-6)
        expected = FRACTION * math.exp(let.auto_lambda.state["ema_log_ratio"]) * (1 - (iteration + 1) / STOP)
    assert let.begin_iteration(STOP, M) == 0.0 and let.finished


def _parse(*flags):
    return add_let_args(argparse.ArgumentParser()).parse_args(
        ["--let-teacher", "/t", "--let-target-layer", "2", "--let-stop-iter", "10", *map(str, flags)])


def test_flags():
    auto = let_config_from_args(_parse("--let-lambda", "auto", "--let-lambda-auto-fraction", 0.05))
    assert auto.lambda0 == "auto" and auto.auto_fraction == 0.05
    assert let_config_from_args(_parse("--let-lambda", "auto")).auto_fraction == DEFAULT_LAMBDA_AUTO_FRACTION
    fixed = let_config_from_args(_parse("--let-lambda", "0.3"))
    assert fixed.lambda0 == 0.3 and isinstance(fixed.lambda0, float)
    default = let_config_from_args(_parse())  # the default since the convergence sweep (docs/convergence.md)
    assert default.lambda0 == "auto" and default.auto_fraction == DEFAULT_LAMBDA_AUTO_FRACTION == 3.0
    with pytest.raises(LETConfigError, match="--let-lambda-auto-fraction is only used with --let-lambda auto"):
        let_config_from_args(_parse("--let-lambda", "0.3", "--let-lambda-auto-fraction", 0.1))
    with pytest.raises(LETConfigError, match="> 0"):
        let_config_from_args(_parse("--let-lambda", "auto", "--let-lambda-auto-fraction", 0))
    with pytest.raises(SystemExit):
        _parse("--let-lambda", "automatic")


def test_fixed_lambda_builds_no_measurement(megatron_world1, tiny_teacher):
    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=0.3, stop_iter=4))
    assert let.auto_lambda is None and let.begin_iteration(0, 1) == 0.3


def test_checkpoint_holds_the_live_ema(megatron_world1, tiny_teacher):
    """Megatron-LM keeps ``let.checkpoint_state()`` in ``args`` from start-up and pickles it at every save: what it saves
    is the current EMA, and a LET given it back (as build_let does on resume) continues with the same weights."""
    import pickle

    def build():
        return LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0="auto", stop_iter=10))

    let = build()
    state = let.checkpoint_state()  # taken once, before any iteration, as Megatron-LM does
    assert let.auto_lambda.update([4.0, 1.0]) == 2.0 and let.auto_lambda.update([9.0, 1.0]) == 3.0
    saved = pickle.loads(pickle.dumps(state))["auto_lambda"]
    assert saved == {"ema_log_ratio": EMA_BETA * math.log(2.0) + (1 - EMA_BETA) * math.log(3.0), "updates": 2}
    resumed = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0="auto", stop_iter=10),
                                  saved={"auto_lambda": saved})  # as build_let does on resume
    assert resumed.begin_iteration(5, 1) == let.begin_iteration(5, 1) == \
        DEFAULT_LAMBDA_AUTO_FRACTION * math.exp(saved["ema_log_ratio"]) * 0.5


def test_iterations_without_a_usable_measurement_leave_the_ema_alone():
    from megatron_let.weight.auto_lambda import AutoLambda

    auto = AutoLambda(0.1)
    assert auto.update([0.0, 0.0]) is None  # nothing measured (a second call in the same iteration)
    assert auto.update([1.0, 0.0]) is None  # no token: no alignment gradient
    assert auto.update([float("inf"), 1.0]) is None  # fp16 overflow
    assert auto.update([4.0, 1.0], skip=True) is None  # a rank's alignment loss was NaN/Inf
    assert auto.update([0.0, 1.0]) is None  # no LM gradient at layer k: log 0
    assert auto.state == {"ema_log_ratio": None, "updates": 0} and auto.weight(1.0) == 0.0
