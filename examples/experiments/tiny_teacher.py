"""A tiny Hugging Face Llama teacher trained on a Megatron indexed corpus with a plain PyTorch loop.

The quickstart and the convergence benchmark need a "late", knowledgeable teacher that reads the
target's token ids: trained on the same corpus with the same tokenizer, on more tokens than the
target will see, and saved with ``save_pretrained`` (plus the tokenizer) like any hub teacher.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class TinyTeacherRecipe:
    layers: int = 3
    hidden: int = 128
    heads: int = 4
    steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    seq_length: int = 128
    split: str = "95,5,0"
    seed: int = 1234

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_length

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_at(dataset, first: int, batch_size: int) -> dict:
    """``batch_size`` consecutive samples of a GPTDataset from ``first`` (wrapping around)."""
    import torch

    samples = [dataset[(first + i) % len(dataset)] for i in range(batch_size)]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def lm_loss(model, batch):
    """Loss-masked mean next-token cross entropy, as Megatron computes it."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["tokens"]).logits.float()
    losses = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), reduction="none")
    mask = batch["loss_mask"].view(-1).float()
    return (losses * mask).sum() / mask.sum()


def validation_loss(model, valid, batches: int, batch_size: int) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, batch_at(valid, b * batch_size, batch_size)).item() for b in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def train_tiny_teacher(recipe: TinyTeacherRecipe, data_prefix: str, tokenizer_dir: str, out: Path,
                       log: Callable[[str], None] = print) -> dict:
    """Train per ``recipe`` on the corpus at ``data_prefix`` and save model + tokenizer to ``out``.

    Returns ``params``, ``tokens``, ``val_loss`` and ``val_samples``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_let.data.datasets import build_gpt_datasets

    r = recipe
    train, valid, _ = build_gpt_datasets(data_prefix, r.seq_length, r.split, r.steps * r.batch_size, None, r.seed,
                                         tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(r.seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=r.hidden,
                         intermediate_size=int(8 * r.hidden / 3 / 32 + 0.5) * 32,
                         num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.heads,
                         max_position_embeddings=r.seq_length, tie_word_embeddings=False,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    log(f"Llama {r.layers} layers x {r.hidden} ({params / 1e6:.2f}M params): {r.steps} steps x {r.batch_size} x "
        f"{r.seq_length} = {r.tokens:,} tokens")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.95))
    warmup, report = max(1, r.steps // 20), max(1, r.steps // 10)
    model.train()
    running, t_loop = [], time.time()
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, r.steps, r.lr, warmup)
        loss = lm_loss(model, batch_at(train, step * r.batch_size, r.batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % report == 0 or step + 1 == r.steps:
            log(f"  [teacher] step {step + 1:5d}/{r.steps} | train loss {sum(running) / len(running):.3f} | "
                f"{(time.time() - t_loop) / (step + 1):.2f} s/step")
            running = []
    val_batches = max(1, min(8, len(valid) // r.batch_size))
    val = validation_loss(model, valid, val_batches, r.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    tok.save_pretrained(out)  # LET checks that the teacher reads the same token ids as the target
    return {"params": params, "tokens": r.tokens, "val_loss": val, "val_samples": val_batches * r.batch_size}
