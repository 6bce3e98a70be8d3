"""Teacher life cycle and safety: vocabulary checks before training, release at the stop step,
resume past the stop step without the teacher, and the real SmolLM2-135M teacher (opt-in asset)."""

import gc
import math
import os
import shutil
import weakref

import pytest
import torch

from let_testing import (SCRIPT, TEXTS, bpe_tokenizer, launch, make_tiny_llama, tiny_transformer_config, torchrun)
from megatron_let import LateToEarlyTraining, LETConfig, LETConfigError
from megatron_let.teachers.vocabulary import check_vocabulary

SMOLLM2 = os.environ.get("MEGATRON_LET_SMOLLM2", os.path.expanduser("~/.cache/megatron-let/smollm2-135m"))


@pytest.fixture(scope="module")
def teacher_with_tokenizer(tmp_path_factory):
    tokenizer = bpe_tokenizer(TEXTS, 300, "alpha beta gamma")
    path = make_tiny_llama(str(tmp_path_factory.mktemp("tok") / "teacher"), vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_same_tokenizer_passes_and_padding_is_not_a_mismatch(teacher_with_tokenizer):
    path, tokenizer = teacher_with_tokenizer
    check_vocabulary(path, len(tokenizer), tokenizer)  # the padded model vocab is never passed here
    check_vocabulary(path, len(tokenizer) - 10)  # mock data: ids inside the teacher's table


def test_different_tokenizer_is_refused(teacher_with_tokenizer):
    path, tokenizer = teacher_with_tokenizer
    other = bpe_tokenizer(TEXTS[::-1], 300, "zeta eta theta iota")
    with pytest.raises(LETConfigError, match="--let-teacher .*--tokenizer-model"):
        check_vocabulary(path, len(other), other)
    with pytest.raises(LETConfigError, match="token embeddings"):
        check_vocabulary(path, len(tokenizer) + 500)


def test_mismatched_vocab_stops_before_the_first_iteration(tmp_path, teacher_with_tokenizer):
    path, _ = teacher_with_tokenizer
    other_dir = str(tmp_path / "target_tokenizer")
    bpe_tokenizer(TEXTS[::-1], 300, "zeta eta theta iota").save_pretrained(other_dir)
    proc = launch(["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
                   "--micro-batch-size", 1, "--train-iters", 2, "--lr", "1e-3", "--mock-data", "--log-interval", 1,
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", other_dir,
                   "--let-teacher", path, "--let-target-layer", 1], lean=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--let-teacher" in lines[0] and "token" in lines[0], proc.stderr
    assert "consumed samples" not in proc.stdout  # no training step was logged


def test_teacher_is_released_at_the_stop_step(megatron_world1, tiny_teacher):
    from megatron_let.training.model import build_gpt_chunks

    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=0.3, stop_iter=2))
    (model,) = build_gpt_chunks(tiny_transformer_config(), 128, 16, let=let)
    layer = model.decoder.layers[0]
    assert len(layer._forward_hooks) == 1
    tokens = torch.randint(0, 128, (2, 16))
    let.begin_iteration(0, 1)
    let.set_microbatch(tokens, torch.ones(2, 16))
    model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).sum().backward()
    refs = [weakref.ref(p) for p in let._teacher.model.parameters()]
    assert refs and all(r() is not None for r in refs)
    let.begin_iteration(1, 1)
    assert let._teacher is not None  # lambda > 0 until the stop step
    let.begin_iteration(2, 1)
    gc.collect()
    assert let.finished and let._teacher is None
    assert all(r() is None for r in refs), "teacher weights still referenced after the stop step"
    assert len(layer._forward_hooks) == 0


def test_resume_past_the_stop_step_needs_no_teacher(tmp_path):
    teacher = make_tiny_llama(str(tmp_path / "teacher"), vocab_size=256)
    ckpt = str(tmp_path / "ckpt")
    flags = ["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16,
             "--micro-batch-size", 2, "--train-iters", 4, "--lr", "1e-3", "--mock-data", "--vocab-size", 128,
             "--log-interval", 1, "--let-teacher", teacher, "--let-target-layer", 1, "--let-stop-iter", 2,
             "--let-projector", "linear", "--save", ckpt]
    torchrun(SCRIPT, 1, [*flags, "--save-interval", 2, "--exit-interval", 2])
    shutil.rmtree(teacher)
    resumed = torchrun(SCRIPT, 1, [*flags, "--load", ckpt]).stdout
    assert "iteration        3/" in resumed and "iteration        4/" in resumed
    assert "let loss" not in resumed


@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "config.json")),
                    reason=f"SmolLM2-135M not present at {SMOLLM2}; opt in with "
                           f"'python -m megatron_let.teachers.smollm2 --output-dir {SMOLLM2}' "
                           "(or set MEGATRON_LET_SMOLLM2)")
def test_real_smollm2_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_let.teachers.huggingface import HFTeacher

    text = ("The Amazon River in South America is the largest river by discharge volume of water in the world, "
            "and the disputed longest river system in the world in comparison to the Nile.")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = math.exp(AutoModelForCausalLM.from_pretrained(SMOLLM2)(ids, labels=ids).loss.item())
    assert ppl < 60, f"SmolLM2 perplexity {ppl:.1f} on encyclopedic prose: the teacher is broken"
    states = HFTeacher(SMOLLM2).hidden_states(ids)
    assert states.shape == (ids.shape[1], 1, 576) and torch.isfinite(states).all()
    proc = torchrun(SCRIPT, 1, ["--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4,
                                "--seq-length", 32, "--micro-batch-size", 2, "--train-iters", 2, "--lr", "1e-3",
                                "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                SMOLLM2, "--log-interval", 1, "--let-teacher", SMOLLM2, "--let-target-layer", 1,
                                "--let-stop-iter", 2])
    assert "let loss" in proc.stdout
