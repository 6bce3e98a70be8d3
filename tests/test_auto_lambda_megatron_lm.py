"""--let-lambda auto inside Megatron-LM's own pretrain() (pretrain_gpt_let.py; needs megatron.training: the
megatron-core 0.19 wheel on Python 3.12, or a checkout). The driver runs the controller's code, nothing of its
own: PP2 gives TP1's weight iteration by iteration, and a resume continues it (the EMA lives in
args.let_state, which Megatron-LM pickles at each save)."""

import pytest

from let_testing import (MEGATRON_LM_ITERS as ITERS, MEGATRON_LM_MODEL as MODEL_ARGS,
                         MEGATRON_LM_TARGET_LAYER as TARGET_LAYER, NEEDS_MEGATRON_LM, SCRIPT, megatron_lm_source,
                         parse_log, run_megatron_lm as run, torchrun)

pytestmark = pytest.mark.skipif(megatron_lm_source() is None, reason=NEEDS_MEGATRON_LM)


@pytest.fixture(scope="module")
def auto_args(tiny_teacher):
    return [*MODEL_ARGS, "--let-teacher", tiny_teacher, "--let-target-layer", TARGET_LAYER, "--let-lambda", "auto",
            "--let-lambda-auto-fraction", 0.5, "--let-stop-iter", 6, "--let-projector", "linear",
            "--train-iters", ITERS]


@pytest.fixture(scope="module")
def straight(auto_args, initial_checkpoint):
    return run(1, [*auto_args, "--load", initial_checkpoint, "--finetune"])


def _same(got: dict, ref: dict, iterations, keys=("lm loss", "let loss", "let lambda", "let ratio")):
    for i in iterations:
        for key in keys:
            assert got[i][key] == pytest.approx(ref[i][key], rel=1e-5, abs=1e-7), (i, key, got[i], ref[i])


def test_pp2_gives_the_tp1_weight(straight, auto_args, initial_checkpoint):
    assert straight[3]["let lambda"] > 0 and straight[3]["let ratio"] > 0
    pp2 = run(2, [*auto_args, "--load", initial_checkpoint, "--finetune", "--pipeline-model-parallel-size", 2])
    _same(pp2, straight, range(2, ITERS + 1))  # (iteration 1 measures only: Megatron-LM leaves zeros out)


def test_resume_continues_the_weight(straight, auto_args, initial_checkpoint, tmp_path):
    ckpt = tmp_path / "resume"
    first = run(1, [*auto_args, "--load", initial_checkpoint, "--finetune", "--save", ckpt, "--save-interval", 2,
                    "--exit-interval", 2])
    second = parse_log(torchrun(SCRIPT, 1, [*auto_args, "--load", ckpt, "--save", ckpt, "--save-interval", 100],
                                timeout=600, megatron_lm=True).stdout)  # (run() wants an iteration 1 line)
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    # Megatron-LM's first logged iteration of a run is its own; the next one averages both (test_megatron_lm)
    resumed = {3: second[3], 4: {k: 2 * v - second[3][k] for k, v in second[4].items() if k in second[3]}}
    expected = {3: straight[3], 4: {k: 2 * v - straight[3][k] for k, v in straight[4].items() if k in straight[3]}}
    expected[4] = {k: straight[4][k] for k in expected[4]}  # the straight run's 4th line is its own
    _same(resumed, expected, (3, 4))
