"""pretrain_gpt_let.py end to end (megatron-core trainer): layouts agree with TP1, resume is exact,
unknown flags are refused in one line, and an export without LET loads in a plain run."""

import os

import pytest

from let_testing import (LEAN_LAYOUTS as LAYOUTS, LEAN_MODEL as MODEL, SCRIPT, assert_same_logs, launch,
                         lean_let_flags as let_flags, make_tiny_llama, torchrun, train_lean as train)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    # The mock data's null tokenizer has 129 ids (128 + EOD); the teacher must cover them.
    return make_tiny_llama(str(tmp_path_factory.mktemp("t") / "teacher"), vocab_size=256)


@pytest.fixture(scope="module")
def after_first_iteration(tmp_path_factory, teacher):
    """Every layout continues from the same TP1 checkpoint (weights, Adam state, LET state)."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "it1")
    train(1, "--train-iters", 5, "--hidden-dropout", 0, *let_flags(teacher), "--save", ckpt,
          "--save-interval", 1, "--exit-interval", 1)
    reference = train(1, "--train-iters", 5, "--hidden-dropout", 0, *let_flags(teacher), "--load", ckpt)
    assert sorted(reference) == [2, 3, 4, 5]
    assert all(reference[i]["let lambda"] > 0 and "let loss" in reference[i] for i in (2, 3, 4))
    assert reference[5]["let lambda"] == 0 and "let loss" not in reference[5]  # stop step reached
    return ckpt, reference


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_logged_losses_match_tp1(teacher, after_first_iteration, layout):
    ckpt, reference = after_first_iteration
    got = train(2, "--train-iters", 5, "--hidden-dropout", 0, *let_flags(teacher), "--load", ckpt, *layout)
    assert_same_logs(got, reference)


def test_resume_is_exact(tmp_path, teacher):
    """2N iterations straight == N, stop, --load, N more (dropout on, learned projector, lambda decaying)."""
    common = ["--train-iters", 6, "--hidden-dropout", 0.1, *let_flags(teacher, **{"--let-stop-iter": 5})]
    straight = train(1, *common)
    ckpt = str(tmp_path / "ckpt")
    first = train(1, *common, "--save", ckpt, "--save-interval", 3, "--exit-interval", 3)
    second = train(1, *common, "--load", ckpt)
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for it, ref in straight.items():
        resumed = (first if it <= 3 else second)[it]
        assert {k: v for k, v in resumed.items() if k != "elapsed time per iteration (ms)"} == \
            {k: v for k, v in ref.items() if k != "elapsed time per iteration (ms)"}, f"iteration {it}"


def test_unknown_flag_is_refused_in_one_line():
    proc = launch([*MODEL, "--train-iters", "2", "--distribute-saved-activations"], lean=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--distribute-saved-activations" in lines[0] and "Megatron-LM" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_export_without_let_loads_in_a_plain_run(tmp_path, teacher):
    from megatron.core import dist_checkpointing

    ckpt, export = str(tmp_path / "ckpt"), str(tmp_path / "export")
    train(1, "--train-iters", 2, "--hidden-dropout", 0, *let_flags(teacher), "--save", ckpt)
    torchrun(SCRIPT, 1, [*MODEL, "--train-iters", 2, *let_flags(teacher), "--load", ckpt,
                         "--let-export-dir", export])
    keys = set(dist_checkpointing.load_tensors_metadata(os.path.join(export, "iter_0000002")))
    assert keys and not any("let_alignment" in k for k in keys) and not any("optimizer" in k for k in keys)
    plain = train(1, "--train-iters", 3, "--hidden-dropout", 0, "--load", export)  # no --let-* flags
    assert sorted(plain) == [3] and "let loss" not in plain[3] and "let lambda" not in plain[3]
