"""Full activation recomputation with LET: layer k runs twice (no-grad forward, then again in the
backward pass), the alignment loss is counted once with that micro-batch's teacher states, and every
number equals the run without recompute: one process, TP2, PP2 (k on the stage with a warm-up
micro-batch in flight) and interleaved PP2. Selective recompute too. Each worker run trains all its
recompute variants from the same initial weights (one torchrun start-up per layout)."""

import pytest

from let_testing import LEAN_MODEL as MODEL, SCRIPT, assert_same_numbers, make_tiny_llama, parse_log, run_layout, torchrun

ALL = ["none", "full:uniform:1", "full:uniform:2", "full:block:1", "full:block:2", "selective"]


def _args(teacher, ckpt, target_layer, variants, extra=()):
    return ["--teacher", teacher, "--load-ref", ckpt, "--target-layer", target_layer,
            "--recompute", *variants, *extra]


def _assert_variants_match(reference: dict, run: dict, layout: str):
    """Every variant equals ``reference`` (no recompute) and ran the teacher as often as the
    run's own no-recompute variant: full recompute adds no teacher forward."""
    forwards = [r["teacher forwards"] for r in run["variants"][next(iter(run["variants"]))]["records"]]
    for variant, got in run["variants"].items():
        assert_same_numbers(reference, got, f"{layout} {variant}")
        assert [r["teacher forwards"] for r in got["records"]] == forwards, f"{layout} {variant}"


@pytest.fixture(scope="module")
def single_variants(tmp_path_factory, tiny_teacher, reference_weights):
    """One process, k=2: no recompute and every recompute variant (block:1 leaves layer 2 out of
    the recomputed layers, block:2 and uniform put it in)."""
    run = run_layout(tmp_path_factory.mktemp("recompute"), "single", 1,
                     _args(tiny_teacher, reference_weights, 2, ALL))
    reference = run["variants"]["none"]
    assert all(r["let loss"] > 0 and r["teacher forwards"] == 4 for r in reference["records"])
    return run


def test_recompute_variants_single_process(single_variants):
    _assert_variants_match(single_variants["variants"]["none"], single_variants, "single")


@pytest.mark.parametrize("layout,target_layer,flags,variants", [
    ("tp2", 2, ["--tp", 2], ["none", "full:uniform:1", "full:uniform:2", "full:block:2"]),
    # k=2 is rank 0's second layer: 1F1B keeps a second micro-batch in flight before the first backward
    ("pp2_k_on_stage0", 2, ["--pp", 2], ["none", "full:uniform:1", "full:uniform:2", "full:block:1", "full:block:2"]),
    # k=2 is rank 1's first chunk (one layer per chunk): interleaved order, two micro-batches in warm-up
    ("pp2_vpp2_k_on_rank1_chunk0", 2, ["--pp", 2, "--vpp", 2], ["full:uniform:1", "full:block:1"]),
])
def test_recompute_layouts_match_single_process(tmp_path, tiny_teacher, reference_weights,
                                                single_variants, layout, target_layer, flags, variants):
    reference = single_variants["variants"]["none"]
    got = run_layout(tmp_path, layout, 2, _args(tiny_teacher, reference_weights, target_layer, variants, flags))
    _assert_variants_match(reference, got, layout)


# ------------------------------------------------------------------ through pretrain_gpt_let.py
def _cli(nproc, *args):
    if "--train-iters" not in args:
        args = ("--train-iters", 3, *args)
    return parse_log(torchrun(SCRIPT, nproc, [*MODEL, *args]).stdout)


def _assert_logs_equal(reference: dict, got: dict, name: str):
    assert sorted(got) == sorted(reference) and len(reference) == 3, name
    for it, ref in reference.items():
        for key in ("lm loss", "let loss", "let cos", "grad norm"):
            assert key in ref and key in got[it], f"{name} iteration {it}: {key} missing"
            assert got[it][key] == pytest.approx(ref[key], rel=1e-5), f"{name} iteration {it}: {key}"


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("cli") / "teacher"), vocab_size=256)


def test_lean_trainer_full_recompute_with_dropout(cli_teacher):
    """--recompute-granularity full in the lean trainer, dropout on (the recompute restores the RNG)."""
    let = ["--hidden-dropout", 0.1, "--let-teacher", cli_teacher, "--let-target-layer", 2, "--let-lambda", 0.5,
           "--let-stop-iter", 10, "--let-projector", "linear"]
    reference = _cli(1, *let)
    got = _cli(1, *let, "--recompute-granularity", "full", "--recompute-method", "uniform",
               "--recompute-num-layers", 1)
    _assert_logs_equal(reference, got, "full uniform 1")


def test_lean_trainer_moe_expert_parallel_with_recompute(cli_teacher, tmp_path):
    """--num-experts / --moe-router-topk / --expert-model-parallel-size 2 in the lean trainer, with full
    recompute on top, log what one process logs without recompute, from one checkpoint (a fresh EP2
    init draws its experts differently): the experts are re-sharded on load."""
    let = ["--hidden-dropout", 0, "--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", 0.01,
           "--let-teacher", cli_teacher, "--let-target-layer", 2, "--let-lambda", 0.5, "--let-stop-iter", 10,
           "--let-projector", "linear", "--train-iters", 4]
    ckpt = str(tmp_path / "moe")
    _cli(1, *let, "--save", ckpt, "--save-interval", 1, "--exit-interval", 1)
    # --no-load-optim: with EP the optimizer is a chained one (dense + expert), whose state does not
    # load from a single-optimizer checkpoint; both runs start Adam afresh from the same weights
    reference = _cli(1, *let, "--load", ckpt, "--no-load-optim")
    got = _cli(2, *let, "--load", ckpt, "--no-load-optim", "--expert-model-parallel-size", 2, "--recompute-granularity", "full",
               "--recompute-method", "block", "--recompute-num-layers", 2)
    _assert_logs_equal(reference, got, "moe ep2 + full block 2")


def test_stash_left_over_at_iteration_start_is_refused():
    """A no-grad training-mode forward under full recompute without its backward must not hand its
    teacher states to the next iteration's micro-batches."""
    from megatron_let.loss.recompute import RecomputeStash

    stash = RecomputeStash()
    stash.push("mb0")
    stash.push("mb1")
    assert stash.pop() == "mb0"  # first in, first out: the schedules' backward order
    with pytest.raises(RuntimeError, match="1 micro-batch"):
        stash.check_drained()
    assert stash.pop() is None
    stash.check_drained()
