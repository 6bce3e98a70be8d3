"""The LET teacher loads from every format users have, and gives the model's own final hidden states.

Every model here is a tiny random one built in the test (no hub access):

* Hugging Face directories for the Llama (SmolLM), GPT-NeoX (Pythia), OPT, GPT-2 and Qwen2 families,
  written as safetensors (``save_pretrained``) and as a legacy ``pytorch_model.bin``;
* a llama.cpp-style GGUF file (F32 tensors, llama.cpp tensor names and q/k row permutation), passed as
  the file itself or as a directory holding only it;
* the paths ``resolve_teacher`` must refuse with a ``--let-teacher`` message.

The reference is always the causal LM's own ``output_hidden_states=True`` last entry, transposed to
Megatron's [s, b, h] layout.
"""

import os

import numpy as np
import pytest
import torch

from megatron_let.config import LETConfigError
from megatron_let.teachers.huggingface import HFTeacher, decoder_blocks, resolve_teacher, teacher_hidden_size

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")  # compare on CPU in fp32 even where a GPU exists: exact, deterministic
BATCH, SEQ = 2, 7  # SEQ != BATCH so a missing transpose cannot pass
VOCAB = 128


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=100000.0,  # SmolLM2's base, not the default
                                      tie_word_embeddings=True)  # SmolLM ties its embeddings
    return transformers.LlamaForCausalLM(config)


def _neox():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
                                        tie_word_embeddings=False)  # Pythia: partial rotary, untied embed_out
    return transformers.GPTNeoXForCausalLM(config)


def _opt(word_embed_proj_dim: int = 32):
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=word_embed_proj_dim, bos_token_id=0, eos_token_id=1,
                                    pad_token_id=2)
    return transformers.OPTForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _qwen2():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


FAMILIES = {"llama": _llama, "gpt_neox": _neox, "opt": _opt, "gpt2": _gpt2, "qwen2": _qwen2}


def _build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _save(model, directory: str, fmt: str) -> str:
    if fmt == "safetensors":
        model.save_pretrained(directory)
        assert os.path.isfile(os.path.join(directory, "model.safetensors"))
    else:
        # transformers 5 dropped save_pretrained(safe_serialization=False) (it writes safetensors regardless),
        # so write the legacy layout of older checkpoints by hand: config.json + a torch.save'd state dict
        # with the causal LM's key names (e.g. "model.layers.0...", "gpt_neox...", "transformer...").
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
        assert not any(f.endswith(".safetensors") for f in os.listdir(directory))
    return directory


@torch.no_grad()
def _reference(model, tokens: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The causal LM's own hidden states (``output_hidden_states=True``), as [s, b, h]."""
    return model(input_ids=tokens, output_hidden_states=True).hidden_states[layer].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family built once and written in both formats: {family: (causal_lm, {fmt: directory})}."""
    cache = {}

    def get(family):
        if family not in cache:
            model = _build(family)
            root = tmp_path_factory.mktemp(family)
            cache[family] = (model, {fmt: _save(model, str(root / fmt), fmt) for fmt in ("safetensors", "bin")})
        return cache[family]

    return get


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_directory_teacher_matches_causal_lm(saved, family, fmt):
    model, paths = saved(family)
    path = paths[fmt]
    tokens = _tokens()
    hidden = model.config.hidden_size
    expected = _reference(model, tokens)

    assert resolve_teacher(path).gguf_file is None
    assert teacher_hidden_size(path) == hidden
    teacher = HFTeacher(path, torch.float32, device=CPU)
    try:
        assert teacher.hidden_size == hidden
        assert type(teacher.model).__name__ == type(model.base_model).__name__  # AutoModel: no LM head
        out = teacher.hidden_states(tokens)
        assert out.shape == (SEQ, BATCH, hidden) and out.dtype == torch.float32 and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # "final hidden state": the base model's last_hidden_state is the CausalLM's hidden_states[-1]
        # (after the final norm: model.norm / final_layer_norm / ln_f) for all five families.
        with torch.no_grad():
            base = model.base_model(input_ids=tokens).last_hidden_state.transpose(0, 1)
        torch.testing.assert_close(base, expected, atol=0, rtol=0)
    finally:
        teacher.release()
    assert teacher.model is None
    with pytest.raises(RuntimeError, match="released"):
        teacher.hidden_states(tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_directory_teacher_intermediate_layer(saved, family):
    """``layer=k`` returns the causal LM's ``hidden_states[k]`` (0 = embeddings, k = after block k); the
    blocks after k are dropped at load (neither kept nor run)."""
    model, paths = saved(family)
    tokens = _tokens()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for layer in (1, -2, 0):  # -2 is block 1 of 2 counted from the end; 0 keeps every block
        teacher = HFTeacher(paths["safetensors"], torch.float32, device=CPU, layer=layer)
        torch.testing.assert_close(teacher.hidden_states(tokens), _reference(model, tokens, layer),
                                   atol=1e-5, rtol=1e-5)
        dropped = count(model.base_model) - count(teacher.model)
        assert dropped == (count(decoder_blocks(model.base_model)[1]) if layer else 0), (layer, dropped)
        teacher.release()


def test_config_is_parsed_once_per_file_version(tmp_path, saved):
    """Start-up reads the teacher's config several times (a GGUF's takes seconds): one parse per file
    version, each caller gets its own copy, and a rewritten file is read again."""
    import json
    import shutil

    _, paths = saved("llama")
    path = shutil.copytree(paths["safetensors"], tmp_path / "teacher")
    first = resolve_teacher(str(path)).config()
    first.num_hidden_layers = 99  # a caller's edit stays its own
    assert resolve_teacher(str(path)).config().num_hidden_layers == 2
    stored = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**stored, "num_hidden_layers": 3}))
    stamp = os.stat(path / "config.json").st_mtime_ns + 10**9
    os.utime(path / "config.json", ns=(stamp, stamp))
    assert resolve_teacher(str(path)).config().num_hidden_layers == 3


def test_opt_with_project_out_final_width(tmp_path):
    """OPT-350m style (word_embed_proj_dim != hidden_size): the final hidden state is project_out's output.

    last_hidden_state == hidden_states[-1], both of width word_embed_proj_dim; the inner hidden_states
    have hidden_size. The teacher returns the right tensor in either case.
    """
    torch.manual_seed(0)
    model = _opt(word_embed_proj_dim=16).eval()
    path = _save(model, str(tmp_path / "opt-proj"), "safetensors")
    tokens = _tokens()
    teacher = HFTeacher(path, torch.float32, device=CPU)
    out = teacher.hidden_states(tokens)
    assert out.shape == (SEQ, BATCH, 16)
    torch.testing.assert_close(out, _reference(model, tokens), atol=1e-5, rtol=1e-5)
    inner = HFTeacher(path, torch.float32, device=CPU, layer=1).hidden_states(tokens)
    assert inner.shape == (SEQ, BATCH, 32)


def test_opt_with_project_out_reports_its_final_width(tmp_path):
    """OPT's final hidden state has word_embed_proj_dim (project_out), e.g. facebook/opt-350m."""
    torch.manual_seed(0)
    path = _save(_opt(word_embed_proj_dim=16).eval(), str(tmp_path / "opt-proj"), "safetensors")
    assert teacher_hidden_size(path) == 16
    assert HFTeacher(path, torch.float32, device=CPU).hidden_size == 16
    assert teacher_hidden_size(path, layer=1) == HFTeacher(path, device=CPU, layer=1).hidden_size == 32


# ---------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# ---------------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (transformers' GGUF loader reverses it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_llama_gguf(model, path: str, vocab: str = "vocab_size", lm_head: bool = True, drop: tuple = ()) -> str:
    """Write ``model`` (a LlamaForCausalLM) as an F32 llama.cpp GGUF file.

    ``vocab``: how the loader learns the vocabulary size -- "vocab_size" (the ``llama.vocab_size`` key),
    "tokenizer" (a minimal ``tokenizer.ggml.*`` section; vocab = len(tokens)) or "none".
    ``drop``: GGUF tensor names left out (a broken conversion).
    """
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, "llama")  # -> general.architecture = "llama"
    writer.add_name("tiny-llama")
    writer.add_file_type(0)  # ALL_F32
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                              else float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if vocab == "vocab_size":
        writer.add_vocab_size(cfg.vocab_size)
    elif vocab == "tokenizer":
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
        writer.add_token_scores([0.0] * cfg.vocab_size)
        writer.add_token_types([1] * cfg.vocab_size)  # NORMAL

    add_tensor = writer.add_tensor
    writer.add_tensor = lambda name, tensor: None if name in drop else add_tensor(name, tensor)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(b + "attn_q.weight",
                          _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(b + "attn_k.weight",
                          _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if lm_head:  # tied models (SmolLM) ship no output.weight; the loader then sets tie_word_embeddings
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("vocab,lm_head", [("vocab_size", True), ("tokenizer", False)],
                         ids=["vocab_size-key+output", "tokenizer-tokens+tied"])
def test_gguf_teacher_matches_hf_llama(tmp_path, vocab, lm_head):
    pytest.importorskip("gguf")
    model = _build("llama")
    directory = tmp_path / "gguf-dir"
    directory.mkdir()
    gguf_path = _write_llama_gguf(model, str(directory / "tiny-llama-f32.gguf"), vocab=vocab, lm_head=lm_head)
    tokens = _tokens()
    expected = _reference(model, tokens)

    assert resolve_teacher(gguf_path).gguf_file == "tiny-llama-f32.gguf"
    assert resolve_teacher(str(directory)).gguf_file == "tiny-llama-f32.gguf"
    for path in (gguf_path, str(directory)):
        assert teacher_hidden_size(path) == 64
        teacher = HFTeacher(path, torch.float32, device=CPU)
        config = teacher.model.config
        assert (config.model_type, config.vocab_size, config.num_hidden_layers,
                config.num_attention_heads, config.num_key_value_heads) == ("llama", VOCAB, 2, 4, 2)
        assert teacher.hidden_size == 64
        out = teacher.hidden_states(tokens)
        assert out.shape == (SEQ, BATCH, 64)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        teacher.release()


def test_gguf_without_vocab_size_or_tokens_does_not_load(tmp_path):
    """With neither ``llama.vocab_size`` nor ``tokenizer.ggml.tokens`` transformers falls back to LlamaConfig's
    default vocab (32000) and refuses the 128-row token_embd -- the teacher must not load silently."""
    pytest.importorskip("gguf")
    gguf_path = _write_llama_gguf(_build("llama"), str(tmp_path / "novocab.gguf"), vocab="none")
    assert teacher_hidden_size(gguf_path) == 64  # the config alone still reads
    with pytest.raises(LETConfigError, match=r"novocab.gguf'.*0 tensor\(s\) missing, 1 mis-shaped, 0 unexpected "
                                             r"\(mis-shaped e.g. 'embed_tokens.weight'\)"):
        HFTeacher(gguf_path, torch.float32, device=CPU)  # one line, not transformers' traceback


# ---------------------------------------------------------------------------------------------------------
# weights that do not fill the model their config describes (transformers would initialise them randomly)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lm_head", [True, False], ids=["output", "tied"])
def test_correct_gguf_passes_the_preflight_weight_check(tmp_path, lm_head):
    pytest.importorskip("gguf")
    from megatron_let.teachers import huggingface

    gguf_path = _write_llama_gguf(_build("llama"), str(tmp_path / "ok.gguf"), lm_head=lm_head)
    source = resolve_teacher(gguf_path)
    stored = huggingface._gguf_tensor_shapes(source, source.config())
    assert stored is not None and len(stored) == 2 + 9 * 2  # read from the header: embeddings, norm, 9 per block
    assert stored["embed_tokens.weight"] == (VOCAB, 64)
    warnings = []
    assert huggingface.preflight_teacher(gguf_path, seq_length=64, warn=warnings.append) is not None
    assert warnings == []


def test_gguf_missing_a_tensor_is_refused_in_preflight(tmp_path):
    """A broken conversion (a block's tensor left out): transformers would fill it with random values."""
    pytest.importorskip("gguf")
    from megatron_let.teachers.huggingface import preflight_teacher

    gguf_path = _write_llama_gguf(_build("llama"), str(tmp_path / "broken.gguf"), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(LETConfigError, match=r"broken.gguf'.*\(LlamaModel\): 1 tensor\(s\) missing, 0 mis-shaped, "
                                             r"0 unexpected \(missing e.g. 'layers.1.mlp.up_proj.weight'\)"):
        preflight_teacher(gguf_path, seq_length=64)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_correct_teachers_pass_the_weight_check_silently(saved, family, fmt):
    """Tied embeddings (llama, qwen2, gpt2), untied LM heads (neox, opt) and legacy .bin files: no complaint."""
    from megatron_let.teachers.huggingface import preflight_teacher

    _, paths = saved(family)
    warnings = []
    assert preflight_teacher(paths[fmt], seq_length=64, warn=warnings.append) is not None
    assert warnings == []


def test_base_model_without_lm_head_passes_the_weight_check(tmp_path):
    from megatron_let.teachers.huggingface import preflight_teacher

    model = _build("llama")
    model.base_model.save_pretrained(tmp_path / "base")  # LlamaModel: no LM head, no "model." prefix
    assert preflight_teacher(str(tmp_path / "base"), seq_length=64) is not None
    teacher = HFTeacher(str(tmp_path / "base"), torch.float32, device=CPU)
    torch.testing.assert_close(teacher.hidden_states(_tokens()), _reference(model, _tokens()), atol=1e-5, rtol=1e-5)


def test_loading_refuses_weights_of_another_class_even_without_preflight(tmp_path, saved):
    """The last guard (files preflight cannot read, GGUF architectures gguf cannot name): loading refuses in one line."""
    import shutil

    _, llama = saved("llama")
    _, gpt2 = saved("gpt2")
    wrong = shutil.copytree(llama["safetensors"], tmp_path / "wrong")
    shutil.copy(os.path.join(gpt2["safetensors"], "model.safetensors"), wrong / "model.safetensors")
    with pytest.raises(LETConfigError, match=r"weights do not match its config \(LlamaModel\): 20 tensor\(s\) "
                                             r"missing, 0 mis-shaped, 28 unexpected"):
        HFTeacher(str(wrong), torch.float32, device=CPU)


# ---------------------------------------------------------------------------------------------------------
# resolve_teacher refusals
# ---------------------------------------------------------------------------------------------------------


def _missing_dir(tmp_path):
    return str(tmp_path / "no-such-model")


def _missing_gguf(tmp_path):
    return str(tmp_path / "no-such-model.gguf")


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def _two_ggufs(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    (d / "model-Q4_K_M.gguf").write_bytes(b"")
    (d / "model-Q8_0.gguf").write_bytes(b"")
    return str(d)


def _non_gguf_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    return str(f)


@pytest.mark.parametrize("make", [_missing_dir, _missing_gguf, _empty_dir, _two_ggufs, _non_gguf_file],
                         ids=["missing-dir", "missing-gguf", "empty-dir", "two-ggufs", "non-gguf-file"])
def test_resolve_teacher_refuses(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(LETConfigError, match="--let-teacher") as info:
        resolve_teacher(path)
    assert repr(path) in str(info.value)
    with pytest.raises(LETConfigError, match="--let-teacher"):
        teacher_hidden_size(path)
