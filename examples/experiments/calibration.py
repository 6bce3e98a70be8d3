"""How fast is this machine, now? A few timed training steps, to turn a plan into an expected duration.

CPU speed differs several-fold between machines (cores, math libraries, other jobs sharing them), so a
fixed "expected N minutes" is wrong somewhere. ``time_llama_step`` times real AdamW steps of a Hugging
Face Llama of a given shape on random tokens, on this machine, with the thread count the real run will
use; the quickstart scales those seconds by its stages' step counts.
"""

from __future__ import annotations

import statistics
import time


def time_llama_step(layers: int, hidden: int, heads: int, vocab: int, batch: int, seq: int, steps: int = 2,
                    threads: int = 0, forward_only: bool = False) -> float:
    """Median seconds of one training step (forward, backward, AdamW; ``forward_only``: a no-grad forward)
    after one untimed warm-up step. ``threads`` > 0 sets torch's intra-op threads for the measurement."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(8 * hidden / 3 / 32 + 0.5) * 32,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=seq, tie_word_embeddings=False)
        generator = torch.Generator().manual_seed(0)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            if forward_only:
                with torch.no_grad():
                    model(input_ids=tokens)
            else:
                logits = model(input_ids=tokens).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), tokens.view(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(previous)
        hf_logging.set_verbosity(verbosity)
