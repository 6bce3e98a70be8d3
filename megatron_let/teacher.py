"""The frozen teacher: loads a Hugging Face model directory and returns its hidden states."""

from __future__ import annotations

import gc
import os
from typing import Optional

import torch

from megatron_let.config import LETConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_teacher_dtype(name: str) -> torch.dtype:
    """``auto`` means bf16 where a GPU runs the teacher, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[name]


def teacher_hidden_size(path: str) -> int:
    """The teacher's width, read from its config only (cheap; no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_check_dir(path), local_files_only=True).hidden_size


def _check_dir(path: str) -> str:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise LETConfigError(
            f"--let-teacher {path!r} is not a Hugging Face model directory (no config.json); "
            "point it at a directory written by save_pretrained."
        )
    return path


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

        self.path = _check_dir(path)
        self.layer = layer
        device = device or (torch.device("cuda", torch.cuda.current_device())
                            if torch.cuda.is_available() else torch.device("cpu"))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the skipped LM head is intended, not worth a warning
        try:
            model = AutoModel.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model = model.to(device).eval().requires_grad_(False)
        self.hidden_size = self.model.config.hidden_size
        self.device = device

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b, s] -> hidden states [s, b, h_T] (Megatron's layout), teacher dtype."""
        if self.model is None:
            raise RuntimeError("the LET teacher was released; it is not available after the stop step")
        outputs = self.model(input_ids=tokens.to(self.device), use_cache=False,
                             output_hidden_states=self.layer is not None)
        hidden = outputs.last_hidden_state if self.layer is None else outputs.hidden_states[self.layer]
        return hidden.transpose(0, 1).contiguous()

    def release(self) -> None:
        """Drop the weights and return the memory (GPU caches included)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
