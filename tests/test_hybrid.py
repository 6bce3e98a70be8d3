"""LET on megatron-core's HybridModel (issue 28), on CPU: real megatron-core models, no mocks.

- A GPTModel with LET after block k and the HybridModel '*-*-' that megatron's own GPT->Hybrid path
  (``megatron.core.dist_checkpointing.gpt_checkpoint_interop``, the load-time translation Megatron-LM's
  ``load_checkpoint`` uses) builds from the GPT's torch_dist checkpoint, with LET at hybrid layer 2k, give
  the same LM loss, LET loss and grad norm (< 1e-5 relative) over 3 iterations of megatron-core's schedule
  and optimizer (in this process, both models side by side).
- pretrain_hybrid_let.py (Megatron-LM's pretrain() with the wheel's megatron.training) loads a
  pretrain_gpt_let.py checkpoint through that translation (``--load --finetune``) and logs, with LET at
  hybrid layer 6, what the GPT run logs with LET at block 3; TP2 and PP2 (pattern '*-*-|*-*-') of the
  hybrid target log what one process logs.
- Layer k counts pattern symbols; M/G/D layers are refused without TransformerEngine in one line.

HybridModel exists from megatron-core 0.19 (Python 3.12): on the 3.11 / megatron-core 0.16 stack these tests
are skipped.
"""

import importlib.util
import os

import pytest

from conftest import ROOT, megatron_lm_source, tiny_transformer_config, torchrun


def _has_hybrid_model() -> bool:
    try:
        return importlib.util.find_spec("megatron.core.models.hybrid") is not None
    except (ImportError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not _has_hybrid_model(),
    reason="HybridModel needs megatron-core >= 0.19 (megatron.core.models.hybrid), which needs Python 3.12; "
           "this stack has an older megatron-core (0.16.1 on Python 3.11): run tests/test_hybrid.py on the "
           "3.12 stack (.ci/stack2-tests).")

VOCAB, SEQ, MBS, MICROBATCHES, ITERS = 128, 32, 2, 2, 3
GPT_BLOCKS = 2
PATTERN = "*-" * GPT_BLOCKS


# ------------------------------------------------------------------ layer k on a pattern
def test_target_layer_counts_pattern_symbols():
    from megatron_let.alignment import describe_target_layer

    assert describe_target_layer(6, "*-*-|*-*-") == "hybrid layer 6 of '*-*-|*-*-' ('-'), the output of GPT block 3"
    assert "between GPT block 2's attention and its MLP" in describe_target_layer(3, "*-*-*-*-")
    assert describe_target_layer(2, "M*M-") == "hybrid layer 2 of 'M*M-' ('*')"
    assert describe_target_layer(3) == "layer 3"


@pytest.mark.parametrize("pattern, symbol", [("M*-M*-", "'M' (Mamba-2)"), ("*-G-", "'G' (gated delta net)"),
                                             ("D-D-", "'D' (DeepSeek sparse attention)")])
def test_gpu_only_symbols_refused_in_one_line(pattern, symbol):
    from megatron_let.errors import LETConfigError
    from megatron_let.integrations.hybrid import check_local_pattern

    with pytest.raises(LETConfigError) as error:
        check_local_pattern(pattern, "--transformer-impl local")
    message = str(error.value)
    assert "\n" not in message and f"--hybrid-layer-pattern '{pattern}'" in message and symbol in message


# ------------------------------------------------------------------ GPTModel == '*-' HybridModel, in process
def _batches(seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(ITERS * MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=generator)
        batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                        "loss_mask": torch.ones(MBS, SEQ), "attention_mask": None,
                        "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous()})
    return batches


def _train(chunk, let, batches):
    """ITERS iterations of megatron-core's schedule + optimizer (the lean trainer's step): per iteration
    (lm loss, let loss, grad norm)."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_let.training.components import build_optimizer, wrap_ddp
    from megatron_let.training.step import train_step

    let.attach(chunk)
    model = wrap_ddp([chunk])
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                       params_dtype=chunk.config.params_dtype))
    out = []
    for iteration in range(ITERS):
        data = iter(batches[iteration * MICROBATCHES:(iteration + 1) * MICROBATCHES])
        metrics = train_step(data, model, optimizer, let, iteration, MICROBATCHES, SEQ, MBS)
        out.append((metrics["lm loss"], let.report()["let loss"], float(metrics["grad norm"])))
    return out


def test_gpt_equals_star_dash_hybrid(megatron_world1, tiny_teacher, tmp_path):
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_let import LateToEarlyTraining, LETConfig
    from megatron_let.integrations.hybrid import local_hybrid_stack_spec

    common = dict(vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False)
    torch.manual_seed(0)
    gpt = GPTModel(tiny_transformer_config(GPT_BLOCKS), get_gpt_layer_local_spec(normalization="RMSNorm"), **common)
    hybrid = HybridModel(tiny_transformer_config(2 * GPT_BLOCKS), local_hybrid_stack_spec(normalization="RMSNorm"),
                         hybrid_layer_pattern=PATTERN, **common)
    # megatron's GPT -> Hybrid path: the hybrid's sharded state dict retargeted at the GPT checkpoint
    checkpoint = tmp_path / "gpt"
    checkpoint.mkdir()
    dist_checkpointing.save(gpt.sharded_state_dict(), str(checkpoint))
    sharded = hybrid.sharded_state_dict()
    retarget_sharded_state_dict_to_gpt_checkpoint(sharded, gpt_compatible_layer_maps(PATTERN))
    hybrid.load_state_dict(dist_checkpointing.load(sharded, str(checkpoint)))
    gpt_weights = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    assert sum(v.numel() for v in gpt_weights.values()) == \
        sum(v.numel() for k, v in hybrid.state_dict().items() if not k.endswith("_extra_state"))
    assert torch.equal(hybrid.decoder.layers[3].mlp.linear_fc2.weight, gpt.decoder.layers[1].mlp.linear_fc2.weight)

    def let(target_layer):
        return LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=target_layer, lambda0=0.5,
                                             stop_iter=100, projector="linear"), seed=1234)

    batches = _batches(seed=7)
    gpt_run = _train(gpt, let(1), batches)  # after GPT block 1 ...
    hybrid_run = _train(hybrid, let(2), batches)  # ... is hybrid layer 2
    print("gpt   ", gpt_run)
    print("hybrid", hybrid_run)
    for (lm_g, let_g, norm_g), (lm_h, let_h, norm_h) in zip(gpt_run, hybrid_run):
        assert lm_h == pytest.approx(lm_g, rel=1e-5, abs=0)
        assert let_h == pytest.approx(let_g, rel=1e-5, abs=0) and let_g > 0
        assert norm_h == pytest.approx(norm_g, rel=1e-5, abs=0)
    # the projectors trained identically: same gradients reached layer k's output in both models
    assert torch.allclose(hybrid.let_alignment.projector.weight, gpt.let_alignment.projector.weight,
                          rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ Megatron-LM's pretrain(): pretrain_hybrid_let.py
GPT_SCRIPT, HYBRID_SCRIPT = os.path.join(ROOT, "pretrain_gpt_let.py"), os.path.join(ROOT, "pretrain_hybrid_let.py")
LM_ITERS = 4
MODEL_ARGS = [
    "--hidden-size", 64, "--num-attention-heads", 4, "--ffn-hidden-size", 128,
    "--seq-length", 32, "--max-position-embeddings", 32, "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", 127, "--make-vocab-size-divisible-by", 64,
    "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", 1e-3, "--lr-decay-style", "constant",
    "--eval-iters", 0, "--eval-interval", 1000, "--log-interval", 1,
    "--transformer-impl", "local", "--distributed-backend", "gloo", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
]
HYBRID_PATTERN = "*-*-*-*-"


def _log(script, nproc, args):
    from test_megatron_lm import parse_log

    proc = torchrun(script, nproc, [*MODEL_ARGS, *args], timeout=600, megatron_lm=True)
    logged = parse_log(proc.stdout)
    assert "lm loss" in logged.get(1, {}), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, logged


def _values(logged, key):
    values = [logged[i][key] for i in range(1, LM_ITERS + 1)]
    values[1] = 2 * values[1] - values[0]  # Megatron-LM's first logged interval is not reset (test_megatron_lm)
    return values


@pytest.fixture(scope="module")
def megatron_lm_runs(tiny_teacher, tmp_path_factory):
    """A pretrain_gpt_let.py checkpoint (4 GPT blocks, one step), and the GPT and hybrid runs from it."""
    if megatron_lm_source() is None:
        pytest.skip("needs Megatron-LM's megatron.training (the megatron-core 0.19 wheel, or MEGATRON_LM_PATH)")
    let_args = ["--let-teacher", tiny_teacher, "--let-lambda", 0.5, "--let-stop-iter", 100,
                "--let-projector", "linear"]
    ckpt = tmp_path_factory.mktemp("hybrid_lm") / "gpt"
    _log(GPT_SCRIPT, 1, ["--num-layers", 4, *let_args, "--let-target-layer", 3, "--train-iters", 1,
                         "--save", ckpt, "--save-interval", 1])
    # --no-load-optim: with --finetune, megatron's GPT->Hybrid load still reads the optimizer state, GPT's does not
    start = ["--load", ckpt, "--finetune", "--no-load-optim", "--train-iters", LM_ITERS]
    _, gpt = _log(GPT_SCRIPT, 1, ["--num-layers", 4, *let_args, "--let-target-layer", 3, *start])
    hybrid_args = [*let_args, "--let-target-layer", 6, *start]
    proc, hybrid = _log(HYBRID_SCRIPT, 1, ["--hybrid-layer-pattern", HYBRID_PATTERN, *hybrid_args])
    assert "LET target: hybrid layer 6 of '*-*-*-*-' ('-'), the output of GPT block 3" in proc.stdout
    return gpt, hybrid, hybrid_args


def test_pretrain_hybrid_let_equals_pretrain_gpt_let(megatron_lm_runs):
    gpt, hybrid, _ = megatron_lm_runs
    for key in ("lm loss", "let loss", "let lambda"):  # printed to 7 significant digits
        assert _values(hybrid, key) == pytest.approx(_values(gpt, key), rel=1e-5), key
    # grad norm is printed to 3 decimals (the in-process test compares it to 1e-5)
    assert [hybrid[i]["grad norm"] for i in range(1, LM_ITERS + 1)] == \
        pytest.approx([gpt[i]["grad norm"] for i in range(1, LM_ITERS + 1)], abs=1.5e-3)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_hybrid_layouts_equal_one_process(layout, megatron_lm_runs):
    _, reference, hybrid_args = megatron_lm_runs
    pattern, parallel = {"tp2": (HYBRID_PATTERN, ["--tensor-model-parallel-size", 2]),
                         "pp2": ("*-*-|*-*-", ["--pipeline-model-parallel-size", 2])}[layout]
    _, logged = _log(HYBRID_SCRIPT, 2, ["--hybrid-layer-pattern", pattern, *hybrid_args, *parallel])
    for key in ("lm loss", "let loss", "let lambda"):
        assert _values(logged, key) == pytest.approx(_values(reference, key), rel=1e-5), f"{layout}: {key}"


def test_mamba_pattern_refused_before_any_process_group(tiny_teacher):
    """One line, exit 2, with MASTER_PORT held (a process group could not be created: test_refusals.py)."""
    import socket
    import subprocess
    import sys

    from test_reliability import assert_one_line_error

    if megatron_lm_source() is None:
        pytest.skip("needs Megatron-LM's megatron.training (the megatron-core 0.19 wheel, or MEGATRON_LM_PATH)")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held.getsockname()[1]),
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, HYBRID_SCRIPT, *map(str, MODEL_ARGS), "--hybrid-layer-pattern", "M*-M*-",
                               "--train-iters", "1", "--let-teacher", tiny_teacher, "--let-target-layer", "3"],
                              capture_output=True, text=True, cwd=ROOT, timeout=180, env=env)
    line = assert_one_line_error(proc, "--hybrid-layer-pattern 'M*-M*-': 'M' (Mamba-2) layers need TransformerEngine")
    assert line.startswith("pretrain_hybrid_let.py: error: ")
