"""The frozen teacher: a Hugging Face model (directory or GGUF file) that returns hidden states."""

from __future__ import annotations

import copy
import functools
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_let.config import LETConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_teacher_dtype(name: str) -> torch.dtype:
    """``auto`` means bf16 where a GPU runs the teacher, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class TeacherSource:
    """Where a Hugging Face teacher lives: a model directory, optionally a GGUF file in it."""

    directory: str
    gguf_file: Optional[str] = None

    @property
    def kwargs(self) -> dict:
        return {"local_files_only": True, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}

    def config(self):
        """The teacher's config (a copy). Parsed once per file version: a GGUF file's metadata, its
        tokenizer arrays included, takes seconds to parse, and start-up asks several times."""
        stamp = os.stat(os.path.join(self.directory, self.gguf_file or "config.json")).st_mtime_ns
        return copy.deepcopy(_parsed_config(self, stamp))

    def tokenizer(self):
        """The teacher's own tokenizer, or None when the directory ships none."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory, **self.kwargs)
        except (OSError, ValueError, TypeError):
            return None


@functools.lru_cache(maxsize=8)
def _parsed_config(source: TeacherSource, stamp: int):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.directory, **source.kwargs)


def resolve_teacher(path: str) -> TeacherSource:
    """Accept a save_pretrained directory, a .gguf file, or a directory holding one .gguf file."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return TeacherSource(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return TeacherSource(path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return TeacherSource(path, ggufs[0])
        if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
            raise LETConfigError(
                f"--let-teacher {path!r} is a Megatron checkpoint; convert it once with "
                f"'python -m megatron_let.teachers.megatron_checkpoint --load {path} --output DIR' and pass DIR.")
    raise LETConfigError(
        f"--let-teacher {path!r} is not a Hugging Face model directory (no config.json) nor a .gguf file; "
        "point it at a directory written by save_pretrained.")


def teacher_max_positions(config) -> Optional[int]:
    """How many positions the teacher was trained for (None: its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def preflight_teacher(path: str, teacher_layer: Optional[int] = None, seq_length: Optional[int] = None,
                      token_alignment: str = "exact", warn=None, allow_bidirectional: bool = False) -> "object":
    """Everything about the teacher that can be checked without loading it; returns its config.

    Catches a wrong path, an unreadable or corrupt config or weight file, weights whose names or shapes
    do not match the config (which transformers would fill with random values), a context shorter than
    ``seq_length``, a --let-teacher-layer the teacher does not have and a bidirectional teacher
    (megatron_let/teachers/causality.py), in seconds instead of at the first training step on some
    rank. ``warn(message)`` receives what runs but deserves a word.
    """
    source = resolve_teacher(path)
    try:
        config = source.config()
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise LETConfigError(f"--let-teacher {path!r}: cannot read its config ({type(error).__name__}: "
                             f"{error}); re-save the model with save_pretrained.") from None
    check_causal(config, path, allow_bidirectional, warn)
    stored = (_stored_tensor_shapes(source.directory, path) if source.gguf_file is None
              else _gguf_tensor_shapes(source, config))
    if stored is not None:
        check_stored_weights(source, config, stored, path)
    layers = config.num_hidden_layers
    if teacher_layer is not None and not -(layers + 1) <= teacher_layer <= layers:
        raise LETConfigError(f"--let-teacher-layer {teacher_layer} does not exist: the teacher's hidden_states "
                             f"go from 0 (embeddings) to {layers} (final); omit the flag for the final layer.")
    if seq_length is not None:
        message = check_context_length(config, seq_length, token_alignment, path)
        if message and warn:
            warn(message)
    return config


def check_causal(config, path: str, allow_bidirectional: bool, warn=None) -> None:
    """Refuse a bidirectional teacher unless --let-allow-bidirectional-teacher says it is meant."""
    from megatron_let.teachers.causality import bidirectional_reason

    reason = bidirectional_reason(config)
    if reason is None:
        return
    if allow_bidirectional:
        if warn:
            warn(f"--let-teacher {path!r} is not a causal decoder ({reason}); aligning to it anyway "
                 "(--let-allow-bidirectional-teacher): its state at t has seen later tokens.")
        return
    raise LETConfigError(
        f"--let-teacher {path!r} is not a causal decoder ({reason}); LET aligns the target's causal layer k at "
        "position t to the teacher's state at t, which must not have seen later tokens: use a causal decoder "
        "(e.g. a *ForCausalLM model), or pass --let-allow-bidirectional-teacher to align to it on purpose.")


# -- context length -------------------------------------------------------------------------------------

_ROTARY_ATTRS = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base", "rotary_dim")


def uses_rotary_positions(config) -> bool:
    """Rotary (RoPE) teachers run past their trained length (worse); learned/absolute ones cannot."""
    if str(getattr(config, "position_embedding_type", "")).lower() in ("rotary", "rope"):
        return True
    return any(getattr(config, name, None) is not None for name in _ROTARY_ATTRS)


def check_context_length(config, seq_length: int, token_alignment: str, path: str) -> Optional[str]:
    """Raise for a teacher with learned positions shorter than ``--seq-length`` (it would fail with an
    IndexError at the first step); return a warning for a rotary one used beyond its trained length."""
    limit = teacher_max_positions(config)
    if limit is None or seq_length <= limit:
        return None
    stored = config.to_dict()  # the name in the teacher's config.json (GPT-2: n_positions)
    name = next((n for n in ("n_positions", "max_position_embeddings", "max_sequence_length")
                 if stored.get(n) == limit), "max_position_embeddings")
    if token_alignment != "exact":  # causal-span(-matched): the aligner cuts teacher rows at the teacher's context
        return (f"--let-teacher {path!r} reads at most {limit} tokens ({name}) of each --seq-length {seq_length} "
                "sequence: target positions aligned to later teacher tokens are left out of the alignment loss.")
    if uses_rotary_positions(config):
        return (f"--let-teacher {path!r} was trained for {limit} positions ({name}) but --seq-length "
                f"{seq_length} runs it {seq_length - limit} positions ({seq_length / limit:.1f}x) beyond that "
                "(rotary positions extrapolate poorly); use a shorter --seq-length or a longer-context teacher.")
    raise LETConfigError(f"--let-teacher {path!r} has learned positions for {limit} tokens ({name}) but "
                         f"--seq-length is {seq_length}; it cannot read a full sequence. Use --seq-length <= {limit}, "
                         "a teacher with a longer context, or --let-token-alignment causal-span (which cuts the "
                         "teacher's rows at its context).")


# -- weights vs config ----------------------------------------------------------------------------------


def _stored_tensor_shapes(directory: str, path: str) -> Optional[dict]:
    """{tensor name: shape} of the weight files (headers only; .bin through mmap), or None when they
    cannot be read cheaply (the check then happens when the teacher loads)."""
    from safetensors import safe_open

    names = os.listdir(directory)
    files = [f for f in names if f.endswith(".safetensors")]
    if not files and not any(f.endswith(".bin") for f in names):
        raise LETConfigError(f"--let-teacher {path!r} has a config but no weights (*.safetensors or *.bin).")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        import json

        try:
            with open(index) as handle:
                listed = set(json.load(handle)["weight_map"].values())
        except Exception as error:  # noqa: BLE001
            raise LETConfigError(f"--let-teacher {path!r}: model.safetensors.index.json is unreadable ({error}); "
                                 "re-save the teacher with save_pretrained.") from None
        absent = sorted(f for f in listed if f not in names)
        if absent:
            raise LETConfigError(f"--let-teacher {path!r}: model.safetensors.index.json names {len(absent)} weight "
                                 f"file(s) that are not there ({absent[0]}, ...); copy the whole directory.")
        files = sorted(listed)
    shapes = {}
    for name in files:
        try:
            with safe_open(os.path.join(directory, name), "pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:  # noqa: BLE001
            raise LETConfigError(f"--let-teacher {path!r}: weight file {name} is unreadable or corrupt "
                                 f"({error}); re-download or re-save the teacher.") from None
    if files:
        return shapes
    for name in sorted(f for f in names if f.endswith(".bin")):
        try:
            state = torch.load(os.path.join(directory, name), map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # noqa: BLE001 - legacy (non-zip) files: checked when the teacher loads
            return None
        shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


def _gguf_tensor_shapes(source: "TeacherSource", config) -> Optional[dict]:
    """{base-model tensor name: shape} of a GGUF file's tensors (its header only: no dequantising), named
    through gguf's own HF -> GGUF name table; None when that table cannot name every tensor of the model
    (an architecture gguf does not know, or transformers' conversion merges tensors): checked at load."""
    try:
        import gguf

        expected, prefix = _expected_tensor_shapes(config)
        arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == config.model_type)
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        in_file = {t.name: tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
                   for t in gguf.GGUFReader(os.path.join(source.directory, source.gguf_file)).tensors}
    except Exception:  # noqa: BLE001 - no gguf package, unknown architecture, unreadable header: checked at load
        return None
    stored = {}
    for key in expected:
        module, _, suffix = key.rpartition(".")
        gguf_name = names.get_name(f"{prefix}.{module}" if prefix else module)
        if gguf_name is None:
            return None
        if f"{gguf_name}.{suffix}" in in_file:
            stored[key] = in_file[f"{gguf_name}.{suffix}"]
    return stored


def _expected_tensor_shapes(config) -> tuple:
    """The base model's (what AutoModel builds: no LM head) {name: shape}, built on the meta device."""
    from transformers import AutoModel

    with _quiet_transformers(), torch.device("meta"):
        model = AutoModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model.base_model_prefix


def check_stored_weights(source: "TeacherSource", config, stored: dict, path: str) -> None:
    """Refuse weights that do not fill the model the config describes. A causal LM's checkpoint holds
    the base model under ``base_model_prefix`` plus its head (LM head, tied or not): the head is not
    needed. Any other gap is confirmed with transformers' own loading report before refusing, so a
    renaming transformers does itself (legacy names, conversion mappings) is never refused."""
    try:
        expected, prefix = _expected_tensor_shapes(config)
    except Exception:  # noqa: BLE001 - a model class transformers cannot build on meta: checked at load
        return
    if prefix and any(k.startswith(prefix + ".") for k in stored):
        stored = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + ".")}
    missing = [k for k in expected if k not in stored]
    mismatched = [k for k in expected if k in stored and stored[k] != expected[k]]
    if not missing and not mismatched:
        return
    teacher = load_base_model(source, torch.float32, path)  # confirm with transformers (the rare bad case)
    del teacher


def loading_problem(info: dict, model_class: str, path: str) -> Optional[str]:
    """The one-line refusal for transformers' loading report, or None when nothing was repaired.
    Unexpected tensors alone (an LM head, a value head) are ignored: they leave nothing random."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    if not missing and not mismatched:
        return None
    examples = "; ".join(part for part in (
        f"missing e.g. {missing[0]!r}" if missing else "",
        f"mis-shaped e.g. {mismatched[0]!r}" if mismatched else "",
        f"unexpected e.g. {unexpected[0]!r}" if unexpected else "") if part)
    return (f"--let-teacher {path!r}: its weights do not match its config ({model_class}): {len(missing)} "
            f"tensor(s) missing, {len(mismatched)} mis-shaped, {len(unexpected)} unexpected ({examples}); "
            "transformers would fill them with random values. Re-save the teacher with save_pretrained from "
            "the model class its config names, or fix the tensor names of the conversion.")


class _quiet_transformers:
    """transformers' loading chatter off (the skipped LM head is intended); restored after."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._logging = hf_logging
        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self._logging.set_verbosity(self._verbosity)
        self._logging.enable_progress_bar()
        return False


def load_base_model(source: "TeacherSource", dtype: torch.dtype, path: str):
    """``AutoModel.from_pretrained`` (no LM head) that refuses, with one line, whatever transformers
    would silently repair: tensors missing from the files or of another shape (randomly initialised)."""
    from transformers import AutoModel

    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(source.directory, dtype=dtype, output_loading_info=True,
                                                ignore_mismatched_sizes=True, **source.kwargs)
    problem = loading_problem(info, type(model).__name__, path)
    if problem:
        raise LETConfigError(problem)
    return model


def output_width(config, layer: Optional[int] = None) -> int:
    """Width of the states we align to: OPT models with ``project_out`` end at ``word_embed_proj_dim``."""
    final = layer is None or layer in (-1, config.num_hidden_layers)
    projected = getattr(config, "word_embed_proj_dim", None)
    return projected if final and projected else config.hidden_size


def teacher_hidden_size(path: str, layer: Optional[int] = None) -> int:
    """The teacher's output width, read from its config only (cheap; no weights)."""
    return output_width(resolve_teacher(path).config(), layer)


def decoder_blocks(model) -> Optional[torch.nn.ModuleList]:
    """The model's list of transformer blocks (``layers``, ``h``, ``decoder.layers``...): the one
    ModuleList as long as ``num_hidden_layers``; None when that is ambiguous."""
    count = getattr(model.config, "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return found[0] if len(found) == 1 else None


def truncate_after(model, layer: Optional[int]) -> Optional[torch.nn.ModuleList]:
    """For an intermediate ``--let-teacher-layer`` (1 <= layer < num_hidden_layers), drop the blocks
    after it (their weights are never used: memory, and their compute, saved); returns the kept blocks,
    or None when the full model runs (final layer, embeddings, or blocks not found)."""
    count = model.config.num_hidden_layers
    if layer is not None and layer < 0:
        layer += count + 1
    blocks = decoder_blocks(model)
    if layer is None or not 1 <= layer < count or blocks is None:
        return None
    del blocks[layer:]
    return blocks


class _Stop(Exception):
    """Raised by the hook on the last kept block: the rest of the forward is not needed."""


def _run_until(block: torch.nn.Module, run) -> torch.Tensor:
    """``run()`` up to ``block``'s output (the residual stream after it, as in ``hidden_states``)."""
    captured = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the LET teacher's forward never reached block --let-teacher-layer")
    return captured[0]


class HFTeacher:
    """A frozen Hugging Face causal LM used only for its hidden states.

    The LM head is never loaded (``AutoModel`` builds the base model), no
    autograd graph is recorded, and ``release()`` frees the weights for good.
    It is deliberately not an ``nn.Module``: it must stay out of the target's
    parameters, optimizer, DDP buffers and checkpoints.
    """

    def __init__(self, path: str, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, layer: Optional[int] = None):
        self.source = resolve_teacher(path)
        self.layer = layer
        device = device or (torch.device("cuda", torch.cuda.current_device())
                            if torch.cuda.is_available() else torch.device("cpu"))
        model = load_base_model(self.source, dtype, path)
        self._blocks = truncate_after(model, layer)
        self.model = model.to(device).eval().requires_grad_(False)
        self.hidden_size = output_width(self.model.config, layer)
        self.device = device

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens`` [b, s] -> hidden states [s, b, h_T] (Megatron's layout), teacher dtype.

        ``attention_mask`` [b, s] marks right padding (re-tokenized causal-span micro-batches).
        """
        if self.model is None:
            raise RuntimeError("the LET teacher was released; it is not available after the stop step")
        mask = None if attention_mask is None else attention_mask.to(self.device)
        run = lambda **extra: self.model(input_ids=tokens.to(self.device), attention_mask=mask,  # noqa: E731
                                         use_cache=False, **extra)
        if self._blocks is not None:  # stop after block --let-teacher-layer: later blocks were dropped
            hidden = _run_until(self._blocks[-1], run)
        elif self.layer is None:
            hidden = run().last_hidden_state
        else:
            hidden = run(output_hidden_states=True).hidden_states[self.layer]
        return hidden.transpose(0, 1).contiguous()

    def release(self) -> None:
        """Drop the weights and return the memory (GPU caches included)."""
        self.model = self._blocks = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
