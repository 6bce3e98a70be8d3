"""Log-likelihood ranking of multiple-choice items and the accuracies OLMo reports.

Every choice is scored by the summed log-probability of its continuation tokens given its context (both
tokenized separately and concatenated, as OLMo does; contexts truncated from the left to the model's
window). ``acc`` ranks raw log-likelihoods, ``acc_per_char`` divides by the continuation's characters
(OLMo's ``len_norm``, the paper's number), ``acc_per_token`` by its tokens.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from megatron_let.evaluation.tasks import Item

# ------------------------------------------------------------------------------------------ scoring

def context_prefix(tokenizer) -> List[int]:
    """The special tokens the tokenizer itself puts before a text (e.g. Llama's BOS; none for GPT-2 BPE)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_pair(tokenizer, prefix: Sequence[int], context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Context and continuation tokenized separately (as OLMo does), so every choice's tokens are the same
    whatever context precedes them."""
    ctx = list(prefix) + tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    if not ctx or not cont:
        raise ValueError(f"empty context or continuation: {context!r} / {continuation!r}")
    return ctx, cont


def model_input(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> Tuple[List[int], int]:
    """Tokens fed to the model (context + continuation minus its last token, cut from the left to fit) and
    how many continuation tokens are scored: all of them unless the continuation alone overflows the
    window (short-context models), then its last ones."""
    tokens = (list(ctx) + list(cont))[:-1][-max_length:]
    return tokens, min(len(cont), len(tokens))


def max_context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def _score_batch(model, batch: Sequence[Tuple[List[int], List[int]]], max_length: int) -> List[float]:
    import torch

    inputs, scored = zip(*(model_input(ctx, cont, max_length) for ctx, cont in batch))
    width = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding; its logits are never read
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for row, x in enumerate(inputs):
        ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    scores = []
    for row, (x, n, (_, cont)) in enumerate(zip(inputs, scored, batch)):
        log_probs = torch.log_softmax(logits[row, len(x) - n:len(x)].float(), dim=-1)
        scores.append(log_probs.gather(1, torch.tensor(cont[len(cont) - n:]).unsqueeze(1)).sum().item())
    return scores


def score_requests(model, requests: Sequence[Tuple[List[int], List[int]]], batch_size: int = 16,
                   max_length: Optional[int] = None) -> List[float]:
    """log p(continuation | context) summed over the continuation tokens, per (ctx_ids, cont_ids) request.
    Longest first, so batches carry little padding; the result is in request order."""
    import torch

    max_length = max_length or max_context_length(model)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]), i))
    scores = [0.0] * len(requests)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, score in zip(chunk, _score_batch(model, [requests[i] for i in chunk], max_length)):
                scores[i] = score
    return scores


def score_items(model, tokenizer, items: Sequence[Item], batch_size: int = 16,
                max_length: Optional[int] = None) -> Tuple[List[List[float]], List[List[int]]]:
    """Per item, the log-likelihood of each choice and its continuation's token count."""
    prefix = context_prefix(tokenizer)
    requests = [encode_pair(tokenizer, prefix, ctx, cont)
                for item in items for ctx, cont in zip(item.contexts, item.continuations)]
    flat = score_requests(model, requests, batch_size, max_length)
    lls, tokens, at = [], [], 0
    for item in items:
        k = len(item.continuations)
        lls.append(flat[at:at + k])
        tokens.append([len(cont) for _, cont in requests[at:at + k]])
        at += k
    return lls, tokens


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties


def choice_metrics(items: Sequence[Item], lls: Sequence[Sequence[float]],
                   tokens: Sequence[Sequence[int]]) -> dict:
    """acc (raw), acc_per_char (OLMo's len_norm), acc_per_token, n and chance for scored items."""
    hits = {"acc": 0, "acc_per_char": 0, "acc_per_token": 0}
    for item, ll, tok in zip(items, lls, tokens):
        per_char = [v / len(c) for v, c in zip(ll, item.continuations)]
        per_token = [v / t for v, t in zip(ll, tok)]
        hits["acc"] += _argmax(ll) == item.gold
        hits["acc_per_char"] += _argmax(per_char) == item.gold
        hits["acc_per_token"] += _argmax(per_token) == item.gold
    n = len(items)
    chance = sum(1 / len(item.continuations) for item in items) / n if n else float("nan")
    return {"n": n, **{k: (v / n if n else float("nan")) for k, v in hits.items()}, "chance": chance}


def evaluate_items(model, tokenizer, items: Sequence[Item], batch_size: int = 16,
                   max_length: Optional[int] = None) -> dict:
    lls, tokens = score_items(model, tokenizer, items, batch_size, max_length)
    return choice_metrics(items, lls, tokens)

