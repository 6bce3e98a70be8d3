"""Turn a Megatron GPT checkpoint (``torch_dist``) into a Hugging Face model directory for ``--let-teacher``.

The LET teacher runs a Hugging Face model (:class:`megatron_let.teachers.huggingface.HFTeacher`). A team whose small
model was trained with Megatron has a sharded ``dist_checkpointing`` checkpoint instead; this converts it
once::

    python -m megatron_let.teachers.megatron_checkpoint --load CKPT_DIR --output HF_DIR [--iteration N]

``CKPT_DIR`` is Megatron-LM's layout (``latest_checkpointed_iteration.txt`` + ``iter_0000100/``) or one
``iter_*`` directory. The tensors are read whole with ``torch.distributed.checkpoint`` in a single process
(``no_dist``), so neither the parallel layout the model was trained with nor an initialised
``torch.distributed`` is needed; optimizer state and the LET projector are never read.

Two families are supported:

* LLaMA style (RMSNorm, SwiGLU, RoPE, optional GQA and biases, tied or untied embeddings) ->
  ``LlamaForCausalLM``.
* GPT style (LayerNorm, GeLU, learned absolute positions, MHA) -> ``GPT2LMHeadModel``.

The architecture comes from the checkpoint's saved ``args`` (``common.pt``, as Megatron-LM writes it;
an ``argparse.Namespace`` or a dict with Megatron-LM's argument names), then from explicit overrides
(``architecture=`` / CLI flags, which win), and what the tensor shapes reveal fills the rest (layers,
widths, SwiGLU, norm type, biases, tying, learned positions). The only thing that must come from args
or flags is ``num_attention_heads``; ``norm_epsilon`` and ``rotary_base`` default to Megatron-LM's
defaults (1e-5, 10000) and should be given when the model used others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Dict, Mapping, Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")

# Megatron-LM argument names this converter reads; everything else in saved args is ignored.
ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
    "add_qkv_bias", "position_embedding_type", "rotary_base", "rotary_percent", "rotary_interleaved",
    "max_position_embeddings", "seq_length", "untie_embeddings_and_output_weights", "vocab_size",
    "openai_gelu", "squared_relu", "apply_layernorm_1p", "qk_layernorm", "num_experts",
    "use_rope_scaling", "rope_scaling_factor", "apply_residual_connection_post_layernorm",
    "multi_latent_attention", "tokenizer_type", "tokenizer_model",
)

# Local-spec module names -> the TE names local-spec checkpoints are normally saved under.
_LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


class ConversionError(ValueError):
    """The checkpoint cannot be converted (unsupported feature, missing or inconsistent architecture)."""


# --------------------------------------------------------------------------------------------- reading

def resolve_iteration_dir(checkpoint_dir: str, iteration: Optional[int] = None) -> str:
    """``iter_*`` directory to read: the given iteration, the tracker's, or ``checkpoint_dir`` itself."""
    if iteration is not None:
        path = os.path.join(checkpoint_dir, f"iter_{iteration:07d}")
    elif os.path.isfile(os.path.join(checkpoint_dir, "metadata.json")):
        path = checkpoint_dir
    elif os.path.isfile(os.path.join(checkpoint_dir, TRACKER)):
        with open(os.path.join(checkpoint_dir, TRACKER)) as f:
            text = f.read().strip()
        path = os.path.join(checkpoint_dir, "release" if text == "release" else f"iter_{int(text):07d}")
    else:
        raise ConversionError(f"{checkpoint_dir!r} is neither a Megatron checkpoint root (no {TRACKER}) nor an "
                              "iter_* directory (no metadata.json).")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        if os.path.isdir(path) and any(n.startswith("mp_rank_") for n in os.listdir(path)):
            raise ConversionError(f"{path!r} is a legacy per-rank ('torch' format) checkpoint; only the "
                                  "dist_checkpointing (torch_dist) format is supported. Re-save it with "
                                  "--ckpt-format torch_dist (Megatron-LM --ckpt-convert-format).")
        raise ConversionError(f"{path!r} is not a dist_checkpointing checkpoint (no metadata.json).")
    with open(os.path.join(path, "metadata.json")) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{path!r} uses sharded backend {backend!r}; only 'torch_dist' is supported.")
    return path


def _safe_globals():
    """Types Megatron-LM pickles into common.pt beyond plain data: megatron-core's own list (Namespace,
    its enums, RerunState, numpy arrays, ...; importing megatron.core registers it anyway) plus Namespace."""
    import types

    allowed = [argparse.Namespace, types.SimpleNamespace]
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS
    except Exception:  # noqa: BLE001 - older megatron-core: Namespace alone covers our trainer's args
        return allowed
    return allowed + list(SAFE_GLOBALS)


def load_common_state(iteration_dir: str, allow_pickle: bool = False) -> dict:
    """``common.pt`` (iteration, saved args, ...). Unpickled with ``weights_only`` plus the Namespace/enum
    types Megatron-LM stores, or fully (``allow_pickle``: only for checkpoints you trust)."""
    path = os.path.join(iteration_dir, "common.pt")
    if not os.path.isfile(path):
        return _common_state_in_shards(iteration_dir)
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends
            warnings.warn(f"could not read {path} safely ({str(exc).splitlines()[0]}); ignoring the saved args. "
                          "Pass --allow-pickle if you trust this checkpoint, or give the architecture flags.")
            return {}


def _common_state_in_shards(iteration_dir: str) -> dict:
    """megatron-core 0.19 writes the common state as a sharded object inside the torch_dist files (no
    common.pt): read it with megatron-core's own loader, under the same allow-list of saved types."""
    if not os.path.isfile(os.path.join(iteration_dir, ".metadata")):
        return {}
    from megatron.core import dist_checkpointing

    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return dist_checkpointing.load_common_state_dict(iteration_dir)
        except Exception as exc:  # noqa: BLE001 - an older layout, or types outside the allow-list
            warnings.warn(f"could not read the common state of {iteration_dir} ({str(exc).splitlines()[0]}); "
                          "ignoring the saved args: give the architecture flags.")
            return {}


def saved_args(common: Mapping) -> Optional[dict]:
    """The ``args`` entry of the common state as a plain dict of the fields this converter reads."""
    args = common.get("args")
    if args is None:
        return None
    values = args if isinstance(args, Mapping) else vars(args)
    return {k: values[k] for k in ARCH_FIELDS if k in values}


def load_model_tensors(iteration_dir: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint, unsharded, keyed by its sharded key.

    Uses ``torch.distributed.checkpoint`` with ``no_dist=True``: works in one process with or without an
    initialised process group, whatever TP/PP/VPP/DP layout wrote it. Optimizer state, the LET projector and
    ``_extra_state`` (TE/fp8 metadata, stored as bytes) are skipped.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(iteration_dir)
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES)
             and "_extra_state" not in key}
    if not state:
        raise ConversionError(f"{iteration_dir!r} holds no model tensors (keys under {MODEL_PREFIXES}).")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------ structure

def split_layers(tensors: Mapping[str, torch.Tensor]):
    """(global tensors, per-layer dicts with TE-style names, e.g. 'self_attention.linear_qkv.weight').

    Handles both the stacked layout (``decoder.layers.X`` with a leading layer axis; homogeneous layers) and
    per-layer keys (``decoder.layers.<i>.X``), the local-spec layernorm names and the split SwiGLU fc1
    (``linear_fc1.weight_w`` / ``_v``, written with ``singleton_local_shards``).
    """
    glob, stacked, indexed = {}, {}, {}
    for key, value in tensors.items():
        if not key.startswith("decoder.layers."):
            glob[key] = value
            continue
        rest = key[len("decoder.layers."):]
        head, _, tail = rest.partition(".")
        if head.isdigit():
            indexed.setdefault(int(head), {})[tail] = value
        else:
            stacked[rest] = value
    if stacked and indexed:
        raise ConversionError("the checkpoint mixes stacked and per-layer decoder keys; not supported.")
    if stacked:
        counts = {v.shape[0] for v in stacked.values()}
        if len(counts) != 1:
            raise ConversionError(f"stacked decoder tensors disagree on the number of layers: {sorted(counts)}")
        layers = [{name: v[i] for name, v in stacked.items()} for i in range(counts.pop())]
    else:
        if sorted(indexed) != list(range(len(indexed))):
            raise ConversionError(f"decoder layer indices are not contiguous: {sorted(indexed)}")
        layers = [indexed[i] for i in range(len(indexed))]
    normalized = []
    for layer in layers:
        out = {_LOCAL_TO_TE.get(name, name): v for name, v in layer.items()}
        for param in ("weight", "bias"):
            w, v = out.pop(f"mlp.linear_fc1.{param}_w", None), out.pop(f"mlp.linear_fc1.{param}_v", None)
            if w is not None and v is not None:
                out[f"mlp.linear_fc1.{param}"] = torch.cat([w, v])
        normalized.append(out)
    return glob, normalized


def _unsupported(layers):
    names = set().union(*[set(layer) for layer in layers]) if layers else set()
    for fragment, what in (("q_layernorm", "QK layernorm"), ("k_layernorm", "QK layernorm"),
                           ("router", "mixture of experts"), ("experts", "mixture of experts"),
                           ("linear_q_down_proj", "multi-latent attention"),
                           ("linear_kv_down_proj", "multi-latent attention")):
        if any(fragment in n for n in names):
            raise ConversionError(f"the checkpoint uses {what}; not supported by this converter.")


def infer_architecture(glob: Mapping[str, torch.Tensor], layers) -> dict:
    """What the tensor shapes say about the architecture (Megatron-LM argument names)."""
    if not layers:
        raise ConversionError("the checkpoint has no decoder layers.")
    first = layers[0]
    for required in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                     "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
        if required not in first:
            raise ConversionError(f"decoder layer 0 has no {required!r}; keys: {sorted(first)}")
    if "embedding.word_embeddings.weight" not in glob:
        raise ConversionError("the checkpoint has no 'embedding.word_embeddings.weight'.")
    fc1, fc2 = first["mlp.linear_fc1.weight"], first["mlp.linear_fc2.weight"]
    arch = dict(
        num_layers=len(layers),
        hidden_size=glob["embedding.word_embeddings.weight"].shape[1],
        padded_vocab_size=glob["embedding.word_embeddings.weight"].shape[0],
        ffn_hidden_size=fc2.shape[1],
        swiglu=fc1.shape[0] == 2 * fc2.shape[1],
        normalization="LayerNorm" if "self_attention.linear_qkv.layer_norm_bias" in first else "RMSNorm",
        add_bias_linear="self_attention.linear_proj.bias" in first,
        add_qkv_bias="self_attention.linear_qkv.bias" in first,
        untie_embeddings_and_output_weights="output_layer.weight" in glob,
        qkv_rows=first["self_attention.linear_qkv.weight"].shape[0],
        attention_out=first["self_attention.linear_proj.weight"].shape[1],
    )
    if "embedding.position_embeddings.weight" in glob:
        arch["position_embedding_type"] = "learned_absolute"
        arch["max_position_embeddings"] = glob["embedding.position_embeddings.weight"].shape[0]
    return arch


_SHAPE_CHECKED = ("num_layers", "hidden_size", "ffn_hidden_size", "swiglu", "normalization",
                  "untie_embeddings_and_output_weights")


def resolve_architecture(inferred: dict, saved: Optional[Mapping] = None,
                         overrides: Optional[Mapping] = None) -> dict:
    """Overrides > saved args > tensor shapes > Megatron-LM defaults; conflicts with shapes are errors."""
    given = dict(saved or {})
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in _SHAPE_CHECKED:
        if given.get(key) is not None and given[key] != inferred[key]:
            raise ConversionError(f"{key}={given[key]!r} (args/flags) contradicts the checkpoint's tensors, "
                                  f"which say {inferred[key]!r}.")
    if given.get("position_embedding_type") == "learned_absolute" \
            and inferred.get("position_embedding_type") != "learned_absolute":
        raise ConversionError("position_embedding_type=learned_absolute but the checkpoint has no "
                              "embedding.position_embeddings.weight.")
    arch = dict(inferred)
    arch.update({k: v for k, v in given.items() if v is not None})
    arch.setdefault("norm_epsilon", 1e-5)
    arch.setdefault("rotary_base", 10000)
    arch.setdefault("rotary_percent", 1.0)
    arch.setdefault("position_embedding_type", "rope")
    for flag in ("rotary_interleaved", "openai_gelu", "squared_relu", "apply_layernorm_1p", "qk_layernorm",
                 "use_rope_scaling", "apply_residual_connection_post_layernorm", "multi_latent_attention"):
        arch[flag] = bool(arch.get(flag, False))
    if inferred.get("position_embedding_type") == "learned_absolute":
        arch["position_embedding_type"] = "learned_absolute"
        arch["max_position_embeddings"] = inferred["max_position_embeddings"]
    # which biases exist is what the tensors say (add_qkv_bias without add_bias_linear included)
    arch["add_bias_linear"], arch["add_qkv_bias"] = inferred["add_bias_linear"], inferred["add_qkv_bias"]

    heads = arch.get("num_attention_heads")
    if not heads:
        raise ConversionError("the number of attention heads is unknown: the checkpoint saves no args (or none with "
                              "num_attention_heads); pass "
                              "--num-attention-heads (and --num-query-groups / --kv-channels if used).")
    if saved is not None and saved.get("group_query_attention") is False and \
            not (overrides or {}).get("num_query_groups"):
        arch["num_query_groups"] = heads  # Megatron-LM keeps num_query_groups=1 when GQA is off
    kv_channels = arch.get("kv_channels") or inferred["attention_out"] // heads
    if inferred["attention_out"] != heads * kv_channels:
        raise ConversionError(f"linear_proj takes {inferred['attention_out']} inputs, not num_attention_heads x "
                              f"kv_channels = {heads} x {kv_channels}.")
    groups = arch.get("num_query_groups")
    implied = (inferred["qkv_rows"] // kv_channels - heads) // 2
    if groups is None:
        groups = implied
    if groups <= 0 or heads % groups or (heads + 2 * groups) * kv_channels != inferred["qkv_rows"]:
        raise ConversionError(f"linear_qkv has {inferred['qkv_rows']} rows, which does not fit {heads} heads, "
                              f"{groups} query groups and kv_channels {kv_channels}.")
    arch.update(num_query_groups=groups, kv_channels=kv_channels)
    if not arch.get("max_position_embeddings"):  # only a config field for RoPE models
        arch["max_position_embeddings"] = arch.get("seq_length") or 4096
    return arch


def _check_supported(arch: dict) -> str:
    """'llama' or 'gpt2', or a ConversionError naming what does not fit either."""
    for flag, what in (("qk_layernorm", "QK layernorm"), ("multi_latent_attention", "multi-latent attention"),
                       ("apply_residual_connection_post_layernorm", "post-layernorm residuals"),
                       ("rotary_interleaved", "interleaved RoPE"), ("squared_relu", "squared ReLU")):
        if arch[flag]:
            raise ConversionError(f"the model uses {what}; not supported by this converter.")
    if arch.get("num_experts"):
        raise ConversionError("mixture-of-experts models are not supported by this converter.")
    style = arch["position_embedding_type"]
    if arch["normalization"] == "RMSNorm" and arch["swiglu"] and style == "rope":
        if arch["rotary_percent"] != 1.0:
            raise ConversionError("rotary_percent < 1 (partial RoPE) has no LlamaForCausalLM equivalent.")
        return "llama"
    if arch["normalization"] == "LayerNorm" and not arch["swiglu"] and style == "learned_absolute":
        if arch["num_query_groups"] != arch["num_attention_heads"]:
            raise ConversionError("GPT-2 style conversion needs plain multi-head attention (no GQA).")
        if arch["kv_channels"] * arch["num_attention_heads"] != arch["hidden_size"]:
            raise ConversionError("GPT-2 style conversion needs kv_channels x heads == hidden_size.")
        return "gpt2"
    raise ConversionError(
        f"unsupported combination normalization={arch['normalization']}, swiglu={arch['swiglu']}, "
        f"position_embedding_type={style}: supported are RMSNorm+SwiGLU+RoPE (Llama) and "
        "LayerNorm+GeLU+learned_absolute (GPT-2).")


# ------------------------------------------------------------------------------------------ mapping

def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, d: int):
    """Megatron's fused QKV (per query group: its q heads, then k, then v) -> (q, k, v), HF head order."""
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, d, *qkv.shape[1:])
    q = grouped[:, :per_group].reshape(heads * d, *qkv.shape[1:])
    k = grouped[:, per_group].reshape(groups * d, *qkv.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * d, *qkv.shape[1:])
    return q, k, v


def _norm_weight(arch, w):
    return w + 1 if arch["apply_layernorm_1p"] else w


def _vocab(arch, glob):
    rows = arch["padded_vocab_size"]
    keep = arch.get("true_vocab_size") or rows
    if keep > rows:
        raise ConversionError(f"vocab size {keep} is larger than the checkpoint's {rows} embedding rows.")
    embed = glob["embedding.word_embeddings.weight"][:keep]
    head = glob["output_layer.weight"][:keep] if arch["untie_embeddings_and_output_weights"] else None
    return keep, embed, head


def llama_state_dict(arch: dict, glob, layers):
    from transformers import LlamaConfig

    heads, groups, d = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    ffn = arch["ffn_hidden_size"]
    vocab, embed, head = _vocab(arch, glob)
    attention_bias = arch["add_bias_linear"] or arch["add_qkv_bias"]
    rope = {"rope_type": "default", "rope_theta": float(arch["rotary_base"])}
    if arch["use_rope_scaling"]:  # Megatron-LM's Llama 3.1 scaling (apply_scaling defaults)
        rope = {"rope_type": "llama3", "rope_theta": float(arch["rotary_base"]),
                "factor": float(arch.get("rope_scaling_factor") or 8.0), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=arch["hidden_size"], intermediate_size=ffn,
        num_hidden_layers=arch["num_layers"], num_attention_heads=heads, num_key_value_heads=groups,
        head_dim=d, hidden_act="silu", max_position_embeddings=int(arch["max_position_embeddings"]),
        rms_norm_eps=float(arch["norm_epsilon"]), rope_parameters=rope,
        attention_bias=attention_bias, mlp_bias=arch["add_bias_linear"],
        tie_word_embeddings=not arch["untie_embeddings_and_output_weights"],
        bos_token_id=None, eos_token_id=None, architectures=["LlamaForCausalLM"])
    sd = {"model.embed_tokens.weight": embed,
          "model.norm.weight": _norm_weight(arch, glob["decoder.final_layernorm.weight"])}
    sd["lm_head.weight"] = head if head is not None else embed
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _norm_weight(arch, layer["self_attention.linear_qkv.layer_norm_weight"])
        sd[p + "post_attention_layernorm.weight"] = _norm_weight(arch, layer["mlp.linear_fc1.layer_norm_weight"])
        q, k, v = _split_qkv(layer["self_attention.linear_qkv.weight"], heads, groups, d)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": layer["self_attention.linear_proj.weight"]})
        gate, up = layer["mlp.linear_fc1.weight"].chunk(2, dim=0)
        sd.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": layer["mlp.linear_fc2.weight"]})
        if attention_bias:
            q, k, v = _split_qkv(layer["self_attention.linear_qkv.bias"], heads, groups, d)
            o = layer.get("self_attention.linear_proj.bias")
            sd.update({p + "self_attn.q_proj.bias": q, p + "self_attn.k_proj.bias": k,
                       p + "self_attn.v_proj.bias": v,
                       p + "self_attn.o_proj.bias": o if o is not None else torch.zeros_like(
                           layer["self_attention.linear_proj.weight"][:, 0])})
        if arch["add_bias_linear"]:
            gate_b, up_b = layer["mlp.linear_fc1.bias"].chunk(2)
            sd.update({p + "mlp.gate_proj.bias": gate_b, p + "mlp.up_proj.bias": up_b,
                       p + "mlp.down_proj.bias": layer["mlp.linear_fc2.bias"]})
    return config, sd


def gpt2_state_dict(arch: dict, glob, layers):
    from transformers import GPT2Config

    heads, h = arch["num_attention_heads"], arch["hidden_size"]
    vocab, embed, head = _vocab(arch, glob)
    config = GPT2Config(
        vocab_size=vocab, n_positions=int(arch["max_position_embeddings"]), n_embd=h,
        n_layer=arch["num_layers"], n_head=heads, n_inner=arch["ffn_hidden_size"],
        activation_function="gelu_new" if arch["openai_gelu"] else "gelu",
        layer_norm_epsilon=float(arch["norm_epsilon"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=not arch["untie_embeddings_and_output_weights"],
        bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"])

    def bias(layer, name, rows):
        b = layer.get(name)
        return b if b is not None else torch.zeros(rows, dtype=embed.dtype)

    sd = {"transformer.wte.weight": embed,
          "transformer.wpe.weight": glob["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": _norm_weight(arch, glob["decoder.final_layernorm.weight"]),
          "transformer.ln_f.bias": glob["decoder.final_layernorm.bias"]}
    sd["lm_head.weight"] = head if head is not None else embed
    for i, layer in enumerate(layers):
        p = f"transformer.h.{i}."
        q, k, v = _split_qkv(layer["self_attention.linear_qkv.weight"], heads, heads, h // heads)
        qkv_b = bias(layer, "self_attention.linear_qkv.bias", 3 * h)
        qb, kb, vb = _split_qkv(qkv_b, heads, heads, h // heads)
        ffn = arch["ffn_hidden_size"]
        sd.update({
            p + "ln_1.weight": _norm_weight(arch, layer["self_attention.linear_qkv.layer_norm_weight"]),
            p + "ln_1.bias": layer["self_attention.linear_qkv.layer_norm_bias"],
            p + "ln_2.weight": _norm_weight(arch, layer["mlp.linear_fc1.layer_norm_weight"]),
            p + "ln_2.bias": layer["mlp.linear_fc1.layer_norm_bias"],
            # GPT-2's Conv1D stores weights as [in, out]
            p + "attn.c_attn.weight": torch.cat([q, k, v]).t().contiguous(),
            p + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            p + "attn.c_proj.weight": layer["self_attention.linear_proj.weight"].t().contiguous(),
            p + "attn.c_proj.bias": bias(layer, "self_attention.linear_proj.bias", h),
            p + "mlp.c_fc.weight": layer["mlp.linear_fc1.weight"].t().contiguous(),
            p + "mlp.c_fc.bias": bias(layer, "mlp.linear_fc1.bias", ffn),
            p + "mlp.c_proj.weight": layer["mlp.linear_fc2.weight"].t().contiguous(),
            p + "mlp.c_proj.bias": bias(layer, "mlp.linear_fc2.bias", h),
        })
    return config, sd


# ------------------------------------------------------------------------------------------ writing

def _save_hf(config, state_dict, output_dir: str, dtype: torch.dtype) -> None:
    """Build the HF model on the meta device, assign the converted tensors, save_pretrained (safetensors)."""
    from transformers import AutoModelForCausalLM

    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise ConversionError(f"internal mapping error: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, buffer in model.named_buffers():
        if buffer.is_meta:  # non-persistent buffers (RoPE inv_freq, masks) are rebuilt on load
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = torch.empty(buffer.shape, dtype=buffer.dtype)
    model.save_pretrained(output_dir, safe_serialization=True)


def _copy_tokenizer(tokenizer: str, output_dir: str) -> bool:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).save_pretrained(output_dir)
    except (OSError, ValueError, TypeError) as exc:
        warnings.warn(f"could not copy the tokenizer from {tokenizer!r}: {exc}")
        return False
    return True


def convert_megatron_checkpoint(checkpoint_dir: str, output_dir: str, architecture: Optional[Mapping] = None,
                                iteration: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                                tokenizer: Optional[str] = None, allow_pickle: bool = False) -> str:
    """Convert a Megatron GPT checkpoint into a Hugging Face model directory; returns ``output_dir``.

    ``architecture``: Megatron-LM argument names (``num_attention_heads``, ``num_query_groups``,
    ``kv_channels``, ``norm_epsilon``, ``rotary_base``, ``normalization``, ``swiglu``, ...) that override the
    checkpoint's saved ``args``; ``vocab_size`` there is the true vocabulary size to trim the padded
    embedding/output rows to (default: keep all rows). ``dtype``: weights' dtype in the output (default: as
    stored). ``tokenizer``: a Hugging Face tokenizer directory to save alongside (default: the saved args'
    ``tokenizer_model`` when it is a local directory).
    """
    directory = resolve_iteration_dir(checkpoint_dir, iteration)
    common = load_common_state(directory, allow_pickle=allow_pickle)
    saved = saved_args(common)
    tensors = load_model_tensors(directory)
    glob, layers = split_layers(tensors)
    _unsupported(layers)
    overrides = dict(architecture or {})
    true_vocab = overrides.pop("vocab_size", None)
    if saved is not None:
        saved.pop("vocab_size", None)  # Megatron-LM's --vocab-size is a NullTokenizer setting, not a trim
    arch = resolve_architecture(infer_architecture(glob, layers), saved, overrides)
    arch["true_vocab_size"] = true_vocab
    family = _check_supported(arch)
    config, state_dict = (llama_state_dict if family == "llama" else gpt2_state_dict)(arch, glob, layers)
    out_dtype = dtype or glob["embedding.word_embeddings.weight"].dtype
    os.makedirs(output_dir, exist_ok=True)
    _save_hf(config, state_dict, output_dir, out_dtype)
    tokenizer = tokenizer or ((saved or {}).get("tokenizer_model")
                              if (saved or {}).get("tokenizer_type") == "HuggingFaceTokenizer" else None)
    if tokenizer and os.path.isdir(tokenizer):
        _copy_tokenizer(tokenizer, output_dir)
    with open(os.path.join(output_dir, "megatron_conversion.json"), "w") as f:
        json.dump({"source": os.path.abspath(directory), "iteration": common.get("iteration"),
                   "family": family, "architecture": {k: v for k, v in arch.items()
                                                      if isinstance(v, (int, float, str, bool, type(None)))}},
                  f, indent=2, sort_keys=True)
    return output_dir


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_let.teachers.megatron_checkpoint", allow_abbrev=False,
        description="Convert a Megatron GPT checkpoint (torch_dist) into a Hugging Face model directory "
                    "usable as --let-teacher. Architecture comes from the checkpoint's saved args; flags "
                    "override it (Megatron-LM flag names).")
    p.add_argument("--load", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) "
                                                 "or an iter_* directory")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the latest)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="output weight dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory to save alongside")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle common.pt fully (only for trusted checkpoints) if the safe load fails")
    g = p.add_argument_group("architecture (override or replace the saved args)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--rotary-percent", type=float)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--openai-gelu", action="store_true", default=None)
    g.add_argument("--apply-layernorm-1p", action="store_true", default=None)
    g.add_argument("--vocab-size", type=int,
                   help="true vocabulary size: trim the padded embedding/output rows to it (default: keep all)")
    return p


ARCH_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "normalization", "norm_epsilon", "swiglu", "position_embedding_type", "rotary_base",
              "rotary_percent", "max_position_embeddings", "untie_embeddings_and_output_weights", "openai_gelu",
              "apply_layernorm_1p", "vocab_size")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    architecture = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    try:
        out = convert_megatron_checkpoint(args.load, args.output, architecture, iteration=args.iteration,
                                          dtype=dtype, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}; use it with --let-teacher {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
