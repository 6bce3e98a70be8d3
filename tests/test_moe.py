"""MoE targets with LET: real megatron-core MoE layers (4 experts, top-2 router, load-balancing aux
loss 0.01, allgather dispatcher) in every layer. LET's loss joins MoE's aux losses through the same
schedule without touching theirs, and expert parallelism (EP2; TP2 x EP2 on 4 processes) gives the
single-process lm loss, let loss, let cos, grad norm and MoE aux loss per iteration."""

import pytest

from let_testing import assert_same_numbers, run_layout

MOE = ["--num-experts", 4, "--topk", 2, "--moe-aux-loss-coeff", 0.01]


@pytest.fixture(scope="module")
def moe_weights(tmp_path_factory, tiny_teacher):
    ckpt = tmp_path_factory.mktemp("moe_ref") / "init"
    run_layout(tmp_path_factory.mktemp("moe_ref_out"), "save", 1, ["--teacher", tiny_teacher, *MOE, "--save-ref", ckpt])
    return str(ckpt)


def _args(teacher, ckpt, *extra):
    return ["--teacher", teacher, "--load-ref", ckpt, "--target-layer", 2, *MOE, *extra]


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory, tiny_teacher, moe_weights):
    """One process: LET on, LET on with full recompute, and the same MoE model without LET."""
    return run_layout(tmp_path_factory.mktemp("moe_single"), "single", 1,
                      _args(tiny_teacher, moe_weights, "--recompute", "none", "full:uniform:1", "no-let"))


def test_let_leaves_moe_aux_loss_alone(moe_single):
    with_let, without = moe_single["variants"]["none"]["records"], moe_single["variants"]["no-let"]["records"]
    assert all(r["let loss"] > 0 and r["moe aux loss"] > 0 for r in with_let)
    # same weights before the first update: MoE's own aux loss is bit-identical with LET on
    assert with_let[0]["moe aux loss"] == without[0]["moe aux loss"]
    assert with_let[0]["lm loss"] == without[0]["lm loss"]
    assert with_let[0]["grad norm"] != without[0]["grad norm"]  # LET's gradient did join the backward
    assert_same_numbers(moe_single["variants"]["none"], moe_single["variants"]["full:uniform:1"], "moe recompute")


@pytest.mark.parametrize("layout,nproc,flags", [
    ("ep2", 2, ["--ep", 2]),
    ("tp2_sp_ep2", 4, ["--tp", 2, "--sp", "--ep", 2]),
])
def test_expert_parallel_matches_single_process(tmp_path, tiny_teacher, moe_weights, moe_single, layout, nproc, flags):
    got = run_layout(tmp_path, layout, nproc, _args(tiny_teacher, moe_weights, *flags))
    reference = moe_single["variants"]["none"]
    assert_same_numbers(reference, got, layout)
    for it, (ref, other) in enumerate(zip(reference["records"], got["records"])):
        rel = abs(other["moe aux loss"] - ref["moe aux loss"]) / ref["moe aux loss"]
        assert rel < 1e-5, f"{layout} iteration {it}: moe aux loss {other['moe aux loss']} vs {ref['moe aux loss']}"
