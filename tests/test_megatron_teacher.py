"""A Megatron GPT checkpoint converted to Hugging Face gives the same final hidden states and logits.

A tiny megatron-core GPTModel (local spec, fp32, random weights including the norms) is saved in the
trainer's layout with dist_checkpointing, converted with megatron_let.teachers.megatron_checkpoint, and the HF model's
``hidden_states[-1]`` / ``last_hidden_state`` (post final norm) and logits are compared with megatron's
decoder output (after ``decoder.final_layernorm``) and logits on random tokens.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from let_testing import (MEGATRON_GPT_SEQ as SEQ, MEGATRON_GPT_STYLES, MEGATRON_GPT_VOCAB as PADDED_VOCAB, ROOT,
                         save_megatron_gpt)

BATCH = 2
ATOL = 1e-5


@torch.no_grad()
def _megatron_outputs(model, tokens):
    captured = {}
    hook = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: captured.update(hidden=o))
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, position_ids, attention_mask=None)  # [b, s, V]; causal mask from the layer spec
    hook.remove()
    return captured["hidden"].transpose(0, 1), logits  # hidden [b, s, h]: after decoder.final_layernorm


@torch.no_grad()
def _hf_outputs(directory, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()
    out = hf(input_ids=tokens, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1], out.logits, hf


@pytest.mark.parametrize("style", list(MEGATRON_GPT_STYLES))
def test_converted_checkpoint_matches_megatron(megatron_world1, tmp_path, style):
    from megatron_let.teachers.megatron_checkpoint import convert_megatron_checkpoint
    from megatron_let.teachers.huggingface import HFTeacher

    assert torch.distributed.is_initialized()  # this path converts inside an initialised process group
    model, config = save_megatron_gpt(tmp_path / "ckpt", style)
    architecture = None
    if MEGATRON_GPT_STYLES[style][2] is None:  # nothing saved: the heads (and kv_channels) must come from flags
        with pytest.raises(ValueError, match="attention heads"):
            convert_megatron_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "none"))
        architecture = dict(num_attention_heads=config.num_attention_heads, kv_channels=config.kv_channels,
                            norm_epsilon=config.layernorm_epsilon)
    out = convert_megatron_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), architecture)

    tokens = torch.randint(0, PADDED_VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mg_hidden, mg_logits = _megatron_outputs(model, tokens)
    hf_hidden, hf_logits, hf = _hf_outputs(out, tokens)
    expected_class = "GPT2LMHeadModel" if style == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    assert hf.config.vocab_size == PADDED_VOCAB  # padded rows kept by default
    torch.testing.assert_close(hf_hidden, mg_hidden, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(hf_logits, mg_logits, atol=ATOL, rtol=1e-5)
    # what LET actually consumes: the teacher's last_hidden_state in Megatron's [s, b, h] layout
    teacher = HFTeacher(out, dtype=torch.float32, device=torch.device("cpu"))
    torch.testing.assert_close(teacher.hidden_states(tokens), mg_hidden.transpose(0, 1), atol=ATOL, rtol=1e-5)


def test_cli_without_process_group_trims_vocab(megatron_world1, tmp_path):
    """The CLI in a fresh process (no torch.distributed) reads the same tensors, trimming the padded vocab."""
    from safetensors.torch import load_file

    from megatron_let.teachers.megatron_checkpoint import convert_megatron_checkpoint

    save_megatron_gpt(tmp_path / "ckpt", "llama-gqa-untied")
    reference = load_file(os.path.join(convert_megatron_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "a")),
                                       "model.safetensors"))
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "megatron_let.teachers.megatron_checkpoint", "--load", str(tmp_path / "ckpt"),
                           "--output", str(tmp_path / "b"), "--vocab-size", "100"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trimmed = load_file(os.path.join(tmp_path / "b", "model.safetensors"))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vocab_size"] == 100
    assert set(trimmed) == set(reference)
    for key, value in reference.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert value.shape[0] == PADDED_VOCAB and trimmed[key].shape[0] == 100
            value = value[:100]
        assert torch.equal(trimmed[key], value), key


def test_contradicting_flags_are_refused(megatron_world1, tmp_path):
    from megatron_let.teachers.megatron_checkpoint import ConversionError, convert_megatron_checkpoint

    save_megatron_gpt(tmp_path / "ckpt", "llama-gqa-untied")
    with pytest.raises(ConversionError, match="hidden_size"):
        convert_megatron_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "x"), {"hidden_size": 32})
    with pytest.raises(ConversionError, match="query groups"):
        convert_megatron_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "x"), {"num_query_groups": 4})


def test_per_layer_keys_local_names_and_split_swiglu_are_normalised():
    """Non-homogeneous (per-layer) keys, local-spec layernorm names and fc1 saved as ``weight_w``/``weight_v``
    (singleton_local_shards) read like the stacked TE-named layout."""
    from megatron_let.teachers.megatron_checkpoint import split_layers

    w, v, norm = torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 4)
    stacked = {"embedding.word_embeddings.weight": torch.randn(16, 4),
               "decoder.layers.mlp.linear_fc1.weight": torch.cat([w, v], dim=1),
               "decoder.layers.self_attention.linear_qkv.layer_norm_weight": norm}
    per_layer = {"embedding.word_embeddings.weight": stacked["embedding.word_embeddings.weight"]}
    for i in range(2):
        per_layer[f"decoder.layers.{i}.mlp.linear_fc1.weight_w"] = w[i]
        per_layer[f"decoder.layers.{i}.mlp.linear_fc1.weight_v"] = v[i]
        per_layer[f"decoder.layers.{i}.input_layernorm.weight"] = norm[i]
    (glob_a, layers_a), (glob_b, layers_b) = split_layers(stacked), split_layers(per_layer)
    assert set(glob_a) == set(glob_b) == {"embedding.word_embeddings.weight"}
    assert len(layers_a) == len(layers_b) == 2
    for a, b in zip(layers_a, layers_b):
        assert set(a) == set(b) == {"mlp.linear_fc1.weight", "self_attention.linear_qkv.layer_norm_weight"}
        assert all(torch.equal(a[k], b[k]) for k in a)
