"""LET inside Megatron-LM's own pretrain() (pretrain_gpt_let.py), on CPU with gloo.

Megatron-LM's ``megatron/training`` ships in megatron-core wheels from 0.17 on (Python 3.12): there
these tests run Megatron-LM's ``pretrain()`` from the wheel. With megatron-core 0.16.1 they need a
checkout in ``MEGATRON_LM_PATH`` (tag ``core_v0.16.1``), and are skipped without one.

Every layout loads the same initial weights (Megatron-LM seeds each pipeline
stage differently, so fresh inits differ across PP layouts): a TP1 run saves a
torch_dist checkpoint after one step and each layout loads it with
``--finetune``. Then each layout trains 4 iterations on mock data with a tiny
Hugging Face teacher, and its per-iteration ``lm loss`` / ``let loss`` /
``let lambda`` (parsed from Megatron-LM's log line) must equal TP1's.
The target layer 3 lies on the last stage with PP=2 (with and without TP=2)
and on a middle stage with PP=4, where Megatron-LM's get_batch has no batch
of its own.
"""

import os

import pytest

from let_testing import (MEGATRON_LM_ITERS as ITERS, MEGATRON_LM_LAMBDA0 as LAMBDA0, MEGATRON_LM_MODEL as MODEL_ARGS,
                         MEGATRON_LM_MOE as MOE_ARGS, MEGATRON_LM_STOP_ITER as STOP_ITER,
                         MEGATRON_LM_TARGET_LAYER as TARGET_LAYER, NEEDS_MEGATRON_LM, NEEDS_MEGATRON_LM_CHECKOUT,
                         make_mismatched, megatron_lm_source, per_iteration, run_megatron_lm as run)

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")

pytestmark = pytest.mark.skipif(megatron_lm_source() is None, reason=NEEDS_MEGATRON_LM)

LAYOUTS = {  # name: (processes, parallel flags)
    "tp2": (2, ["--tensor-model-parallel-size", 2]),
    "pp2": (2, ["--pipeline-model-parallel-size", 2]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]),
    "pp4": (4, ["--pipeline-model-parallel-size", 4]),
    "pp2_owner": (2, ["--pipeline-model-parallel-size", 2, "--let-teacher-placement", "owner"]),
}


def train(nproc: int, parallel, let_args, checkpoint, name: str) -> dict:
    logged = run(nproc, [*MODEL_ARGS, *let_args, *parallel, "--train-iters", ITERS,
                         "--load", checkpoint, "--finetune"])
    for key in ("lm loss", "let loss", "let lambda"):  # shown with -s or on failure
        print(f"{name:7s} {key:10s}", " ".join(f"{v:.6e}" for v in per_iteration(logged, key)))
    return logged


@pytest.fixture(scope="module")
def reference(let_args, initial_checkpoint):
    return train(1, [], let_args, initial_checkpoint, "tp1")


def test_tp1_logs_let_scalars(reference):
    for iteration in range(1, ITERS + 1):
        assert {"lm loss", "let loss", "let lambda"} <= set(reference[iteration]), reference[iteration]
    lambdas = per_iteration(reference, "let lambda")
    assert lambdas == pytest.approx([LAMBDA0 * (1 - i / STOP_ITER) for i in range(ITERS)], rel=1e-6)
    let_losses = per_iteration(reference, "let loss")
    # let loss = lambda * mean(1 - cos): within (0, 2 lambda]
    assert all(0 < loss <= 2 * lam for loss, lam in zip(let_losses, lambdas))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_tp1(layout, reference, let_args, initial_checkpoint):
    nproc, parallel = LAYOUTS[layout]
    logged = train(nproc, parallel, let_args, initial_checkpoint, layout)
    for key in ("lm loss", "let loss", "let lambda"):
        assert per_iteration(logged, key) == pytest.approx(per_iteration(reference, key), rel=1e-5), \
            f"{layout}: {key} differs from TP1"


# ------------------------------------------------------------------ teacher-feature normalisation
@pytest.fixture(scope="module", params=["center", "standardize"])
def norm_setup(request, megatron_lm_path, let_args, tmp_path_factory):
    """--let-teacher-norm center / standardize inside Megatron-LM: the checkpoint holds the statistics of
    its first iteration; every layout sums the next ones over its own ranks (DP and SP ranks hold
    different tokens)."""
    args = [*let_args, "--let-teacher-norm", request.param, "--let-teacher-norm-iters", 3]
    ckpt = tmp_path_factory.mktemp("megatron_lm_norm") / "init"
    run(1, [*MODEL_ARGS, *args, "--train-iters", 1, "--save", ckpt, "--save-interval", 1])
    reference = train(1, [], args, ckpt, f"{request.param} tp1")
    assert all(v > 0 for v in per_iteration(reference, "let loss"))
    return args, ckpt, reference


@pytest.mark.parametrize("layout", ["dp2", "tp2_sp", "pp2"])
def test_teacher_norm_layouts_match_tp1(layout, norm_setup):
    args, ckpt, reference = norm_setup
    nproc, parallel = {"dp2": (2, []), "tp2_sp": (2, [*LAYOUTS["tp2"][1], "--sequence-parallel"]),
                       "pp2": LAYOUTS["pp2"]}[layout]
    mode = args[args.index("--let-teacher-norm") + 1]
    logged = train(nproc, parallel, args, ckpt, f"{mode} {layout}")
    for key in ("lm loss", "let loss", "let lambda"):
        assert per_iteration(logged, key) == pytest.approx(per_iteration(reference, key), rel=1e-5), \
            f"teacher norm {mode} {layout}: {key} differs from TP1"


# ------------------------------------------------------------------ a teacher with another tokenizer
@pytest.fixture(scope="module")
def span_setup(megatron_lm_path, tmp_path_factory):
    """causal-span inside Megatron-LM: a target BPE tokenizer (mock data over its vocabulary) and a tiny
    teacher with a different BPE; the alignment runs on the aligner's thread from get_batch on."""
    root = tmp_path_factory.mktemp("megatron_lm_span")
    target_dir, teacher, _ = make_mismatched(root)
    model_args = [str(a) for a in MODEL_ARGS]
    at = model_args.index("--tokenizer-type")
    # padded vocabulary 512 for TP 1 and 2 alike
    model_args[at:at + 6] = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", target_dir,
                             "--make-vocab-size-divisible-by", "256"]
    let_args = ["--let-teacher", teacher, "--let-target-layer", TARGET_LAYER, "--let-lambda", LAMBDA0,
                "--let-stop-iter", STOP_ITER, "--let-projector", "linear", "--let-token-alignment", "causal-span"]
    ckpt = root / "init"
    run(1, [*model_args, *let_args, "--train-iters", 1, "--save", ckpt, "--save-interval", 1])
    args = [*model_args, *let_args, "--load", ckpt, "--finetune", "--train-iters", ITERS]
    reference = run(1, args)
    print("causal-span tp1 let loss", " ".join(f"{v:.8e}" for v in per_iteration(reference, "let loss")))
    assert all(v > 0 for v in per_iteration(reference, "let loss"))
    return args, reference


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_causal_span_layouts_match_tp1(layout, span_setup):
    args, reference = span_setup
    nproc, parallel = LAYOUTS[layout]
    logged = run(nproc, [*args, *parallel])
    for key in ("lm loss", "let loss", "let lambda"):
        assert per_iteration(logged, key) == pytest.approx(per_iteration(reference, key), rel=1e-5), \
            f"causal-span {layout}: {key} differs from TP1"


# ------------------------------------------------------------------ full activation recomputation
@pytest.mark.parametrize("name,nproc,flags", [
    ("tp1_full_block3", 1, ["--recompute-granularity", "full", "--recompute-method", "block",
                            "--recompute-num-layers", 3]),
    ("pp2_full_uniform1", 2, ["--pipeline-model-parallel-size", 2, "--recompute-granularity", "full",
                              "--recompute-method", "uniform", "--recompute-num-layers", 1]),
])
def test_full_recompute_matches_tp1(name, nproc, flags, reference, let_args, initial_checkpoint):
    """Layer k (3) is re-run in the backward pass; LET's loss is counted once with that micro-batch's
    teacher states: lm loss, let loss and grad norm equal the run without recompute."""
    logged = train(nproc, flags, let_args, initial_checkpoint, name)
    for key in ("lm loss", "let loss", "let lambda"):
        assert per_iteration(logged, key) == pytest.approx(per_iteration(reference, key), rel=1e-5), \
            f"{name}: {key} differs from TP1 without recompute"
    grad_norms = [logged[i]["grad norm"] for i in range(1, ITERS + 1)]  # per iteration, not averaged
    assert grad_norms == pytest.approx([reference[i]["grad norm"] for i in range(1, ITERS + 1)], rel=1e-5)


# ------------------------------------------------------------------ MoE target with expert parallelism
def test_moe_expert_parallel_with_full_recompute_matches_tp1(megatron_lm_path, let_args, tmp_path):
    """An MoE target (4 experts, top 2, load-balancing loss): EP2 with full recompute logs TP1's lm loss,
    let loss, MoE load_balancing_loss and grad norm, from the same initial weights."""
    ckpt = tmp_path / "moe_init"
    run(1, [*MODEL_ARGS, *MOE_ARGS, *let_args, "--train-iters", 1, "--save", ckpt, "--save-interval", 1])
    reference = train(1, MOE_ARGS, let_args, ckpt, "moe_tp1")
    got = train(2, [*MOE_ARGS, "--expert-model-parallel-size", 2, "--recompute-granularity", "full",
                    "--recompute-method", "uniform", "--recompute-num-layers", 1], let_args, ckpt, "moe_ep2")
    for key in ("lm loss", "let loss", "load_balancing_loss"):
        assert key in reference[1], f"{key} not logged"
        assert per_iteration(got, key) == pytest.approx(per_iteration(reference, key), rel=1e-5), key
    assert [got[i]["grad norm"] for i in range(1, ITERS + 1)] == \
        pytest.approx([reference[i]["grad norm"] for i in range(1, ITERS + 1)], rel=1e-5)


# ------------------------------------------------------------------ save / resume and the stop step
def test_resume_equals_a_straight_run_and_lambda_reaches_zero(megatron_lm_path, tiny_teacher, initial_checkpoint,
                                                             tmp_path):
    """Save at iteration 2 and resume to 4 gives the straight run's numbers (< 1e-5); with --let-stop-iter 3
    lambda decays to 0 at iteration 4 (Megatron-LM's counter: iterations done before the step)."""
    args = [*MODEL_ARGS, "--let-teacher", tiny_teacher, "--let-target-layer", TARGET_LAYER, "--let-lambda", LAMBDA0,
            "--let-stop-iter", 3, "--let-projector", "linear", "--train-iters", ITERS]
    straight = run(1, [*args, "--load", initial_checkpoint, "--finetune"])
    ckpt = tmp_path / "resume"
    first = run(1, [*args, "--load", initial_checkpoint, "--finetune", "--save", ckpt, "--save-interval", 2,
                    "--exit-interval", 2])
    second = run(1, [*args, "--load", ckpt, "--save", ckpt, "--save-interval", 100])
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4], (sorted(first), sorted(second))
    def value(fields, key):  # Megatron-LM up to 0.18 leaves an entry whose interval average is 0 out of the line
        return fields.get(key, 0.0)

    lambdas = [value(straight[i], "let lambda") for i in (1, 3, 4)]  # single iterations (log interval quirk aside)
    assert lambdas == pytest.approx([LAMBDA0, LAMBDA0 * (1 - 2 / 3), 0.0], abs=1e-7)
    for key in ("lm loss", "let loss", "let lambda"):
        resumed = [value(second[3], key), 2 * value(second[4], key) - value(second[3], key)]
        assert resumed == pytest.approx([value(straight[3], key), value(straight[4], key)], rel=1e-5, abs=1e-7), key


@pytest.mark.skipif(not MEGATRON_LM_PATH or megatron_lm_source() != "checkout",
                    reason=NEEDS_MEGATRON_LM_CHECKOUT if megatron_lm_source() else NEEDS_MEGATRON_LM)
def test_wheel_and_checkout_drivers_agree(megatron_lm_path, let_args):
    """On megatron-core 0.17+ the same flags run the checkout's pretrain_gpt.py (MEGATRON_LM_PATH) or, without it,
    megatron_let's gpt_script on the wheel's megatron.training: the same numbers."""
    from megatron_let.megatron_versions import parse

    from importlib.metadata import version

    if parse(version("megatron-core")) < (0, 17):
        pytest.skip("megatron-core 0.16's wheel has no megatron.training: the lean trainer runs without the checkout")
    args = [*MODEL_ARGS, *let_args, "--train-iters", 3]
    checkout = run(1, args)
    env_path = os.environ.pop("MEGATRON_LM_PATH")
    try:
        wheel = run(1, args)
    finally:
        os.environ["MEGATRON_LM_PATH"] = env_path
    for i in (1, 2, 3):
        for key in ("lm loss", "let loss", "let lambda", "grad norm"):
            assert wheel[i][key] == pytest.approx(checkout[i][key], rel=1e-6), (i, key)
