"""What the tests share: launchers, the log parser, flag sets, tiny models, assertions and skip reasons.

A plain module (``from let_testing import ...``: tests/ is on sys.path as conftest.py's directory, and
tests/workers/layout_worker.py adds it). Fixtures live in conftest.py, which pytest reads; everything else a
second test module needs lives here, so no test module imports another.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))  # the quickstart's experiment tools (examples/experiments)

from experiments.runs import CPU_FLAGS  # noqa: E402,F401 (Megatron-LM's loop on a CPU; shared with the tools)
WORKERS = os.path.join(ROOT, "tests", "workers")
SCRIPT = os.path.join(ROOT, "pretrain_gpt_let.py")
HYBRID_SCRIPT = os.path.join(ROOT, "pretrain_hybrid_let.py")


# ------------------------------------------------------------------ skip reasons
# They say what to do, and name what this stack lacks (docs/testing.md lists them all). Megatron-LM is not on PyPI.
def _installed_core() -> str:
    from importlib.metadata import version

    return version("megatron-core")


CLONE_MEGATRON_LM = (f"git clone --branch core_v{_installed_core()} https://github.com/NVIDIA/Megatron-LM DIR && "
                     "export MEGATRON_LM_PATH=DIR (pip install six)")
NEEDS_MEGATRON_LM = (f"needs megatron.training, which the installed megatron-core {_installed_core()} wheel "
                     "lacks: Python 3.12 with megatron-core 0.19 (its wheel ships it; .ci/run's second stack), or a "
                     f"Megatron-LM checkout of this version: {CLONE_MEGATRON_LM}")
NEEDS_MEGATRON_LM_CHECKOUT = (f"needs a Megatron-LM checkout (its own pretrain_gpt.py and examples; the megatron-core "
                              f"{_installed_core()} wheel has at most megatron.training): {CLONE_MEGATRON_LM}")
NEEDS_MEGATRON_LM_GIT_DIR = ("needs Megatron-LM's git history with tags: git clone --bare "
                             "https://github.com/NVIDIA/Megatron-LM DIR.git && export MEGATRON_LM_GIT_DIR=DIR.git "
                             "(or $MEGATRON_LM_PATH/.git after git fetch --tags)")
NEEDS_LEAN_TRAINER = ("the lean trainer runs only where megatron.training is absent (Python 3.11, megatron-core 0.16.1: "
                      ".ci/run's first stack); this megatron-core wheel ships megatron.training, whose loop "
                      "tests/test_megatron_lm*.py run")


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


def lean_trainer_selectable() -> bool:
    """pretrain_gpt_let.py takes the lean trainer only where megatron.training is absent without a checkout: the
    megatron-core 0.16 wheel (0.17+ wheels ship megatron.training, so Megatron-LM's loop runs there)."""
    from importlib.metadata import version

    from megatron_let.megatron_versions import parse

    return parse(version("megatron-core")) < (0, 17)


# ------------------------------------------------------------------ flag sets of the tiny models
# pretrain_gpt_let.py on the lean trainer (vocabulary 128: the mock data's null tokenizer has 129 ids with EOD)
LEAN_MODEL = ["--num-layers", 4, "--hidden-size", 64, "--num-attention-heads", 4, "--seq-length", 32,
              "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", "1e-3", "--mock-data", "--vocab-size", 128,
              "--log-interval", 1, "--eval-interval", 100, "--eval-iters", 0, "--position-embedding-type", "rope",
              "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--attention-dropout", 0]
# a smaller one for the refusals and faults (tests/test_reliability.py, tests/test_refusals.py): 4 iterations
SMALL_MODEL = ["--num-layers", 4, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
               "--micro-batch-size", 2, "--train-iters", 4, "--lr", "1e-3", "--mock-data", "--vocab-size", 128,
               "--log-interval", 1, "--eval-iters", 0, "--eval-interval", 100]
# 2-process layouts of the lean trainer that a TP1 checkpoint is resumed into (flags added to the TP1 run's)
LEAN_LAYOUTS = {"tp2_sp": ["--tensor-model-parallel-size", 2, "--sequence-parallel"],
                "pp2": ["--pipeline-model-parallel-size", 2],
                "pp2_vpp": ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1],
                "dp2": []}

# Megatron-LM's own loop (pretrain_gpt_let.py / pretrain_hybrid_let.py): no --num-layers (a hybrid pattern sets
# the depth); padded vocabulary 128 for TP 1 and 2 alike (the default 128 * TP would change the shapes)
MEGATRON_LM_BODY = [
    "--hidden-size", 64, "--num-attention-heads", 4, "--ffn-hidden-size", 128,
    "--seq-length", 32, "--max-position-embeddings", 32, "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", 127, "--make-vocab-size-divisible-by", 64,
    "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", 1e-3, "--lr-decay-style", "constant",
    "--eval-iters", 0, "--eval-interval", 1000, "--log-interval", 1,
    *CPU_FLAGS,
]
MEGATRON_LM_MODEL = ["--num-layers", 4, *MEGATRON_LM_BODY]  # a 4-layer GPT
MEGATRON_LM_MOE = ["--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", 0.01,
                   "--moe-token-dispatcher-type", "allgather"]
MEGATRON_LM_ITERS = 4  # iterations of the layout runs (tests/test_megatron_lm.py)
# LET in those runs (conftest.let_args): layer 3, lambda 0.5 decaying to 0 at iteration 100
MEGATRON_LM_TARGET_LAYER, MEGATRON_LM_LAMBDA0, MEGATRON_LM_STOP_ITER = 3, 0.5, 100


def lean_let_flags(teacher, **overrides):
    """LET at layer 3 of LEAN_MODEL: lambda 0.5 decaying to 0 at iteration 4, a learned projector."""
    flags = {"--let-teacher": teacher, "--let-target-layer": 3, "--let-lambda": 0.5, "--let-stop-iter": 4,
             "--let-projector": "linear"}
    flags.update(overrides)
    return [x for kv in flags.items() for x in kv]


def small_let_flags(teacher, layer=1, *extra):
    """LET flags for SMALL_MODEL: ``teacher`` aligned at ``layer``, the rest as given (or the defaults)."""
    return ["--let-teacher", teacher, "--let-target-layer", layer, *extra]


def tiny_transformer_config(num_layers: int = 2, **overrides):
    """A small fp32 LLaMA-style TransformerConfig with the CPU-friendly switches (also the layout worker's)."""
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


# ------------------------------------------------------------------ tiny teachers and tokenizers
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


def nan_teacher(path, like):
    """``like`` with a NaN final norm: every hidden state it returns is non-finite."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(like)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(path)
    return path


def bpe_tokenizer(texts, vocab_size: int, seed_text: str):
    """A byte-level BPE trained here, wrapped as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([seed_text, *texts], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "a stitch in time saves nine; " * 3,
         "to be or not to be, that is the question " * 3]
# the token-alignment corpus: multi-byte characters, so tokenizers split them differently
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3, "a stitch in time saves nine; naïve café " * 3,
          "to be or not to be, that is the question\n\n" * 3, "東京 and 🙂 emoji, Ω ß déjà vu " * 2]


def make_mismatched(root):
    """Target: a 300-token BPE in ROOT/target; teacher: a tiny Llama with its own 400-token BPE (in its
    directory ROOT/teacher). Returns (target dir, teacher dir, target tokenizer)."""
    target = bpe_tokenizer(CORPUS, 300, "target tokenizer")
    target.save_pretrained(root / "target")
    teacher_tok = bpe_tokenizer(CORPUS[::-1] + ["zeta eta theta iota kappa"], 400, "teacher tokenizer")
    teacher = make_tiny_llama(str(root / "teacher"), vocab_size=len(teacher_tok))
    teacher_tok.save_pretrained(teacher)
    return str(root / "target"), teacher, target


# a tiny megatron-core GPTModel saved as a Megatron checkpoint (a teacher to convert or score)
MEGATRON_GPT_SEQ, MEGATRON_GPT_VOCAB = 24, 128


def _megatron_gpt_styles() -> dict:
    """name -> (TransformerConfig overrides, GPTModel kwargs, how args are stored in common state)."""
    import torch

    return {
        # LLaMA style: RMSNorm, SwiGLU, RoPE (non-default base), GQA 4 heads / 2 groups, untied; args saved as a
        # Namespace the way Megatron-LM does.
        "llama-gqa-untied": (dict(num_query_groups=2, layernorm_epsilon=1e-6),
                             dict(position_embedding_type="rope", rotary_base=5000,
                                  share_embeddings_and_output_weights=False), "namespace"),
        # LLaMA style with tied embeddings, kv_channels != hidden/heads, biases; no args saved (flags instead).
        "llama-tied-bias-kv": (dict(num_attention_heads=4, num_query_groups=1, kv_channels=24, add_bias_linear=True),
                               dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
                               None),
        # GPT style: LayerNorm, GeLU, biases, learned absolute positions, MHA, tied; args saved as a dict.
        "gpt2": (dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
                      add_bias_linear=True, num_query_groups=None),
                 dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True), "dict"),
    }


MEGATRON_GPT_STYLES = _megatron_gpt_styles()


def saved_megatron_args(config, gpt_kwargs) -> dict:
    """The architecture part of Megatron-LM's args (what the trainer should save as common['args'])."""
    return dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        swiglu=config.gated_linear_unit, add_bias_linear=config.add_bias_linear,
        position_embedding_type=gpt_kwargs["position_embedding_type"],
        rotary_base=gpt_kwargs.get("rotary_base", 10000), rotary_percent=1.0, max_position_embeddings=MEGATRON_GPT_SEQ,
        untie_embeddings_and_output_weights=not gpt_kwargs["share_embeddings_and_output_weights"],
        padded_vocab_size=MEGATRON_GPT_VOCAB, vocab_size=None)


def save_megatron_gpt(root, style):
    """A random GPTModel of ``style`` saved at iteration 7 in the trainer's layout; returns (model, config)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_let.training.checkpoint import save_checkpoint

    config_overrides, gpt_kwargs, args_kind = MEGATRON_GPT_STYLES[style]
    torch.manual_seed(0)
    config = tiny_transformer_config(**config_overrides)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=config.normalization),
                     vocab_size=MEGATRON_GPT_VOCAB, max_sequence_length=MEGATRON_GPT_SEQ, **gpt_kwargs).eval()
    with torch.no_grad():  # random everything, norms and biases included, so a mis-mapping cannot hide
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    common = {"iteration": 7}
    if args_kind:
        args = saved_megatron_args(config, gpt_kwargs)
        common["args"] = argparse.Namespace(**args) if args_kind == "namespace" else args
    save_checkpoint(str(root), 7, [model], None, common)
    return model, config


# ------------------------------------------------------------------ one process through megatron-core's schedule
# (tests/test_auto_lambda.py, tests/test_auto_stop.py): micro-batches of MBS x SEQ tokens, M per iteration
VOCAB, SEQ, MBS, M, LOSS_SCALE = 128, 16, 2, 2, 4.0


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


def microbatches(iteration):
    """The M micro-batches of ``iteration`` (the same in every test that replays it)."""
    return padded_microbatches(M, 100 + iteration, VOCAB, SEQ, MBS)


def alignment_grad(let, model, hidden, batch):
    """d/dh of mean over the micro-batch's tokens of (1 - cos(P(h), teacher)), written out."""
    import torch
    import torch.nn.functional as F

    h = hidden.float().requires_grad_()
    teacher = let.teacher.hidden_states(batch["tokens"]).float()
    projector = model.let_alignment.projector
    if projector.projects_teacher:
        student, teacher = h, projector(teacher)
    else:
        student = projector(h)
    cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    mask = batch["loss_mask"].transpose(0, 1)
    (grad,) = torch.autograd.grad(((1 - cos) * mask).sum() / mask.sum(), h)
    return grad


# ------------------------------------------------------------------ launchers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch(args, script: str = "pretrain_gpt_let.py", hold_port: bool = False, env_extra: dict = None,
           timeout: int = 300, lean: bool = False, drop_path: bool = False,
           preexec=None) -> subprocess.CompletedProcess:
    """``script`` as one plain process with torchrun's environment (no torchrun wrapper adding its own traceback),
    on whichever trainer this stack selects (Megatron-LM's loop where megatron.training imports, else the lean
    trainer). ``lean``: the lean trainer's own case, skipped where it cannot be selected; the run never sees
    MEGATRON_LM_PATH (nor with ``drop_path``). ``hold_port``: MASTER_PORT is held by a listening socket, so a run
    that created a process group (rank 0's store binds that port) cannot end with a clean one-line refusal: the
    refusal came before any process group. ``preexec``: run in the child before the script (resource limits)."""
    if lean and not lean_trainer_selectable():
        pytest.skip(NEEDS_LEAN_TRAINER)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    if lean or drop_path:
        env.pop("MEGATRON_LM_PATH", None)
    env.update(env_extra or {})
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]

    def run(port):
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env=dict(env, MASTER_PORT=str(port)), preexec_fn=preexec)

    if not hold_port:
        return run(free_port())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        return run(held.getsockname()[1])


def run_lean(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    """pretrain_gpt_let.py as one process on the lean trainer (skipped where it cannot be selected)."""
    return launch(args, lean=True, timeout=timeout)


# ------------------------------------------------------------------ the log line
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")


def parse_log(text: str) -> dict:
    """{iteration: {name: value}} from the training log lines both trainers print in Megatron-LM's format
    (``iteration N/ M | consumed samples: ... | lm loss: ... |``): every ``name: value`` field whose value is a
    number; a later line for the same iteration replaces an earlier one."""
    records = {}
    for line in text.splitlines():
        match = _ITERATION.search(line)
        if not match or "consumed samples" not in line:
            continue
        fields = {}
        for part in match.group(2).split("|"):
            name, colon, value = part.rpartition(":")
            try:
                if colon:
                    fields[name.strip()] = float(value)
            except ValueError:  # not a number
                pass
        records[int(match.group(1))] = fields
    return records


def per_iteration(logged: dict, key: str, iters: int = MEGATRON_LM_ITERS) -> list:
    """Per-iteration values of ``key`` from Megatron-LM's log: it does not reset its totals after the first
    logged iteration of a run, so with --log-interval 1 the second printed value is the mean of iterations 1
    and 2; every other one is that iteration's own."""
    values = [logged[i][key] for i in range(1, iters + 1)]
    values[1] = 2 * values[1] - values[0]
    return values


# ------------------------------------------------------------------ training runs that tests compare
def train_lean(nproc, *args) -> dict:
    """pretrain_gpt_let.py on the lean trainer with LEAN_MODEL under torchrun: its parsed log."""
    return parse_log(torchrun(SCRIPT, nproc, [*LEAN_MODEL, *args]).stdout)


def run_megatron_lm(nproc: int, args) -> dict:
    """pretrain_gpt_let.py on Megatron-LM's loop under torchrun: its parsed log, after checking that the teacher
    ran where --let-teacher-placement says and that Megatron-LM's log line is there."""
    proc = torchrun(SCRIPT, nproc, args, timeout=600, megatron_lm=True)
    placement = "owner" if "owner" in map(str, args) else "spread"
    assert f"LET teacher placement {placement}" in proc.stdout, proc.stdout[-3000:]
    if placement == "spread":  # the teacher ran before the schedule, evenly over each replica's model-parallel ranks
        rows = re.search(r"teacher sequences per rank of the model-parallel group in the first iteration: "
                         r"\[([0-9, ]+)\]", proc.stdout)
        assert rows, proc.stdout[-3000:]
        counts = [int(c) for c in rows.group(1).split(",")]
        replicas = nproc // len(counts)  # data-parallel replicas (EP ranks are data-parallel for the dense part)
        assert nproc % len(counts) == 0 and sum(counts) * replicas == 8 and max(counts) - min(counts) <= 1, counts
    logged = parse_log(proc.stdout)
    assert logged and "lm loss" in logged[min(logged)], (
        "no Megatron-LM training log line: did pretrain_gpt_let.py dispatch to Megatron-LM's "
        f"pretrain()?\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return logged


# ------------------------------------------------------------------ assertions
REL_TOL = 1e-5  # "the same numbers" across layouts: float32 sums in another order
LAYOUT_KEYS = ("lm loss", "let loss", "let cos", "let lambda", "grad norm")
OWNER = {"owner": ["--placement", "owner"]}  # layout_worker.py: the teacher on layer k's stage only


def assert_same_numbers(reference: dict, other: dict, layout: str):
    """Two layout_worker.py runs: the same iterations, each of LAYOUT_KEYS within REL_TOL."""
    assert len(reference["records"]) == len(other["records"])
    for it, (ref, got) in enumerate(zip(reference["records"], other["records"])):
        for key in LAYOUT_KEYS:
            assert key in ref and key in got, f"{layout}: '{key}' missing at iteration {it}"
            rel = abs(got[key] - ref[key]) / max(abs(ref[key]), 1e-12)
            assert rel < REL_TOL, f"{layout} iteration {it}: {key} {got[key]!r} vs {ref[key]!r} (rel {rel:.2e})"


def assert_same_logs(got: dict, reference: dict) -> None:
    """Per logged iteration: the same fields, lm/let scalars within REL_TOL, grad norm to its 3 printed decimals."""
    assert sorted(got) == sorted(reference)
    for it, ref in reference.items():
        assert set(got[it]) == set(ref)
        for key in ("lm loss", "let loss", "let cos", "let lambda"):
            if key in ref:
                rel = abs(got[it][key] - ref[key]) / max(abs(ref[key]), 1e-12)
                assert rel < REL_TOL, f"iteration {it} {key}: {got[it][key]} vs {ref[key]}"
        assert abs(got[it]["grad norm"] - ref["grad norm"]) <= 1e-3


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


def refused(args, files=(), fragments=(), script: str = "pretrain_gpt_let.py", lean: bool = False,
            not_in_stdout=()) -> str:
    """A launch refused before any process group (the port is held) and before any write: one line holding
    ``fragments``, exit 2, no training, every path in ``files`` byte-identical after. Returns the line.
    ``lean``: as launch's; ``not_in_stdout``: more text the output must not hold (a warning that would mean the
    run got further)."""
    before = tree_hash(*files)
    proc = launch(args, script=script, hold_port=True, lean=lean)
    line = one_line_error(proc, *fragments)
    assert "consumed samples" not in proc.stdout
    for text in not_in_stdout:
        assert text not in proc.stdout, proc.stdout[-3000:]
    assert tree_hash(*files) == before, f"{files} changed on disk"
    return line
