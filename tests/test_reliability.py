"""Every bad input and fault in the README's reliability table: exit code, one-line message naming
the flag (or iteration and rank), and for faults that the last good checkpoint loads and training
continues from it."""

import os
import shutil

import pytest
import torch

from let_testing import (SMALL_MODEL as BASE, make_tiny_llama, nan_teacher, one_line_error as assert_one_line_error,
                         run_lean as run, small_let_flags as let)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "good"), vocab_size=256)


@pytest.mark.parametrize("flags,fragments", [
    (["--let-target-layer", "0"], ["--let-target-layer", ">= 1"]),
    (["--let-target-layer", "-3"], ["--let-target-layer", ">= 1"]),
    (["--let-target-layer", "5"], ["--let-target-layer 5", "--num-layers 4"]),
    (["--let-target-layer", "1", "--let-lambda", "-0.1"], ["--let-lambda", ">= 0"]),
    (["--let-target-layer", "1", "--let-lambda", "nan"], ["--let-lambda", "finite"]),
    (["--let-target-layer", "1", "--let-lambda", "abc"], ["--let-lambda", "expected a number >= 0 or 'auto', got 'abc'"]),
    (["--let-target-layer", "1", "--let-stop-iter", "0"], ["--let-stop-iter", "> 0"]),
    (["--let-target-layer", "1", "--let-teacher-layer", "7"], ["--let-teacher-layer 7", "0 (embeddings) to 2"]),
    (["--let-target-layer", "1", "--let-projector", "conv"], ["--let-projector", "invalid choice"]),
    (["--let-target-layer", "1", "--context-parallel-size", "2"], ["--context-parallel-size", "TransformerEngine"]),
    (["--let-target-layer", "1", "--distribute-saved-activations"], ["--distribute-saved-activations", "Megatron-LM"]),
    (["--let-target-layer", "1", "--let-teacher-norm-iters", "0"], ["--let-teacher-norm-iters", ">= 1"]),
], ids=["layer0", "layer_negative", "layer_beyond", "lambda_negative", "lambda_nan", "lambda_not_a_number",
        "stop_zero", "teacher_layer_missing", "projector_unknown", "cp_without_te", "unsupported_flag",
        "teacher_norm_iters_zero"])
def test_bad_let_flag(teacher, flags, fragments):
    assert_one_line_error(run(*BASE, "--let-teacher", teacher, *flags), *fragments)


def test_let_flags_without_teacher():
    assert_one_line_error(run(*BASE, "--let-target-layer", 2), "--let-target-layer", "without --let-teacher")


def test_missing_teacher_path(tmp_path):
    assert_one_line_error(run(*BASE, *let(str(tmp_path / "nowhere"))), "--let-teacher", "not a Hugging Face")


def test_teacher_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_one_line_error(run(*BASE, *let(str(tmp_path))), "--let-teacher", "save_pretrained")


def test_corrupt_teacher_config(tmp_path, teacher):
    broken = shutil.copytree(teacher, tmp_path / "broken")
    (broken / "config.json").write_text("{ this is not json")
    assert_one_line_error(run(*BASE, *let(str(broken))), "--let-teacher", "cannot read its config")


def test_corrupt_teacher_weights(tmp_path, teacher):
    broken = shutil.copytree(teacher, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert_one_line_error(run(*BASE, *let(str(broken))), "--let-teacher", "model.safetensors", "corrupt")


def test_warnings_for_late_layer_stop_beyond_training_and_interp_downsampling(tmp_path):
    wide = make_tiny_llama(str(tmp_path / "wide"), vocab_size=256, hidden_size=64)
    proc = run(*BASE, "--train-iters", 1, *let(wide, 4, "--let-stop-iter", 10, "--let-projector", "interp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: --let-target-layer 4 is in the second half" in proc.stdout
    assert "WARNING: --let-stop-iter 10 is beyond --train-iters 1" in proc.stdout
    assert "WARNING: --let-projector interp shrinks the teacher's 64 features" in proc.stdout


def test_nonfinite_teacher_fails_fast_and_the_last_checkpoint_resumes(tmp_path, teacher):
    work = shutil.copytree(teacher, tmp_path / "teacher")
    ckpt = str(tmp_path / "ckpt")
    common = [*BASE, *let(str(work), 1, "--let-stop-iter", 4), "--save", ckpt, "--save-interval", 2]
    assert run(*common, "--exit-interval", 2).returncode == 0
    shutil.rmtree(work)
    nan_teacher(str(work), teacher)  # the teacher's files go bad between two runs of the job
    line = assert_one_line_error(run(*common, "--load", ckpt), "non-finite LET alignment loss",
                                 "iteration 3", "rank(s) [0]", "--let-on-nonfinite skip", code=1)
    assert str(work) in line
    shutil.rmtree(work)
    shutil.copytree(teacher, work)
    resumed = run(*common, "--load", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loaded checkpoint" in resumed.stdout and "iteration        3/" in resumed.stdout
    assert "iteration        4/" in resumed.stdout


def test_nonfinite_teacher_with_skip_policy_skips_steps(tmp_path, teacher):
    bad = nan_teacher(str(tmp_path / "nan"), teacher)
    proc = run(*BASE, "--train-iters", 3, *let(bad, 1, "--let-stop-iter", 2, "--let-on-nonfinite", "skip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "consumed samples" in line]
    assert ["number of skipped iterations:   1" in line for line in lines] == [True, True, False]
    assert "nan" not in lines[2].split("lm loss:")[1].split("|")[0].lower()


def test_changed_let_settings_on_resume_are_reported(tmp_path, teacher):
    ckpt = str(tmp_path / "ckpt")
    assert run(*BASE, *let(teacher, 1), "--save", ckpt, "--exit-interval", 1, "--save-interval", 1).returncode == 0
    proc = run(*BASE, *let(teacher, 2, "--let-lambda", 0.3), "--load", ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: LET settings differ from the checkpoint's: lambda0, target_layer" in proc.stdout


def test_crash_during_save_leaves_the_previous_checkpoint_valid(megatron_world1, tmp_path, monkeypatch):
    """A save that dies half-way is never named by the tracker and never loads; the old one does."""
    from megatron.core import dist_checkpointing

    from let_testing import tiny_transformer_config
    from megatron_let import checkpoint_files
    from megatron_let.training import checkpoint as ckpt
    from megatron_let.training.model import build_gpt_chunks

    model = build_gpt_chunks(tiny_transformer_config(), 128, 16)
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    ckpt.save_checkpoint(root, 2, model, None, {"iteration": 2}, save_optimizer=False)
    saved = {k: v.clone() for k, v in model[0].state_dict().items() if isinstance(v, torch.Tensor)}

    real_save = dist_checkpointing.save

    def crash_after_writing(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        raise RuntimeError("node lost power")

    monkeypatch.setattr(dist_checkpointing, "save", crash_after_writing)
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    with pytest.raises(RuntimeError, match="node lost power"):
        ckpt.save_checkpoint(root, 4, model, None, {"iteration": 4}, save_optimizer=False)
    monkeypatch.undo()
    assert checkpoint_files.latest_iteration(root) == 2
    assert not os.path.exists(checkpoint_files.iteration_dir(root, 4))
    loaded = ckpt.load_checkpoint(root, checkpoint_files.latest_iteration(root), model, None)
    assert loaded["iteration"] == 2
    for key, value in model[0].state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key


def _gpt2_teacher(path, n_positions):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    return str(path)


def test_teacher_with_learned_positions_shorter_than_seq_length_is_refused(tmp_path):
    short = _gpt2_teacher(tmp_path / "gpt2-ctx8", n_positions=8)  # BASE: --seq-length 16
    proc = run(*BASE, *let(short))
    assert_one_line_error(proc, "--let-teacher", "learned positions for 8 tokens", "(n_positions)",
                          "--seq-length is 16")
    assert "consumed samples" not in proc.stdout  # refused before any step (it used to die at step 1: IndexError)
    # exactly --seq-length positions is enough (no refusal, no warning)
    ok = run(*BASE, "--train-iters", 1, *let(_gpt2_teacher(tmp_path / "gpt2-ctx16", n_positions=16)))
    assert ok.returncode == 0 and "WARNING" not in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]


def test_rotary_teacher_beyond_its_trained_length_is_a_warning(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8)
                     ).save_pretrained(tmp_path / "rope-ctx8")
    proc = run(*BASE, "--train-iters", 1, *let(str(tmp_path / "rope-ctx8")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: --let-teacher" in proc.stdout and "trained for 8 positions" in proc.stdout
    assert "runs it 8 positions (2.0x) beyond" in proc.stdout


def test_teacher_whose_weights_do_not_match_its_config_is_refused(tmp_path, teacher):
    """Weights saved from another class (GPT-2 tensors under a Llama config): transformers would fill all
    of the Llama's tensors with random values and the run would align the target to noise."""
    wrong = shutil.copytree(teacher, tmp_path / "renamed")
    shutil.copy(os.path.join(_gpt2_teacher(tmp_path / "gpt2", 16), "model.safetensors"), wrong / "model.safetensors")
    proc = run(*BASE, *let(str(wrong)))
    assert_one_line_error(proc, "--let-teacher", "weights do not match its config (LlamaModel)",
                                 "20 tensor(s) missing", "0 mis-shaped", "28 unexpected", "'embed_tokens.weight'")
    assert "consumed samples" not in proc.stdout  # no training step was logged
    # a converted checkpoint that lost some tensors and renamed others: counted as such
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(teacher, "model.safetensors"))
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.w1.weight"] = state.pop("model.layers.0.mlp.gate_proj.weight")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    partial = shutil.copytree(teacher, tmp_path / "partial")
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run(*BASE, *let(str(partial))), "2 tensor(s) missing", "1 mis-shaped", "2 unexpected")


# ------------------------------------------------------------------ features LET refuses (issue 16)
@pytest.mark.parametrize("flags,fragments", [
    (["--enable-cuda-graph"], ["--enable-cuda-graph", "CUDA graph", "stale"]),
    (["--use-torch-fsdp2"], ["--use-torch-fsdp2", "FSDP", "--use-distributed-optimizer"]),
    (["--recompute-granularity", "full"], ["--recompute-granularity full", "--recompute-method"]),
], ids=["cuda_graph", "torch_fsdp2", "full_recompute_without_method"])
def test_refused_features_with_let(teacher, flags, fragments):
    """Through pretrain_gpt_let.py (lean trainer), before any process group."""
    assert_one_line_error(run(*BASE, *let(teacher, 1), *flags), *fragments)


@pytest.mark.parametrize("settings,flag", [
    ({"enable_cuda_graph": True}, "--enable-cuda-graph"),
    ({"external_cuda_graph": True}, "--external-cuda-graph"),
    ({"cuda_graph_impl": "local"}, "--cuda-graph-impl local"),  # Megatron-LM's args after validate_args
    ({"cuda_graph_impl": "transformer_engine"}, "--cuda-graph-impl transformer_engine"),
    ({"use_megatron_fsdp": True}, "--use-megatron-fsdp"),
    ({"use_custom_fsdp": True}, "--use-custom-fsdp"),
    ({"use_torch_fsdp2": True}, "--use-torch-fsdp2"),
])
def test_refusals_shared_by_both_trainers(settings, flag):
    """The check both trainers run (launch.build_let, and the lean trainer's arguments before LET is built)."""
    import argparse

    from megatron_let.errors import LETConfigError
    from megatron_let.integrations.launch import refuse_unsupported_features

    refuse_unsupported_features(argparse.Namespace(cuda_graph_impl="none", recompute_granularity="full"))
    with pytest.raises(LETConfigError) as error:
        refuse_unsupported_features(argparse.Namespace(**{"cuda_graph_impl": "none", **settings}))
    assert str(error.value).startswith(flag) and "\n" not in str(error.value)


def test_refusals_that_depend_on_the_loop():
    """--let-reset-projector needs the lean trainer's loader (Megatron-LM's reads every saved tensor); legacy
    models have no layer-k hook on either loop."""
    import argparse

    from megatron_let.errors import LETConfigError
    from megatron_let.integrations.launch import refuse_unsupported_features

    refuse_unsupported_features(argparse.Namespace(let_reset_projector=True))  # the lean trainer implements it
    with pytest.raises(LETConfigError, match="--let-reset-projector is implemented by the lean trainer only"):
        refuse_unsupported_features(argparse.Namespace(let_reset_projector=True), loop="Megatron-LM")
    with pytest.raises(LETConfigError, match="drop --use-legacy-models"):
        refuse_unsupported_features(argparse.Namespace(use_legacy_models=True))
