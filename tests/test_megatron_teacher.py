"""A Megatron GPT checkpoint converted to Hugging Face gives the same final hidden states and logits.

A tiny megatron-core GPTModel (local spec, fp32, random weights including the norms) is saved in the
trainer's layout with dist_checkpointing, converted with megatron_let.teachers.megatron_checkpoint, and the HF model's
``hidden_states[-1]`` / ``last_hidden_state`` (post final norm) and logits are compared with megatron's
decoder output (after ``decoder.final_layernorm``) and logits on random tokens.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_transformer_config

SEQ, BATCH, PADDED_VOCAB = 24, 2, 128
ATOL = 1e-5

# name -> (TransformerConfig overrides, GPTModel kwargs, how args are stored in common state)
STYLES = {
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


def _saved_args(config, gpt_kwargs) -> dict:
    """The architecture part of Megatron-LM's args (what the trainer should save as common['args'])."""
    return dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        swiglu=config.gated_linear_unit, add_bias_linear=config.add_bias_linear,
        position_embedding_type=gpt_kwargs["position_embedding_type"],
        rotary_base=gpt_kwargs.get("rotary_base", 10000), rotary_percent=1.0, max_position_embeddings=SEQ,
        untie_embeddings_and_output_weights=not gpt_kwargs["share_embeddings_and_output_weights"],
        padded_vocab_size=PADDED_VOCAB, vocab_size=None)


def _build_and_save(root, style):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_let.training.checkpoint import save_checkpoint

    config_overrides, gpt_kwargs, args_kind = STYLES[style]
    torch.manual_seed(0)
    config = tiny_transformer_config(**config_overrides)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=config.normalization),
                     vocab_size=PADDED_VOCAB, max_sequence_length=SEQ, **gpt_kwargs).eval()
    with torch.no_grad():  # random everything, norms and biases included, so a mis-mapping cannot hide
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    common = {"iteration": 7}
    if args_kind:
        args = _saved_args(config, gpt_kwargs)
        common["args"] = argparse.Namespace(**args) if args_kind == "namespace" else args
    save_checkpoint(str(root), 7, [model], None, common)
    return model, config


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


@pytest.mark.parametrize("style", list(STYLES))
def test_converted_checkpoint_matches_megatron(megatron_world1, tmp_path, style):
    from megatron_let.teachers.megatron_checkpoint import convert_megatron_checkpoint
    from megatron_let.teachers.huggingface import HFTeacher

    assert torch.distributed.is_initialized()  # this path converts inside an initialised process group
    model, config = _build_and_save(tmp_path / "ckpt", style)
    architecture = None
    if STYLES[style][2] is None:  # nothing saved: the heads (and kv_channels) must come from flags
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

    _build_and_save(tmp_path / "ckpt", "llama-gqa-untied")
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

    _build_and_save(tmp_path / "ckpt", "llama-gqa-untied")
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
