"""LET on Megatron-Bridge's own pretrain() (pretrain_bridge_let.py, megatron_let/integrations/bridge.py), on CPU
with gloo.

Bridge's vanilla GPT recipe (``megatron.bridge.recipes.gpt.vanilla_gpt``: the one recipe that needs no model hub)
is shrunk to a 4-layer GPT with Bridge's own Hydra-style overrides; LET's settings are ``let.*`` overrides. Every
layout loads the same initial weights (a one-step TP1 run saved as torch_dist, loaded with
``checkpoint.finetune=true``: Bridge seeds each pipeline stage differently), then trains 4 iterations on Bridge's
mock data with a tiny Hugging Face teacher; its per-iteration ``lm loss`` / ``let loss`` / ``let lambda`` /
``grad norm`` (Bridge's log line: its totals are reset every log, so each line is one iteration) must equal one
process's (rel 1e-5). Needs ``megatron.bridge`` (Python 3.12: .ci/run's stack 2; docs/bridge.md says how to
install it).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from let_testing import (MEGATRON_LM_MODEL, REL_TOL, ROOT, launch, megatron_lm_source, parse_log, run_megatron_lm,
                         torchrun)

NEEDS_BRIDGE = ("needs Megatron-Bridge (Python 3.12): pip install --no-deps megatron-bridge==0.6.2 && pip install -e "
                "'.[bridge-cpu]' (docs/bridge.md; .ci/run's second stack)")


def _bridge_installed() -> bool:
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except (ImportError, ValueError):
        return False


pytestmark = pytest.mark.skipif(not _bridge_installed(), reason=NEEDS_BRIDGE)

SCRIPT = os.path.join(ROOT, "pretrain_bridge_let.py")
PLAIN = os.path.join(ROOT, "tests", "workers", "bridge_plain.py")
RECIPE = "megatron.bridge.recipes.gpt.vanilla_gpt:vanilla_gpt_pretrain_config"
ITERS, TARGET_LAYER, LAMBDA0, STOP_ITER = 4, 3, 0.5, 3
# the recipe shrunk to CPU size, in Bridge's own override syntax: fp32, gloo, megatron-core's local layers (the
# CPU layer picks them: no TransformerEngine), vocabulary 127 padded to 128 for TP 1 and 2 alike
CPU_OVERRIDES = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.seq_length=32", "dataset.seq_length=32", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
    "tokenizer.vocab_size=127", "model.make_vocab_size_divisible_by=64",
    "train.global_batch_size=8", "train.micro_batch_size=2",
    "mixed_precision=null", "optimizer.bf16=false", "model.pipeline_dtype=torch.float32",
    "model.use_cpu_initialization=true", "model.bias_activation_fusion=false", "model.masked_softmax_fusion=false",
    "model.persist_layer_norm=false", "model.gradient_accumulation_fusion=false", "model.bias_dropout_fusion=false",
    "model.apply_rope_fusion=false", "dist.distributed_backend=gloo",
    "checkpoint.save=null", "logger.tensorboard_dir=null", "validation.eval_iters=0", "logger.log_interval=1",
    # the GPT of let_testing.MEGATRON_LM_MODEL (Megatron-LM's loop): RMSNorm, SwiGLU, RoPE, no biases, untied
    "model.normalization=RMSNorm", "model.gated_linear_unit=true", "model.activation_func=silu",
    "model.add_bias_linear=false", "model.position_embedding_type=rope", "model.share_embeddings_and_output_weights=false",
]
KEYS = ("lm loss", "let loss", "let lambda", "let ratio", "grad norm")  # let ratio: let.lambda0=auto only


def let_overrides(teacher, layer=TARGET_LAYER, stop=STOP_ITER, lambda0=LAMBDA0):
    return [f"let.teacher={teacher}", f"let.target_layer={layer}", f"let.lambda0={lambda0}", f"let.stop_iter={stop}",
            "let.projector=linear"]


def bridge(nproc: int, *overrides, script: str = SCRIPT):
    """A run of ``script`` (one process: with torchrun's environment, without its start-up; more: under torchrun):
    (its parsed log, its stdout)."""
    args = [RECIPE, *CPU_OVERRIDES, *overrides] if script == PLAIN else ["--recipe", RECIPE, *CPU_OVERRIDES, *overrides]
    if nproc == 1:
        proc = launch(args, script=os.path.relpath(script, ROOT))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    else:
        proc = torchrun(script, nproc, args, timeout=300)
    logged = parse_log(proc.stdout)
    assert logged and "lm loss" in logged[min(logged)], proc.stdout[-3000:] + proc.stderr[-3000:]
    return logged, proc.stdout


def assert_same(got: dict, reference: dict, what: str, keys=KEYS, iterations=None):
    for it in iterations or sorted(reference):
        for key in keys:
            ref, value = reference[it].get(key, 0.0), got[it].get(key, 0.0)
            assert value == pytest.approx(ref, rel=REL_TOL, abs=1e-7), f"{what}: iteration {it} {key}: {value} vs {ref}"


_CPU_LAYER_CHECK = """
import importlib.util, sys
from megatron_let import patch_registry
from megatron_let.compat.cpu_bridge import enable_cpu_bridge
import megatron_let.integrations.bridge  # declares let-bridge
assert enable_cpu_bridge()
groups = ("cpu-bridge-imports", "cpu-bridge", "let-bridge")
for group in groups:
    entries = patch_registry.patches(group)
    assert entries, group
    for entry in entries:
        assert entry.why and entry.applies(), entry
        entry.resolve()
# the placeholders are gone again: megatron-core, Megatron-LM and later imports see the packages as absent
for package in ("transformer_engine", "modelopt", "nvidia_resiliency_ext", "megatron.energon"):
    assert importlib.util.find_spec(package) is None, package
    assert not [name for name in sys.modules if name == package or name.startswith(package + ".")], package
import megatron.training.training as training, megatron.training.checkpointing as checkpointing
from megatron.core.extensions import transformer_engine as te_extension
assert not training.has_nvidia_modelopt and not checkpointing.has_nvidia_modelopt
assert not te_extension.HAVE_TE
import megatron.bridge.peft.lora_layers as lora  # imported with TransformerEngine's placeholder, which refuses to run
try:
    lora.te.Linear()
except RuntimeError as error:
    assert "CPU import placeholder" in str(error)
else:
    raise AssertionError("a placeholder ran")
# a let.* setting LET cannot use is refused before pretrain(), named as the override
from megatron.bridge.recipes.gpt.vanilla_gpt import vanilla_gpt_pretrain_config
from megatron_let.errors import LETConfigError
from megatron_let.integrations.bridge import bridge_names, let_forward_step_and_callbacks, with_let
try:
    let_forward_step_and_callbacks(with_let(vanilla_gpt_pretrain_config(), target_layer=3))
except LETConfigError as error:
    assert bridge_names(str(error)).startswith("let.target_layer given without let.teacher"), error
else:
    raise AssertionError("let.target_layer without let.teacher was accepted")
print("ok", patch_registry.summary())
"""


def test_cpu_layer_is_registry_entries_and_leaves_no_placeholder():
    """Every Bridge CPU redirection and LET wiring is a registry entry whose target exists in Bridge 0.6.2 with a
    why; the import placeholders (TransformerEngine, ModelOpt, nvidia-resiliency-ext, megatron-energon) are gone
    once Bridge's modules are imported: megatron-core still sees TransformerEngine absent, Megatron-LM ModelOpt
    absent, and a placeholder refuses to run."""
    run = subprocess.run([sys.executable, "-c", _CPU_LAYER_CHECK], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT))
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def initial_checkpoint(tiny_teacher, tmp_path_factory):
    """One TP1 step with LET saved as torch_dist: the common starting point of every layout."""
    ckpt = tmp_path_factory.mktemp("bridge") / "init"
    bridge(1, *let_overrides(tiny_teacher), "train.train_iters=1", f"checkpoint.save={ckpt}",
           "checkpoint.save_interval=1")
    return str(ckpt)


def from_checkpoint(ckpt):
    return [f"checkpoint.load={ckpt}", "checkpoint.finetune=true", f"train.train_iters={ITERS}"]


@pytest.fixture(scope="module")
def reference(tiny_teacher, initial_checkpoint, tmp_path_factory):
    """One process, LET at layer 3, logging to TensorBoard and saving at iteration 2 (which the resume test
    resumes from): (parsed log, stdout, TensorBoard directory, checkpoint directory)."""
    tensorboard, ckpt = tmp_path_factory.mktemp("bridge_tb"), tmp_path_factory.mktemp("bridge_resume") / "ckpt"
    logged, stdout = bridge(1, *let_overrides(tiny_teacher), *from_checkpoint(initial_checkpoint),
                            f"logger.tensorboard_dir={tensorboard}", f"checkpoint.save={ckpt}",
                            "checkpoint.save_interval=2")
    return logged, stdout, str(tensorboard), str(ckpt)


def test_recipe_trains_with_let(reference):
    """LET's scalars in Bridge's log line and TensorBoard; lambda decays linearly to 0 at the stop step, where
    LET ends and the teacher is released; the alignment loss is within (0, 2 lambda] while it runs."""
    logged, stdout, tensorboard, _ = reference
    assert sorted(logged) == list(range(1, ITERS + 1))
    lambdas = [logged[i]["let lambda"] for i in range(1, ITERS + 1)]
    assert lambdas == pytest.approx([LAMBDA0 * max(0.0, 1 - i / STOP_ITER) for i in range(ITERS)], abs=1e-7)
    for i in range(1, STOP_ITER + 1):
        assert 0 < logged[i]["let loss"] <= 2 * logged[i]["let lambda"], logged[i]
        assert "let cos" in logged[i], logged[i]  # also when negative (Bridge itself prints only values >= 0)
    assert logged[ITERS]["let loss"] == 0.0
    assert f"LET stopped at iteration {STOP_ITER}: lambda 0, teacher released" in stdout, stdout[-3000:]
    assert "let-bridge 3" in stdout  # the registry's start-up line names the Bridge entries
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard)
    events.Reload()
    assert {"lm loss", "let loss", "let lambda"} <= set(events.Tags()["scalars"]), events.Tags()["scalars"]


def test_without_let_it_is_bridges_own_run(tmp_path):
    """Without let.*: pretrain_bridge_let.py gives Bridge's own pretrain() with its own forward step, to the
    printed digit (lm loss and grad norm of every iteration, no LET field)."""
    plain, _ = bridge(1, "train.train_iters=3", script=PLAIN)
    ours, stdout = bridge(1, "train.train_iters=3")
    assert sorted(ours) == sorted(plain) == [1, 2, 3]
    for it in plain:
        assert {k: v for k, v in ours[it].items() if "time" not in k} == \
            {k: v for k, v in plain[it].items() if "time" not in k}, it
        assert not any(key.startswith("let") for key in ours[it])
    assert "LET" not in stdout


LAYOUTS = {  # name: (processes, overrides, target layer)
    "tp2": (2, ["model.tensor_model_parallel_size=2"], TARGET_LAYER),
    "pp2_last_stage": (2, ["model.pipeline_model_parallel_size=2"], TARGET_LAYER),
    "pp2_first_stage_auto_lambda": (2, ["model.pipeline_model_parallel_size=2"], 1),
}


@pytest.fixture(scope="module")
def first_stage_reference(tiny_teacher, initial_checkpoint):
    """Layer 1 (PP2: the first stage) with the default let.lambda0=auto: the weight measured every iteration."""
    logged = bridge(1, *let_overrides(tiny_teacher, layer=1, lambda0="auto"), *from_checkpoint(initial_checkpoint))[0]
    assert logged[1]["let lambda"] == 0.0 and logged[2]["let lambda"] > 0 and "let ratio" in logged[2], logged
    return logged


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_process(layout, tiny_teacher, initial_checkpoint, reference, request):
    """TP2, and PP2 with layer k on the last and on the first stage (there with let.lambda0=auto, measured every
    iteration), equal one process on Bridge's loop."""
    nproc, overrides, layer = LAYOUTS[layout]
    expected = reference[0] if layer == TARGET_LAYER else request.getfixturevalue("first_stage_reference")
    lambda0 = LAMBDA0 if layer == TARGET_LAYER else "auto"
    logged, stdout = bridge(nproc, *let_overrides(tiny_teacher, layer=layer, lambda0=lambda0),
                            *from_checkpoint(initial_checkpoint), *overrides)
    rows = re.search(r"teacher sequences per rank of the model-parallel group in the first iteration: \[([0-9, ]+)\]",
                     stdout)
    assert rows and sum(int(r) for r in rows.group(1).split(",")) == 8, stdout[-3000:]  # spread over both ranks
    assert_same(logged, expected, layout)


def test_resume_equals_a_straight_run(tiny_teacher, reference):
    """Resume from the straight run's save at iteration 2 (Bridge's own checkpoint: distributed optimizer, LET's
    state in its common part) and train to 4: the straight run's numbers, across the stop step."""
    straight, _, _, ckpt = reference
    resumed, stdout = bridge(1, *let_overrides(tiny_teacher), f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2",
                             f"train.train_iters={ITERS}")
    assert sorted(resumed) == [3, 4], sorted(resumed)
    assert_same(resumed, straight, "resumed", iterations=[3, 4])


@pytest.mark.skipif(megatron_lm_source() is None, reason="needs megatron.training (Megatron-LM's loop)")
def test_bridge_and_megatron_lm_log_the_same_first_iteration(tiny_teacher, initial_checkpoint, reference):
    """Same model (Bridge's initial checkpoint, loaded by both), same data (megatron-core's mock GPT dataset, seed
    1234): Megatron-LM's loop (pretrain_gpt_let.py) logs Bridge's first-iteration lm loss, LET loss, cosine and
    grad norm."""
    megatron_lm = run_megatron_lm(1, [*MEGATRON_LM_MODEL, "--let-teacher", tiny_teacher, "--let-target-layer",
                                      TARGET_LAYER, "--let-lambda", LAMBDA0, "--let-stop-iter", STOP_ITER,
                                      "--let-projector", "linear", "--train-iters", 1, "--load", initial_checkpoint,
                                      "--finetune", "--seed", 1234])
    assert_same(megatron_lm, reference[0], "Megatron-LM vs Bridge", keys=("lm loss", "let loss", "let cos",
                                                                            "let lambda", "grad norm"),
                iterations=[1])


def test_export_writes_a_plain_bridge_checkpoint(tiny_teacher, initial_checkpoint, tmp_path):
    """let.export_dir with checkpoint.load: Bridge's own save of the loaded model, without LET's projector, LET
    state or optimizer; the loop runs no iteration and the run ends cleanly."""
    export = tmp_path / "export"
    args = ["--recipe", RECIPE, *CPU_OVERRIDES, *let_overrides(tiny_teacher), f"checkpoint.load={initial_checkpoint}",
            f"let.export_dir={export}", "train.train_iters=4"]
    proc = launch(args, script=os.path.relpath(SCRIPT, ROOT))
    assert proc.returncode == 0 and "Pretrain failed" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"exported iteration 1 without LET state to {export}" in proc.stdout
    assert not parse_log(proc.stdout)  # no training iteration
    check = subprocess.run([sys.executable, "-c", f"""
import glob, torch.distributed.checkpoint as dcp
from megatron_let.compat.cpu import enable_cpu_megatron
enable_cpu_megatron()
from megatron.core import dist_checkpointing
(directory,) = glob.glob('{export}/iter_*')
common = dist_checkpointing.load_common_state_dict(directory)
keys = list(dcp.FileSystemReader(directory).read_metadata().state_dict_metadata)
assert 'let' not in common and not [k for k in keys if 'let_alignment' in k or 'optimizer' in k], (common, keys)
assert any('decoder.layers' in k for k in keys), keys
print('ok')
"""], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT))
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]


def test_export_over_the_checkpoint_it_reads_is_refused_first(tiny_teacher, initial_checkpoint):
    """let.export_dir = checkpoint.load: one line naming both settings, before pretrain() (the same preflight as
    the other loops, which reads Bridge's own tracker file), and the checkpoint is untouched."""
    before = sorted(os.listdir(initial_checkpoint))
    args = ["--recipe", RECIPE, *CPU_OVERRIDES, *let_overrides(tiny_teacher), f"checkpoint.load={initial_checkpoint}",
            f"let.export_dir={initial_checkpoint}", "train.train_iters=4"]
    proc = launch(args, script=os.path.relpath(SCRIPT, ROOT))
    last = proc.stderr.strip().splitlines()[-1]  # (Bridge's own import logs its optional-TE lookups before)
    assert proc.returncode == 2 and last.startswith("pretrain_bridge_let.py: error: let.export_dir "), proc.stderr[-3000:]
    assert f"{initial_checkpoint} is the checkpoint.load directory" in last
    assert "the export would overwrite the checkpoint it reads" in last
    assert not parse_log(proc.stdout)  # no iteration ran
    assert sorted(os.listdir(initial_checkpoint)) == before
