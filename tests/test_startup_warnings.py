"""On a machine without a GPU, megatron.core's import-time warnings that TransformerEngine and Apex are
missing are expected: pretrain_gpt_let.py silences exactly those and says so once in its start-up line."""

import os
import subprocess
import sys

from let_testing import ROOT

IMPORT_MEGATRON = ("import warnings; warnings.simplefilter('default'); {call}"
                   "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs; "
                   "warnings.warn('another warning')")


def _stderr(call: str) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-c", IMPORT_MEGATRON.format(call=call)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


def test_cpu_fallback_warnings_are_silenced_and_only_those():
    without = _stderr("")
    assert "Transformer Engine and Apex are not installed. Falling back" in without  # the test can fail
    quiet = _stderr("import pretrain_gpt_let; print(pretrain_gpt_let.quiet_cpu_fallback_warnings()); ")
    assert "not installed. Falling back" not in quiet, quiet
    assert "another warning" in quiet


def test_the_start_up_line_says_it_once(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.syspath_prepend(ROOT)
    import pretrain_gpt_let

    note = pretrain_gpt_let.quiet_cpu_fallback_warnings()
    assert note.startswith(" | ") and "TransformerEngine/Apex not used" in note
