"""Shared fixtures: a tiny real Hugging Face teacher on disk and a torchrun launcher."""

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")

# Skip reasons say what to do, and name what this stack lacks (docs/testing.md lists them all). Megatron-LM is
# not on PyPI.
def _installed_core() -> str:
    from importlib.metadata import version

    return version("megatron-core")


CLONE_MEGATRON_LM = (f"git clone --branch core_v{_installed_core()} https://github.com/NVIDIA/Megatron-LM DIR && "
                     "export MEGATRON_LM_PATH=DIR (pip install six)")
NEEDS_MEGATRON_LM = (f"needs megatron.training, which the installed megatron-core {_installed_core()} wheel lacks: "
                     "Python 3.12 with megatron-core 0.19 (its wheel ships it; .ci/run's second stack), or a "
                     f"Megatron-LM checkout of this version: {CLONE_MEGATRON_LM}")
NEEDS_MEGATRON_LM_CHECKOUT = (f"needs a Megatron-LM checkout (its own pretrain_gpt.py and examples; the megatron-core "
                              f"{_installed_core()} wheel has at most megatron.training): {CLONE_MEGATRON_LM}")
NEEDS_MEGATRON_LM_GIT_DIR = ("needs Megatron-LM's git history with tags: git clone --bare "
                             "https://github.com/NVIDIA/Megatron-LM DIR.git && export MEGATRON_LM_GIT_DIR=DIR.git "
                             "(or $MEGATRON_LM_PATH/.git after git fetch --tags)")


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


def megatron_lm_source():
    """Where Megatron-LM's megatron.training comes from for pretrain_gpt_let.py: "checkout"
    (MEGATRON_LM_PATH), "wheel" (megatron-core >= 0.17 ships it) or None (0.16 wheel: lean trainer only)."""
    import importlib.util

    if os.environ.get("MEGATRON_LM_PATH"):
        return "checkout"
    try:
        return "wheel" if importlib.util.find_spec("megatron.training") is not None else None
    except (ImportError, ValueError):
        return None



def make_tiny_llama(path: str, vocab_size: int = 128, hidden_size: int = 48, seed: int = 0) -> str:
    """A randomly initialised Llama causal LM saved with save_pretrained (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lean_trainer_selectable() -> bool:
    """pretrain_gpt_let.py takes the lean trainer only where megatron.training is absent without a checkout: the
    megatron-core 0.16 wheel (0.17+ wheels ship megatron.training, so Megatron-LM's loop runs there)."""
    from importlib.metadata import version

    from megatron_let.megatron_versions import parse

    return parse(version("megatron-core")) < (0, 17)


NEEDS_LEAN_TRAINER = ("the lean trainer runs only where megatron.training is absent (Python 3.11, megatron-core 0.16.1: "
                      ".ci/run's first stack); this megatron-core wheel ships megatron.training, whose loop "
                      "tests/test_megatron_lm*.py run")


def torchrun(script: str, nproc: int, args, timeout: int = 300, expect_failure: bool = False,
             megatron_lm: bool = False) -> subprocess.CompletedProcess:
    """Run a worker under torchrun on CPU; fail the test with its output when it fails (unless expected).

    Without ``megatron_lm`` the run never sees MEGATRON_LM_PATH, so pretrain_gpt_let.py takes the
    megatron-core trainer even where a Megatron-LM checkout is configured (the test is skipped where that
    trainer cannot be selected: megatron-core 0.17+)."""
    if not megatron_lm and os.path.basename(str(script)) == "pretrain_gpt_let.py" and not lean_trainer_selectable():
        pytest.skip(NEEDS_LEAN_TRAINER)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="")
    if not megatron_lm:
        env.pop("MEGATRON_LM_PATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0 and not expect_failure:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_layout(tmp_path, name: str, nproc: int, args, also: dict = None) -> dict:
    """tests/workers/layout_worker.py under torchrun; ``also``: {NAME: flags} trained in the same launch
    from the same weights, results under ["also"][NAME] (bit for bit what a launch of its own gives:
    test_parallel_equivalence.py::test_also_runs_equal_their_own_launch)."""
    out = tmp_path / f"{name}.json"
    extra = [x for run, flags in (also or {}).items() for x in ("--also", f"{run}={shlex.join(map(str, flags))}")]
    torchrun(os.path.join(WORKERS, "layout_worker.py"), nproc, [*args, *extra, "--out", out])
    return json.loads(out.read_text())


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


def padded_microbatches(count: int, seed: int, vocab: int, seq: int, mbs: int):
    """``count`` micro-batches of random tokens, ~20% of them padding (id 0, masked out of the loss)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        data = torch.randint(1, vocab, (mbs, seq + 1), generator=gen)
        data[torch.rand(mbs, seq + 1, generator=gen) < 0.2] = 0
        tokens, labels = data[:, :-1], data[:, 1:]
        yield {"tokens": tokens, "labels": labels, "loss_mask": (tokens != 0).float(),
               "position_ids": torch.arange(seq).expand(mbs, seq), "attention_mask": None}


def tiny_transformer_config(num_layers: int = 2, **overrides):
    """A small fp32 LLaMA-style TransformerConfig with the CPU-friendly switches."""
    import torch
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        batch_p2p_sync=False, batch_p2p_comm=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# ------------------------------------------------------------------ launches that must be refused
def tree_hash(*paths) -> str:
    """One digest of every file (name and bytes) under ``paths``: "unchanged on disk"."""
    digest = hashlib.sha256()
    for top in paths:
        if os.path.isfile(top):
            with open(top, "rb") as handle:
                digest.update(handle.read())
        for directory, dirs, files in sorted(os.walk(top)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(directory, name)
                digest.update(os.path.relpath(path, top).encode())
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
    return digest.hexdigest()


def launch(args, script: str = "pretrain_gpt_let.py", hold_port: bool = False, env_extra: dict = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` as one plain process with torchrun's environment, on whichever trainer this stack selects
    (Megatron-LM's loop where megatron.training imports, else the lean trainer). ``hold_port``: MASTER_PORT is
    held by a listening socket, so a run that created a process group (rank 0's store binds that port) cannot
    end with a clean one-line refusal: the refusal came before any process group."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    env.update(env_extra or {})
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    if not hold_port:
        env["MASTER_PORT"] = str(free_port())
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        env["MASTER_PORT"] = str(held.getsockname()[1])
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def one_line_error(proc, *fragments, code: int = 2) -> str:
    """The run ended with ``code`` and exactly one error line, last, holding every fragment; no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def refused(args, files=(), fragments=(), script: str = "pretrain_gpt_let.py") -> str:
    """A launch refused before any process group (the port is held) and before any write: one line holding
    ``fragments``, exit 2, no training, every path in ``files`` byte-identical after. Returns the line."""
    before = tree_hash(*files)
    proc = launch(args, script=script, hold_port=True)
    line = one_line_error(proc, *fragments)
    assert "consumed samples" not in proc.stdout
    assert tree_hash(*files) == before, f"{files} changed on disk"
    return line
