"""--let-lambda auto under the layouts (issue 27): TP2 (with and without sequence parallel), PP2 with layer k
on either stage and DP2 give the single-process effective weight, realised ratio and --let-stop auto's
cos(g_A, g_LM) (< 1e-5) iteration by iteration, full recompute gives the same, a stop at iteration 0 costs nothing (no teacher loaded, the numbers
of a run without LET), and a resume continues the weight's state exactly (lean trainer, pretrain_gpt_let.py)."""

import pytest

from let_testing import LEAN_MODEL as MODEL, SCRIPT, make_tiny_llama, parse_log, run_layout, torchrun

REL_TOL = 1e-5
KEYS = ("lm loss", "let loss", "let cos", "let lambda", "let ratio", "let grad cos", "grad norm")
COSINES = ("let cos", "let grad cos")  # compared as the cosines they are, to 1e-5 absolute
# 4 iterations, lambda decays to 0 at 6, a fraction large enough to move the training; --let-stop auto that never
# stops (every cosine >= -1 > -1.1): its cos(g_A, g_LM) is checked under every layout too
AUTO = ["--lambda0", "auto", "--auto-fraction", 0.5, "--iters", 4, "--stop-iter", 6,
        "--stop", "auto", "--stop-threshold", -1.1, "--stop-window", 1, "--stop-warmup", 0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_teacher):
    ckpt = tmp_path_factory.mktemp("auto_ref") / "init"
    run_layout(tmp_path_factory.mktemp("auto_ref_out"), "save", 1, ["--teacher", tiny_teacher, "--save-ref", ckpt])
    return str(ckpt)


def _args(teacher, weights, *flags):
    return ["--teacher", teacher, "--load-ref", weights, *AUTO, *flags]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_teacher, weights):
    """One process, one launch: k 2 (and under full recompute), k 3, the stop at iteration 0, no LET."""
    return run_layout(tmp_path_factory.mktemp("auto_single"), "single", 1,
                      _args(tiny_teacher, weights, "--recompute", "none", "full:uniform:1"),
                      also={"k3": ["--target-layer", 3], "no_let": ["--teacher", ""],
                            "stop0": ["--stop-iter", 0, "--projector", "interp"]})  # (a learned projector: an ulp)


def assert_same(reference: dict, other: dict, name: str):
    assert len(reference["records"]) == len(other["records"]) == 4
    for it, (ref, got) in enumerate(zip(reference["records"], other["records"])):
        for key in KEYS:
            # let cos sits near 0 here (an untrained target): the cosines are compared absolutely
            rel = abs(got[key] - ref[key]) / (1.0 if key in COSINES else max(abs(ref[key]), 1e-12))
            assert rel < REL_TOL, f"{name} iteration {it}: {key} {got[key]!r} vs {ref[key]!r} (rel {rel:.2e})"


def test_single_process_weight_follows_the_rule(single):
    """Iteration 0 measures (weight 0); then the realised pull ratio lambda ||g_A|| / ||g_LM|| is ~ fraction x
    decay (the EMA lags the ratio a little), and the weight is a real, decaying number."""
    for run in (single, single["also"]["k3"]):
        records = run["records"]
        assert records[0]["let lambda"] == 0.0 and records[0]["let ratio"] == 0.0
        for it, record in enumerate(records[1:], start=1):
            assert record["let lambda"] > 0
            assert record["let ratio"] == pytest.approx(0.5 * (1 - it / 6), rel=0.3)


def test_full_recompute_gives_the_same_weight(single):
    assert_same(single["variants"]["none"], single["variants"]["full:uniform:1"], "full recompute")


@pytest.mark.parametrize("layout,nproc,flags,also", [
    ("tp2", 2, ["--tp", 2], {"sp": ["--sp"]}),
    ("pp2", 2, ["--pp", 2], {"k3": ["--target-layer", 3]}),  # k 2: last layer of stage 0; k 3: stage 1
    ("dp2", 2, [], {"k3": ["--target-layer", 3]}),
])
def test_layout_gives_the_single_process_weight(tmp_path, tiny_teacher, weights, single, layout, nproc, flags, also):
    got = run_layout(tmp_path, layout, nproc, _args(tiny_teacher, weights, *flags), also=also)
    assert_same(single, got, layout)
    for name in also:
        assert_same(single["also"]["k3"] if name == "k3" else single, got["also"][name], f"{layout} {name}")


def test_stop_at_iteration_zero_costs_nothing(single):
    """auto with the stop at iteration 0: the teacher is never loaded and the run is the run without LET."""
    stop0, plain = single["also"]["stop0"], single["also"]["no_let"]
    assert all(r["let lambda"] == 0.0 and "let ratio" not in r for r in stop0["records"])
    assert [{k: v for k, v in r.items() if k != "let lambda"} for r in stop0["records"]] == plain["records"]
    assert all(not any(rank["teacher loaded"]) for rank in stop0["per_rank"])


def test_resume_continues_the_weight_exactly(tmp_path):
    """5 iterations straight (saving at 3 and 5) == --load its iteration 3 and run 2 more: the same log lines
    (let lambda, let ratio included) and the same saved EMA state, bit for bit."""
    import shutil

    from megatron.core import dist_checkpointing

    teacher = make_tiny_llama(str(tmp_path / "teacher"), vocab_size=256)  # the mock data has 129 ids
    common = [*MODEL, "--train-iters", 5, "--let-teacher", teacher, "--let-target-layer", 2,
              "--let-lambda", "auto", "--let-lambda-auto-fraction", 0.3, "--let-stop-iter", 4,
              "--let-projector", "linear", "--save-interval", 3]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = parse_log(torchrun(SCRIPT, 1, [*common, "--save", straight_dir]).stdout)
    shutil.copytree(straight_dir / "iter_0000003", resumed_dir / "iter_0000003")
    (resumed_dir / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = parse_log(torchrun(SCRIPT, 1, [*common, "--save", resumed_dir, "--load", resumed_dir]).stdout)
    assert sorted(straight) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5]
    assert straight[2]["let lambda"] > 0 and "let ratio" in straight[2]
    drop = "elapsed time per iteration (ms)"
    for it in (4, 5):
        assert {k: v for k, v in resumed[it].items() if k != drop} == \
            {k: v for k, v in straight[it].items() if k != drop}, it

    def saved(root, iteration):
        return dist_checkpointing.load_common_state_dict(str(root / f"iter_{iteration:07d}"))["let"]["auto_lambda"]

    assert saved(straight_dir, 3)["updates"] == 3
    assert saved(resumed_dir, 5) == saved(straight_dir, 5) and saved(straight_dir, 5)["updates"] == 4  # stop at 4
