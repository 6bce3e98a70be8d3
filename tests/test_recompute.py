"""Full activation recomputation with LET: layer k runs twice (no-grad forward, then again in the
backward pass), the alignment loss is counted once with that micro-batch's teacher states, and every
number equals the run without recompute: one process, TP2, PP2 (k on the stage with a warm-up
micro-batch in flight) and interleaved PP2. Selective recompute too. Each worker run trains all its
recompute variants from the same initial weights (one torchrun start-up per layout)."""

import pytest

from conftest import run_layout
from test_parallel_equivalence import assert_same_numbers, reference_weights  # noqa: F401 (fixture)

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
def single_variants(tmp_path_factory, tiny_teacher, reference_weights):  # noqa: F811
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
def test_recompute_layouts_match_single_process(tmp_path, tiny_teacher, reference_weights,  # noqa: F811
                                                single_variants, layout, target_layer, flags, variants):
    reference = single_variants["variants"]["none"]
    got = run_layout(tmp_path, layout, 2, _args(tiny_teacher, reference_weights, target_layer, variants, flags))
    _assert_variants_match(reference, got, layout)
