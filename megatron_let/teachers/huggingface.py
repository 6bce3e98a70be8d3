"""The frozen teacher: a Hugging Face model (directory or GGUF file) that returns hidden states."""

from __future__ import annotations

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
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.directory, **self.kwargs)

    def tokenizer(self):
        """The teacher's own tokenizer, or None when the directory ships none."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory, **self.kwargs)
        except (OSError, ValueError, TypeError):
            return None


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


def preflight_teacher(path: str, teacher_layer: Optional[int] = None) -> "object":
    """Everything about the teacher that can be checked without loading it; returns its config.

    Catches a wrong path, an unreadable or corrupt config or weight file, and a
    --let-teacher-layer the teacher does not have, in seconds instead of at the
    first training step on some rank.
    """
    source = resolve_teacher(path)
    try:
        config = source.config()
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise LETConfigError(f"--let-teacher {path!r}: cannot read its config ({type(error).__name__}: "
                             f"{error}); re-save the model with save_pretrained.") from None
    if source.gguf_file is None:
        _check_safetensors(source.directory, path)
    layers = config.num_hidden_layers
    if teacher_layer is not None and not -(layers + 1) <= teacher_layer <= layers:
        raise LETConfigError(f"--let-teacher-layer {teacher_layer} does not exist: the teacher's hidden_states "
                             f"go from 0 (embeddings) to {layers} (final); omit the flag for the final layer.")
    return config


def _check_safetensors(directory: str, path: str) -> None:
    from safetensors import safe_open

    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    if not files and not any(f.endswith(".bin") for f in os.listdir(directory)):
        raise LETConfigError(f"--let-teacher {path!r} has a config but no weights (*.safetensors or *.bin).")
    for name in files:
        try:
            with safe_open(os.path.join(directory, name), "pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001
            raise LETConfigError(f"--let-teacher {path!r}: weight file {name} is unreadable or corrupt "
                                 f"({error}); re-download or re-save the teacher.") from None


def output_width(config, layer: Optional[int] = None) -> int:
    """Width of the states we align to: OPT models with ``project_out`` end at ``word_embed_proj_dim``."""
    final = layer is None or layer in (-1, config.num_hidden_layers)
    projected = getattr(config, "word_embed_proj_dim", None)
    return projected if final and projected else config.hidden_size


def teacher_hidden_size(path: str, layer: Optional[int] = None) -> int:
    """The teacher's output width, read from its config only (cheap; no weights)."""
    return output_width(resolve_teacher(path).config(), layer)


class HFTeacher:
    """A frozen Hugging Face causal LM used only for its hidden states.

    The LM head is never loaded (``AutoModel`` builds the base model), no
    autograd graph is recorded, and ``release()`` frees the weights for good.
    It is deliberately not an ``nn.Module``: it must stay out of the target's
    parameters, optimizer, DDP buffers and checkpoints.
    """

    def __init__(self, path: str, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, layer: Optional[int] = None):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.source = resolve_teacher(path)
        self.layer = layer
        device = device or (torch.device("cuda", torch.cuda.current_device())
                            if torch.cuda.is_available() else torch.device("cpu"))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the skipped LM head is intended, not worth a warning
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(self.source.directory, dtype=dtype, **self.source.kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
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
        outputs = self.model(input_ids=tokens.to(self.device), attention_mask=mask, use_cache=False,
                             output_hidden_states=self.layer is not None)
        hidden = outputs.last_hidden_state if self.layer is None else outputs.hidden_states[self.layer]
        return hidden.transpose(0, 1).contiguous()

    def release(self) -> None:
        """Drop the weights and return the memory (GPU caches included)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
