"""LET under TP, TP+SP, PP (k on either stage), interleaved PP, DP, the distributed optimizer and PP x TP
gives the single-process numbers: lm loss, let loss, let cos and grad norm per iteration, with the teacher
spread over the model-parallel group (the default) and on layer k's stage only (owner)."""

import math

import pytest

from let_testing import OWNER, assert_same_numbers, run_layout

def _common(teacher, ckpt, target_layer, extra=()):
    return ["--teacher", teacher, "--load-ref", ckpt, "--target-layer", target_layer, *extra]


PER_TOKEN = ["--per-token-loss"]
# single-process references, by (target layer, micro-batch size): one launch, each run from the same weights
REFERENCES = {(2, 2): [], (3, 2): ["--target-layer", 3], (2, 1): ["--mbs", 1], (3, 1): ["--target-layer", 3, "--mbs", 1]}


def _ref_name(key, per_token=False) -> str:
    return f"k{key[0]}_mb{key[1]}" + ("_per_token" if per_token else "")


@pytest.fixture(scope="module")
def single_launch(tmp_path_factory, tiny_teacher, reference_weights):
    """Every single-process run of this module in one launch (--also): the references (also with
    --calculate-per-token-loss), the owner placement, lambda0 0 (interp and linear) and no LET at all."""
    also = {_ref_name(key, pt): [*flags, *(PER_TOKEN if pt else [])]
            for key, flags in REFERENCES.items() for pt in (False, True) if key != (2, 2) or pt}
    also.update(OWNER, zero_interp=["--lambda0", 0, "--projector", "interp"], zero_linear=["--lambda0", 0],
                no_let=["--teacher", ""])
    return run_layout(tmp_path_factory.mktemp("single"), "single", 1, _common(tiny_teacher, reference_weights, 2),
                      also=also)


@pytest.fixture(scope="module")
def single_process(single_launch):
    """(target layer, mbs[, "per-token"]) -> the single-process numbers with LET on; "owner": k 2, owner."""
    runs = {(2, 2): single_launch, **{key: single_launch["also"][_ref_name(key)] for key in REFERENCES if key != (2, 2)},
            **{(*key, "per-token"): single_launch["also"][_ref_name(key, True)] for key in REFERENCES},
            "owner": single_launch["also"]["owner"]}
    for ref in runs.values():  # LET really is on: lambda > 0 and a non-trivial alignment loss
        assert all(r["let lambda"] > 0 and r["let loss"] > 0 and math.isfinite(r["let cos"])
                   for r in ref["records"])
    return runs


def test_also_runs_equal_their_own_launch(tmp_path, tiny_teacher, reference_weights, single_process):
    """The runs these tests share a launch with (--also) give what a launch of their own gives, bit for bit."""
    alone = run_layout(tmp_path, "k3_mb1", 1, _common(tiny_teacher, reference_weights, 3, ["--mbs", 1]))
    assert alone["records"] == single_process[(3, 1)]["records"]


def test_owner_placement_single_process_equals_spread(single_process):
    assert_same_numbers(single_process[(2, 2)], single_process["owner"], "single process owner vs spread")


def test_per_token_loss_mode_changes_the_numbers(single_process):
    """--calculate-per-token-loss is really on in its runs (the layout test compares both modes)."""
    assert single_process[(2, 2, "per-token")]["records"] != single_process[(2, 2)]["records"]


LAYOUT_RUNS = {}  # (nproc, target layer, flags) -> numbers: the teacher-row test reads the layout test's runs


def layout_run(tmp_path, tiny_teacher, reference_weights, layout, nproc, target_layer, flags) -> dict:
    """``layout`` with the spread placement and, in the same launch, the owner placement (["also"]["owner"])
    and --calculate-per-token-loss (["also"]["per-token"]: the LET gradient normalised by the global token count)."""
    key = (nproc, target_layer, tuple(flags))
    if key not in LAYOUT_RUNS:
        args = _common(tiny_teacher, reference_weights, target_layer, flags)
        LAYOUT_RUNS[key] = run_layout(tmp_path, layout, nproc, args, also={**OWNER, "per-token": PER_TOKEN})
    return LAYOUT_RUNS[key]


@pytest.mark.parametrize("layout,nproc,target_layer,flags", [
    ("tp2", 2, 2, ["--tp", 2]),
    ("tp2_sp", 2, 2, ["--tp", 2, "--sp"]),
    ("pp2_k_on_stage0", 2, 2, ["--pp", 2]),
    ("pp2_k_on_stage1", 2, 3, ["--pp", 2]),
    ("pp2_vpp2_k_on_rank1_chunk0", 2, 2, ["--pp", 2, "--vpp", 2]),
    ("pp2_vpp2_k_on_rank0_chunk1", 2, 3, ["--pp", 2, "--vpp", 2]),
    ("dp2", 2, 2, []),
    ("dp2_distributed_optimizer", 2, 3, ["--dist-opt"]),
    ("tp2_mb1", 2, 2, ["--tp", 2, "--mbs", 1]),
    ("pp2_tp2_sp_k_on_stage1", 4, 3, ["--pp", 2, "--tp", 2, "--sp"]),
])
def test_layout_matches_single_process(tmp_path, tiny_teacher, reference_weights, single_process,
                                       layout, nproc, target_layer, flags):
    """The teacher spread over the model-parallel group, on layer k's ranks only (owner), and the
    per-token loss mode, each against its single-process run."""
    got = layout_run(tmp_path, tiny_teacher, reference_weights, layout, nproc, target_layer, flags)
    key = (target_layer, flags[flags.index("--mbs") + 1] if "--mbs" in flags else 2)
    assert_same_numbers(single_process[key], got, f"{layout} spread")
    assert_same_numbers(single_process[key], got["also"]["owner"], f"{layout} owner")
    assert_same_numbers(single_process[(*key, "per-token")], got["also"]["per-token"], f"{layout} per-token")


def _even_share_bound(rows: int, ranks: int) -> float:
    """max/mean of the best split of ``rows`` whole sequences over ``ranks``: ceil/floor of the division."""
    return math.ceil(rows / ranks) / max(rows // ranks, 1)


# rows per iteration = global batch 8 (one DP replica); owner: today's per-rank counts
@pytest.mark.parametrize("layout,nproc,target_layer,flags,owner_rows", [
    ("pp2_k_on_stage1", 2, 3, ["--pp", 2], [0, 8]),  # only stage 1 (layer 3) runs it
    ("tp2_mb1", 2, 2, ["--tp", 2, "--mbs", 1], [8, 8]),  # micro-batch 1 does not divide by TP: both run all
    ("pp2_tp2_sp_k_on_stage1", 4, 3, ["--pp", 2, "--tp", 2, "--sp"], [0, 0, 4, 4]),  # rank = pp * tp + tp_rank
])
def test_teacher_rows_are_spread_evenly(tmp_path, tiny_teacher, reference_weights, layout, nproc, target_layer,
                                        flags, owner_rows):
    """Counts the sequences each rank ran through the teacher per iteration: spread gives an even share
    (max/mean within ceil/floor), owner shows the skew this placement exists to remove (the numbers of
    both are test_layout_matches_single_process's, from the same runs)."""
    spread = layout_run(tmp_path, tiny_teacher, reference_weights, layout, nproc, target_layer, flags)
    rows = 8
    for it, record in enumerate(spread["per_rank"]):
        counts = record["teacher rows"]
        assert sum(counts) == rows, f"{layout} iteration {it}: {counts} (each sequence exactly once)"
        mean = sum(counts) / len(counts)
        assert max(counts) / mean <= _even_share_bound(rows, nproc), f"{layout} iteration {it}: {counts}"
    owner = spread["also"]["owner"]
    assert [r["teacher rows"] for r in owner["per_rank"]] == [owner_rows] * len(owner["per_rank"])


@pytest.fixture(scope="module")
def pp2_tp2_runs(tmp_path_factory, tiny_teacher, reference_weights):
    """PP2 x TP2, k 3 on stage 1: LET stopping at iteration 2 of 3, and (--also) micro-batch 3 of a global 6."""
    return run_layout(tmp_path_factory.mktemp("pp2_tp2"), "pp2_tp2", 4,
                      _common(tiny_teacher, reference_weights, 3, ["--pp", 2, "--tp", 2, "--stop-iter", 2, "--iters", 3]),
                      also={"remainder": ["--mbs", 3, "--global-batch", 6, "--iters", 1, "--stop-iter", 100]})


def test_remainder_rows_no_rank_does_double_work(pp2_tp2_runs):
    """6 sequences over 4 ranks (PP2 x TP2, micro-batch 3): 2, 2, 1, 1 -- never one rank 3 or more."""
    assert sorted(pp2_tp2_runs["also"]["remainder"]["per_rank"][0]["teacher rows"]) == [1, 1, 2, 2]


def test_teacher_released_at_stop_step_on_every_rank(pp2_tp2_runs):
    """Spread loads the teacher on every rank of the group; at the stop step each rank drops it (weakref)."""
    first, last = pp2_tp2_runs["per_rank"][0], pp2_tp2_runs["per_rank"][-1]
    assert first["teacher alive"] == [True] * 4 and last["teacher loaded"] == [True] * 4
    assert last["teacher alive"] == [False] * 4 and last["teacher rows"] == [0] * 4


def test_lambda_zero_is_bit_identical_to_no_let(single_launch):
    zero, plain = single_launch["also"]["zero_interp"], single_launch["also"]["no_let"]
    assert all(r["let lambda"] == 0.0 for r in zero["records"])
    assert [_without_lambda(r) for r in zero["records"]] == plain["records"]  # bit for bit; no let loss logged


def test_lambda_zero_with_learned_projector(single_launch):
    """A learned projector is an extra parameter with zero gradient: the LM loss stays bit-identical;
    the grad norm only sees a 0 added in another summation order (and so may move by an ulp)."""
    zero, plain = single_launch["also"]["zero_linear"], single_launch["also"]["no_let"]
    for p, z in zip(plain["records"], zero["records"]):
        assert z["let lambda"] == 0.0
        assert p["lm loss"] == z["lm loss"]
        assert abs(p["grad norm"] - z["grad norm"]) <= 1e-6 * p["grad norm"]
        assert set(_without_lambda(z)) == set(p)  # no let scalars: nothing was aligned, no teacher ran


def _without_lambda(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "let lambda"}


def test_teacher_is_frozen(single_process):
    for ref in single_process.values():
        checksums = {r["teacher checksum"] for r in ref["records"]}
        assert checksums == {ref["teacher_first_checksum"]}
        assert not any(r["teacher has grad"] for r in ref["records"])
