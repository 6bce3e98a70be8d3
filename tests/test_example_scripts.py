"""Megatron-LM's own GPT/Llama/Mamba example launch scripts, shrunk to CPU, with LET added (issues 15, 28).

The flag set is the real one: the test runs the example script itself with bash, with a `torchrun`
stand-in first on PATH that records the arguments the script passes (so every variable, array and
condition of the script is expanded by bash, exactly as on a cluster). It then
- shrinks sizes (layers, widths, batch, samples/iterations, parallel sizes to 2 processes),
- removes only flags that cannot run on CPU (each with the reason below),
- substitutes mock data where the script reads the user's files (the llama script's own MOCK mode;
  the GPT-3 and Mamba scripts take data/vocab/tokenizer paths as arguments),
- adds the CPU switches (local transformer, gloo, no fused kernels) and `--let-*` flags with LET's
  default stop (0.25 of training),
and runs it with only the training script's name changed (pretrain_gpt.py -> pretrain_gpt_let.py,
pretrain_hybrid.py -> pretrain_hybrid_let.py) on Megatron-LM (skipped without MEGATRON_LM_PATH) and, for
the GPT scripts' flags it implements, on the lean megatron-core trainer. The Mamba script's pattern of
Mamba-2 layers becomes a '*-' pattern: 'M' needs TransformerEngine / GPU kernels (docs/hybrid.md).
"""

import os
import stat
import subprocess

import pytest

from let_testing import CPU_FLAGS as MEGATRON_LM_CPU_FLAGS, NEEDS_MEGATRON_LM_CHECKOUT, ROOT, make_tiny_llama, parse_log, torchrun

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
SCRIPT = os.path.join(ROOT, "pretrain_gpt_let.py")
LET_SCRIPTS = {"pretrain_gpt.py": SCRIPT, "pretrain_hybrid.py": os.path.join(ROOT, "pretrain_hybrid_let.py")}
pytestmark = pytest.mark.skipif(not MEGATRON_LM_PATH, reason=NEEDS_MEGATRON_LM_CHECKOUT)

EXAMPLES = {  # name: (script, its arguments ({ckpt}, {tb}: directories of the test), processes, flags set)
    "llama3_8b": ("examples/llama/train_llama3_8b_h100_fp8.sh", ["{ckpt}", "{tb}", "MOCK", "MOCK"], 2,
                  {"--tensor-model-parallel-size": "2", "--context-parallel-size": "1"}),
    "gpt3_175b": ("examples/gpt3/train_gpt3_175b_distributed.sh",
                  ["{ckpt}", "{tb}", "vocab.json", "merges.txt", "data_prefix"], 2,
                  {"--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "2"}),
    # its own --sequence-parallel on TP2; 'M' layers cannot run on CPU: attention and MLP layers instead
    "mamba": ("examples/mamba/train.sh", ["data_prefix", "tokenizer.model"], 2,
              {"--tensor-model-parallel-size": "2", "--hybrid-layer-pattern": "*-*-"}),
}
LEAN_TRAINER_EXAMPLES = ["gpt3_175b", "llama3_8b"]  # the lean trainer builds GPTModels only
NEEDS_HYBRID = ("the Mamba example runs pretrain_hybrid.py, a HybridModel: megatron-core 0.19 (Python 3.12) with "
                "MEGATRON_LM_PATH a core_v0.19.0 checkout (tests/test_hybrid.py)")
SHRINK = {"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
          "--num-query-groups": "2", "--kv-channels": "16", "--seq-length": "32", "--max-position-embeddings": "32",
          "--micro-batch-size": "2", "--global-batch-size": "8", "--rampup-batch-size": None,
          "--train-samples": "48", "--lr-decay-samples": "48", "--lr-warmup-samples": "8",
          "--train-iters": "6", "--lr-decay-iters": "6",
          "--eval-iters": "1", "--eval-interval": "4", "--save-interval": "4", "--log-interval": "1",
          "--num-workers": "1", "--distributed-timeout-minutes": "10"}
STEP_SCHEDULE = "0:4 128:8"  # thresholds in tokens: 128 = 4 samples of --seq-length 32
# flag: (number of values, why it cannot run here)
CPU_IMPOSSIBLE = {
    "--fp8-format": (1, "fp8 needs TransformerEngine on a GPU"),
    "--fp8-amax-history-len": (1, "fp8"), "--fp8-amax-compute-algo": (1, "fp8"), "--fp8-param-gather": (0, "fp8"),
    "--attention-backend": (1, "fused/flash attention are CUDA kernels; the local attention runs instead"),
    "--apply-layernorm-1p": (0, "zero-centred gamma is refused by megatron-core's torch LayerNorm (no TE/apex)"),
    "--cross-entropy-loss-fusion": (0, "a fused CUDA cross-entropy kernel"),
    "--profile": (0, "nsys/CUDA profiler"), "--profile-step-start": (1, "profiler"),
    "--profile-step-end": (1, "profiler"),
    "--fp16": (0, "fp16's dynamic loss scaler allocates on CUDA (megatron/core/optimizer/grad_scaler.py)"),
    "--spec": (2, "megatron's hybrid_stack_spec is TransformerEngine's; with --transformer-impl local "
                  "pretrain_hybrid_let.py builds the pattern from megatron-core's own modules"),
}
DATA_FLAGS = {"--data-path": 1, "--vocab-file": 1, "--merge-file": 1, "--tokenizer-type": 1, "--tiktoken-pattern": 1,
              "--tokenizer-model": 1, "--data-cache-path": 1, "--split": 1, "--vocab-size": 1}
MOCK_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--make-vocab-size-divisible-by", "64",
             "--split", "99,1,0"]
CPU_FLAGS = [*MEGATRON_LM_CPU_FLAGS, "--no-bias-gelu-fusion"]  # the GPT-3 example's GeLU too


def script_argv(script: str, positional, tmp_path):
    """(the training script the example launches, the arguments it hands to it), as bash expands them."""
    shim = tmp_path / "bin"
    shim.mkdir()
    record = tmp_path / "argv"
    (shim / "torchrun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {record}\n')
    (shim / "torchrun").chmod(stat.S_IRWXU)
    work = tmp_path / "run_dir"  # the scripts expect to run from the checkout root (pretrain_gpt.py)
    work.mkdir()
    (work / "pretrain_gpt.py").write_text("")
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    dirs = {"ckpt": str(tmp_path / "ckpt"), "tb": str(tmp_path / "tb")}
    subprocess.run(["bash", os.path.join(MEGATRON_LM_PATH, script), *(a.format(**dirs) for a in positional)],
                   check=True, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    argv = record.read_bytes().decode().split("\0")[:-1]
    at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return os.path.basename(argv[at]), argv[at + 1:]


def values(argv, at):
    """Number of values following the flag at ``argv[at]``."""
    n = 0
    while at + 1 + n < len(argv) and not argv[at + 1 + n].startswith("--"):
        n += 1
    return n


def shrink(argv, overrides, tmp_path):
    """(flags for CPU, removed flags with reasons); ``overrides``: flags set to these values (added if absent)."""
    out, removed, i = [], {}, 0
    while i < len(argv):
        flag, n = argv[i], values(argv, i)
        if flag in CPU_IMPOSSIBLE:
            removed[flag] = CPU_IMPOSSIBLE[flag][1]
        elif flag in DATA_FLAGS or flag == "--mock-data":
            pass  # replaced by MOCK_DATA below
        elif flag in overrides:
            out += [flag, overrides[flag]]
        elif flag == "--step-batch-size-schedule":  # 0.19's GPT-3 script: batch 4, then 8 from 4 samples on
            out += [flag, STEP_SCHEDULE]
        elif flag == "--global-batch-size" and "--step-batch-size-schedule" in argv:
            removed[flag] = "Megatron-LM 0.19 itself refuses it with --step-batch-size-schedule (its own script passes both)"
        elif flag in SHRINK:
            if SHRINK[flag] is None:
                removed[flag] = "Megatron-LM itself refuses --rampup-batch-size with --train-iters"
            else:
                out += [flag, SHRINK[flag]]
        elif flag in ("--save", "--load"):  # one directory, as the scripts' CHECKPOINT_PATH
            out += [flag, str(tmp_path / "checkpoints")]
        elif flag == "--tensorboard-dir":
            out += [flag, str(tmp_path / "tensorboard")]
        else:
            out += argv[i:i + 1 + n]
        i += 1 + n
    for flag, value in overrides.items():
        if flag not in out:
            out += [flag, value]
    return out + MOCK_DATA + ["--data-cache-path", str(tmp_path / "cache")] + CPU_FLAGS, removed


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_script_with_let_on_megatron_lm(name, teacher, tmp_path):
    from megatron_let.megatron_versions import has_hybrid_model

    script, positional, nproc, overrides = EXAMPLES[name]
    if name == "mamba" and not has_hybrid_model():
        pytest.skip(NEEDS_HYBRID)
    training_script, argv = script_argv(script, positional, tmp_path)
    flags, removed = shrink(argv, overrides, tmp_path)
    print(name, training_script, "removed:", removed)
    assert "--let-teacher" not in argv and len(argv) > 40, argv
    let = ["--let-teacher", teacher, "--let-target-layer", "1", "--let-lambda", "0.5", "--let-projector", "linear"]
    proc = torchrun(LET_SCRIPTS[training_script], nproc, [*flags, *let], timeout=600, megatron_lm=True)
    logged = parse_log(proc.stdout)
    assert "megatron-let: trainer: Megatron-LM pretrain()" in proc.stdout
    total = max(logged)
    stop = [line for line in proc.stdout.splitlines() if "LET stops at iteration" in line]
    assert len(stop) == 1 and "(default)" in stop[0], stop
    stop_iter = int(stop[0].split("iteration ")[1].split(" ")[0])
    assert 1 <= stop_iter < total
    assert [i for i in sorted(logged) if logged[i].get("let lambda", 0) > 0] == list(range(1, stop_iter + 1))
    assert all("let cos" in logged[i] for i in range(1, stop_iter + 1))
    assert os.path.isfile(tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


@pytest.mark.parametrize("name", LEAN_TRAINER_EXAMPLES)
def test_example_script_flags_on_the_lean_trainer(name, teacher, tmp_path):
    """The same flag set through the lean trainer: it names the first Megatron-LM flag it lacks in one line;
    the flags it implements run."""
    from megatron_let.training.arguments import build_parser

    script, positional, nproc, overrides = EXAMPLES[name]
    flags, _ = shrink(script_argv(script, positional, tmp_path)[1], overrides, tmp_path)
    let = ["--let-teacher", teacher, "--let-target-layer", "1", "--let-lambda", "0.5", "--let-projector", "linear"]
    _, unknown = build_parser().parse_known_args(flags)
    unsupported = [u for u in unknown if u.startswith("--")]
    if unsupported:
        refused = torchrun(SCRIPT, nproc, [*flags, *let], expect_failure=True)
        assert refused.returncode != 0 and f"unsupported flag {unsupported[0]}" in refused.stdout + refused.stderr
    supported, i = [], 0
    while i < len(flags):
        n = values(flags, i)
        if flags[i] not in unsupported:
            supported += flags[i:i + 1 + n]
        i += 1 + n
    print(name, "lean trainer lacks:", unsupported)
    proc = torchrun(SCRIPT, nproc, [*supported, *let], timeout=600)
    logged = parse_log(proc.stdout)
    assert "megatron-let: trainer: lean megatron-core trainer" in proc.stdout
    stop = [line for line in proc.stdout.splitlines() if "LET stops at iteration" in line]
    stop_iter = int(stop[0].split("iteration ")[1].split(" ")[0])
    assert [i for i in sorted(logged) if logged[i].get("let lambda", 0) > 0] == list(range(1, stop_iter + 1))
