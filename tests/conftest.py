"""Shared fixtures (pytest reads them only from here); the helpers they use live in tests/let_testing.py."""

import os

import pytest

from let_testing import (MEGATRON_LM_LAMBDA0, MEGATRON_LM_MODEL, MEGATRON_LM_STOP_ITER, MEGATRON_LM_TARGET_LAYER,
                         SCRIPT, free_port, make_tiny_llama, run_layout, run_megatron_lm)
from let_testing import ROOT, refused  # noqa: F401 (test_package_layout.py imports ROOT, docs/reliability.md
#                                                   points at conftest.refused)


def pytest_terminal_summary(terminalreporter):
    """The skipped tests grouped by what would run them, once, at the end (also under -q)."""
    from collections import Counter

    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped, by what would run them (docs/testing.md)")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:4d} x {reason}")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"))


@pytest.fixture(scope="session")
def megatron_world1():
    """megatron-core process groups for a single process (TP=PP=CP=DP=1), in this pytest process."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_let.compat.cpu import enable_cpu_megatron
    from megatron_let.training.components import initialize_parallel

    enable_cpu_megatron()  # only without CUDA
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    initialize_parallel(seed=1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------ layout_worker.py runs
@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory, tiny_teacher):
    """One set of initial weights (projector included) that every layout loads."""
    ckpt = tmp_path_factory.mktemp("ref") / "init"
    run_layout(tmp_path_factory.mktemp("ref_out"), "save", 1,
               ["--teacher", tiny_teacher, "--save-ref", ckpt])
    return str(ckpt)


# ------------------------------------------------------------------ Megatron-LM's loop (pretrain_gpt_let.py)
@pytest.fixture(scope="module")
def megatron_lm_path():
    """The checkout, or None where the wheel's megatron.training runs (with megatron_let's gpt_script)."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        return None
    if not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        pytest.fail(f"MEGATRON_LM_PATH={path} holds no pretrain_gpt.py")
    if not os.path.isfile(SCRIPT):
        pytest.fail(f"{SCRIPT} is missing")
    return path


@pytest.fixture(scope="module")
def let_args(tiny_teacher):
    return ["--let-teacher", tiny_teacher, "--let-target-layer", MEGATRON_LM_TARGET_LAYER,
            "--let-lambda", MEGATRON_LM_LAMBDA0, "--let-stop-iter", MEGATRON_LM_STOP_ITER, "--let-projector", "linear"]


@pytest.fixture(scope="module")
def initial_checkpoint(megatron_lm_path, let_args, tmp_path_factory):
    """One TP1 step saved as torch_dist: the common starting point of all layouts."""
    ckpt = tmp_path_factory.mktemp("megatron_lm") / "init"
    run_megatron_lm(1, [*MEGATRON_LM_MODEL, *let_args, "--train-iters", 1, "--save", ckpt, "--save-interval", 1])
    return ckpt
