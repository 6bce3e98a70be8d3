"""LET on megatron-core's HybridModel (issue 28), on CPU: real megatron-core models, no mocks.

- A GPTModel with LET after block k and the HybridModel '*-*-' that megatron's own GPT->Hybrid path
  (``megatron.core.dist_checkpointing.gpt_checkpoint_interop``, the load-time translation Megatron-LM's
  ``load_checkpoint`` uses) builds from the GPT's torch_dist checkpoint, with LET at hybrid layer 2k, give
  the same LM loss, LET loss and grad norm (< 1e-5 relative) over 3 iterations of megatron-core's schedule
  and optimizer (in this process, both models side by side).
- pretrain_hybrid_let.py (Megatron-LM's pretrain() with the wheel's megatron.training) loads a
  pretrain_gpt_let.py checkpoint through that translation (``--load --finetune``) and logs, with LET at
  hybrid layer 6, what the GPT run logs with LET at block 3; every layout of the hybrid target (TP2, TP2 + SP,
  DP2, PP2 with layer 6 on either stage, PP2 with the owner placement, PP2 with 2 virtual stages per rank)
  logs what one process logs (lm loss, let loss, let lambda to 1e-5).
- '*E*E*E*E' (MoE) with EP2 logs what it logs on one process; a hybrid run saved and resumed logs what a
  straight run logs, across the stop step (lambda 0 from there on); --let-export-dir works on hybrid.
- Layer k counts pattern symbols; M/G/D layers are refused without TransformerEngine in one line.

HybridModel exists from megatron-core 0.19 (Python 3.12): on the 3.11 / megatron-core 0.16 stack these tests
are skipped.
"""

import importlib.util

import pytest

from let_testing import (HYBRID_SCRIPT, MEGATRON_LM_BODY, MEGATRON_LM_MOE, SCRIPT as GPT_SCRIPT, launch,
                         megatron_lm_source, one_line_error, parse_log, tiny_transformer_config, torchrun)


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
    from megatron_let.loss.alignment import describe_target_layer

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

    from megatron_let.driver import LETDriver
    from megatron_let.training.components import build_optimizer, wrap_ddp
    from megatron_let.training.step import train_step

    let.attach(chunk)
    model = wrap_ddp([chunk])
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                       params_dtype=chunk.config.params_dtype))
    out = []
    driver = LETDriver(let, MBS, SEQ, lambda line: None)
    for iteration in range(ITERS):
        data = iter(batches[iteration * MICROBATCHES:(iteration + 1) * MICROBATCHES])
        metrics = train_step(data, model, optimizer, driver, iteration, MICROBATCHES, SEQ, MBS)
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
LM_ITERS = 4
MODEL_ARGS = MEGATRON_LM_BODY  # test_megatron_lm.py's model without --num-layers: the pattern sets the depth
HYBRID_PATTERN, TARGET = "*-*-*-*-", 6  # 4 GPT blocks; LET after block 3
LET_SCALARS = ("lm loss", "let loss", "let lambda")
PP2 = ["--pipeline-model-parallel-size", 2]
LAYOUTS = {  # name: (processes, pattern, flags, the pipeline segment holding layer 6 as Megatron-LM logs it)
    "tp2": (2, HYBRID_PATTERN, ["--tensor-model-parallel-size", 2], None),
    "tp2_sp": (2, HYBRID_PATTERN, ["--tensor-model-parallel-size", 2, "--sequence-parallel"], None),
    "dp2": (2, HYBRID_PATTERN, [], None),
    "pp2": (2, "*-*-|*-*-", PP2, "pp_rank=1/2, vp_stage=0, segment_index=1/2, layers='*-*-'"),
    "pp2_k_first": (2, "*-*-*-|*-", PP2,  # uneven segments
                    "pp_rank=0/2, vp_stage=0, segment_index=0/2, layers='*-*-*-'"),
    "pp2_owner": (2, "*-*-|*-*-", [*PP2, "--let-teacher-placement", "owner"],  # the teacher on stage 1 only
                  "pp_rank=1/2, vp_stage=0, segment_index=1/2, layers='*-*-'"),
    # 4 segments on 2 ranks: Megatron-LM derives 2 virtual stages per rank (and refuses
    # --num-virtual-stages-per-pipeline-rank / --num-layers-per-virtual-pipeline-stage with a pattern)
    "pp2_vpp2": (2, "*-|*-|*-|*-", PP2, "pp_rank=0/2, vp_stage=1, segment_index=2/4, layers='*-' (2 layers), "
                                        "layer_offset=4"),
}


def _log(script, nproc, args):
    proc = torchrun(script, nproc, [*MODEL_ARGS, *args], timeout=600, megatron_lm=True)
    logged = parse_log(proc.stdout)
    assert logged and "lm loss" in logged[min(logged)], proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, logged


def _values(logged, key, first=1, last=LM_ITERS):
    """Per-iteration values of ``key`` for iterations first..last of one run (0 where Megatron-LM leaves a zero
    average out of the line): its first logged interval is not reset (test_megatron_lm.per_iteration)."""
    values = [logged[i].get(key, 0.0) for i in range(first, last + 1)]
    values[1] = 2 * values[1] - values[0]
    return values


def _assert_logs_equal(got, reference, what, keys=LET_SCALARS):
    for key in keys:
        assert key in reference[1], f"{key} not logged"
        assert _values(got, key) == pytest.approx(_values(reference, key), rel=1e-5), f"{what}: {key}"


@pytest.fixture(scope="module")
def megatron_lm_runs(tiny_teacher, tmp_path_factory):
    """A pretrain_gpt_let.py checkpoint (4 GPT blocks, one step), the GPT and the one-process hybrid run from it
    (the reference of every layout), and the flags that start a hybrid run from it."""
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
    hybrid_args = [*let_args, "--let-target-layer", TARGET, *start]
    proc, hybrid = _log(HYBRID_SCRIPT, 1, ["--hybrid-layer-pattern", HYBRID_PATTERN, *hybrid_args])
    assert "LET target: hybrid layer 6 of '*-*-*-*-' ('-'), the output of GPT block 3" in proc.stdout
    assert all(v > 0 for v in _values(hybrid, "let loss"))
    return dict(gpt=gpt, hybrid=hybrid, hybrid_args=hybrid_args, let_args=let_args, gpt_checkpoint=ckpt)


def test_pretrain_hybrid_let_equals_pretrain_gpt_let(megatron_lm_runs):
    gpt, hybrid = megatron_lm_runs["gpt"], megatron_lm_runs["hybrid"]
    _assert_logs_equal(hybrid, gpt, "hybrid vs GPT")  # printed to 7 significant digits
    # grad norm is printed to 3 decimals (the in-process test compares it to 1e-5)
    assert [hybrid[i]["grad norm"] for i in range(1, LM_ITERS + 1)] == \
        pytest.approx([gpt[i]["grad norm"] for i in range(1, LM_ITERS + 1)], abs=1.5e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hybrid_layouts_equal_one_process(layout, megatron_lm_runs):
    nproc, pattern, parallel, segment_of_k = LAYOUTS[layout]
    proc, logged = _log(HYBRID_SCRIPT, nproc, ["--hybrid-layer-pattern", pattern, *megatron_lm_runs["hybrid_args"],
                                               *parallel])
    placement = "owner" if "owner" in parallel else "spread"
    assert f"LET teacher placement {placement}" in proc.stdout, proc.stdout[-3000:]
    if segment_of_k:  # the layout is what it claims: layer 6 on that stage / virtual stage
        assert f"HybridModel: {segment_of_k}" in proc.stdout, proc.stdout[-3000:]
    _assert_logs_equal(logged, megatron_lm_runs["hybrid"], layout)


# ------------------------------------------------------------------ 'E' (MoE) layers with expert parallelism
def test_moe_pattern_expert_parallel_equals_one_process(megatron_lm_runs, tmp_path):
    """'*E*E*E*E' (4 experts, top 2, load-balancing loss), LET at layer 6 (an 'E'): EP2 logs what one process
    logs from the same initial weights (a one-step run of its own: a GPT checkpoint has no experts)."""
    moe = ["--hybrid-layer-pattern", "*E*E*E*E", *MEGATRON_LM_MOE, *megatron_lm_runs["let_args"], "--let-target-layer", TARGET]
    ckpt = tmp_path / "moe_init"
    _log(HYBRID_SCRIPT, 1, [*moe, "--train-iters", 1, "--save", ckpt, "--save-interval", 1])
    start = ["--load", ckpt, "--finetune", "--no-load-optim", "--train-iters", LM_ITERS]
    proc, reference = _log(HYBRID_SCRIPT, 1, [*moe, *start])
    assert "LET target: hybrid layer 6 of '*E*E*E*E' ('E'), the output of GPT block 3" in proc.stdout
    _, ep2 = _log(HYBRID_SCRIPT, 2, [*moe, *start, "--expert-model-parallel-size", 2])
    _assert_logs_equal(ep2, reference, "EP2", keys=(*LET_SCALARS, "load_balancing_loss"))


# ------------------------------------------------------------------ resume, stop step, export
def test_resume_stop_and_export_on_hybrid(megatron_lm_runs, tmp_path):
    """--let-stop-iter 2: lambda 0.5, 0.25, then 0. Saved after iteration 1 and resumed to 4 (across the stop),
    the run logs what the straight run logs; --let-export-dir writes the model without the projector, which a
    plain pretrain_hybrid_let.py run loads."""
    args = ["--hybrid-layer-pattern", HYBRID_PATTERN, *megatron_lm_runs["let_args"], "--let-target-layer", TARGET,
            "--let-stop-iter", 2, "--train-iters", LM_ITERS]  # the later --let-stop-iter wins
    from_gpt = ["--load", megatron_lm_runs["gpt_checkpoint"], "--finetune", "--no-load-optim"]
    proc, straight = _log(HYBRID_SCRIPT, 1, [*args, *from_gpt])
    assert "LET stops at iteration 2 = sample 16 (--let-stop-iter 2)" in proc.stdout, proc.stdout[-3000:]
    assert _values(straight, "let lambda") == pytest.approx([0.5, 0.25, 0.0, 0.0], abs=1e-7)
    assert [straight[i].get("let loss", 0.0) for i in (3, 4)] == [0.0, 0.0] and straight[1]["let loss"] > 0

    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    _, first = _log(HYBRID_SCRIPT, 1, [*args, *from_gpt, "--save", ckpt, "--save-interval", 1, "--exit-interval", 1])
    _, resumed = _log(HYBRID_SCRIPT, 1, [*args, "--load", ckpt, "--save", ckpt, "--save-interval", 100])
    assert sorted(first) == [1] and sorted(resumed) == [2, 3, 4], (sorted(first), sorted(resumed))
    assert resumed[2]["let loss"] > 0  # resumed before the stop step: the teacher runs again
    for key in LET_SCALARS:
        assert _values(resumed, key, first=2) == pytest.approx(_values(straight, key)[1:], rel=1e-5, abs=1e-7), key

    proc = torchrun(HYBRID_SCRIPT, 1, [*MODEL_ARGS, *args, "--load", ckpt, "--no-load-rng", "--let-export-dir", export],
                    megatron_lm=True)
    assert f"without LET state to {export}" in proc.stdout and "consumed samples" not in proc.stdout  # no training
    assert b"let_alignment" in (ckpt / "iter_0000004" / ".metadata").read_bytes()  # the projector was saved
    keys = (export / "iter_0000004" / ".metadata").read_bytes()
    assert b"decoder.layers." in keys and b"let_alignment" not in keys
    plain, logged = _log(HYBRID_SCRIPT, 1, ["--hybrid-layer-pattern", HYBRID_PATTERN, "--load", export,
                                            "--train-iters", LM_ITERS + 1, "--no-load-optim", "--no-load-rng"])
    assert "loaded checkpoint" in plain.stdout and sorted(logged) == [LM_ITERS + 1] and "let loss" not in logged[5]


def test_mamba_pattern_refused_before_any_process_group(tiny_teacher):
    """One line, exit 2, with MASTER_PORT held (a process group could not be created: test_refusals.py)."""
    if megatron_lm_source() is None:
        pytest.skip("needs Megatron-LM's megatron.training (the megatron-core 0.19 wheel, or MEGATRON_LM_PATH)")
    proc = launch([*MODEL_ARGS, "--hybrid-layer-pattern", "M*-M*-", "--train-iters", "1", "--let-teacher", tiny_teacher,
                   "--let-target-layer", "3"], script="pretrain_hybrid_let.py", hold_port=True, timeout=180)
    line = one_line_error(proc, "--hybrid-layer-pattern 'M*-M*-': 'M' (Mamba-2) layers need TransformerEngine")
    assert line.startswith("pretrain_hybrid_let.py: error: ")
