"""Causal-span token alignment: a teacher whose tokenizer differs from the target's.

With ``--let-token-alignment causal-span`` the teacher reads the *text* of the
target's micro-batch, tokenized with its own tokenizer, and every target
position ``i`` is aligned to the teacher position ``j`` whose token ends last
at or before the end of target token ``i`` (in bytes of the text).  The
teacher state used at ``i`` has therefore never seen text beyond what the
target has seen at ``i`` (causality).  Positions without such a teacher token
(or whose teacher token was truncated away) are masked out of the loss.
Inside a longer teacher token that state is one teacher token stale;
``causal-span-matched`` masks those positions too and aligns only where a
teacher token ends exactly where the target token ends.

Choices (all deterministic functions of the token ids, so every TP/PP/CP
rank computes the same alignment):

* Text.  Each target id maps to its bytes (byte-level BPE: the GPT-2 byte
  alphabet; SentencePiece-style: ``▁`` -> space, ``<0xNN>`` -> byte); a
  token may be a partial UTF-8 character, so all ends are computed on bytes.
  Special tokens other than EOD contribute no text.  Bytes that are not valid
  UTF-8 (a window starting or ending inside a character) reach the teacher as
  one U+FFFD each; a teacher token ending inside such a replacement counts as
  ending after the original byte (conservative).
* Documents.  The sequence is split at the target's EOD id; every segment is
  tokenized on its own (no teacher token straddles a document boundary) and
  the teacher row is the concatenation ``[BOS] seg_0 EOS [BOS] seg_1 ...`` --
  the packed layout the teacher was pretrained on; BOS only for teachers
  whose tokenizer prepends one.  Like the target (whose attention crosses EOD
  unless --reset-attention-mask), the teacher attends across the separator.
  A target EOD position is aligned to the teacher's EOS for that boundary
  (both have seen the same text and the boundary).  BOS tokens carry no text
  and are never alignment targets.
* Length.  Teacher rows longer than the teacher's ``max_position_embeddings``
  are truncated at the end; target positions whose aligned teacher token was
  cut off are masked out (no stale, earlier teacher state is substituted).
  Rows are right-padded to a common length with an attention mask.
* Identical vocabularies reduce to the identity map (the target's own ids go
  to the teacher, ``index = arange``, ``valid`` all True): the exact mode.

The text work runs off the critical path: ``AlignmentPrefetcher`` wraps the
lean trainer's micro-batch iterator and computes it in a background thread a
few micro-batches ahead (the batch gets ``let_*`` keys); when a batch has no
such keys (e.g. Megatron-LM's own get_batch) the hook computes it itself.
"""

from __future__ import annotations

import collections
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_let.errors import LETConfigError
from megatron_let.data.byte_level import bytes_to_unicode

BATCH_KEYS = ("let_teacher_tokens", "let_teacher_attention_mask", "let_index", "let_valid")
_PROBE = "Hello world,  naïve café\n\tdéjà vu: 東京 🙂 x2=3.14; END"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenAlignment(NamedTuple):
    """One micro-batch's alignment (CPU tensors)."""

    teacher_tokens: torch.Tensor  # [b, s_T] int64, right-padded
    teacher_attention_mask: torch.Tensor  # [b, s_T] int64, 1 = real token
    index: torch.Tensor  # [b, s] int64 into s_T (0 where not valid)
    valid: torch.Tensor  # [b, s] bool


# ------------------------------------------------------------------------------------ byte tables
def _component_types(spec) -> List[str]:
    if not spec:
        return []
    found = [spec.get("type")]
    for key in ("decoders", "pretokenizers", "normalizers"):
        for sub in spec.get(key) or []:
            found += _component_types(sub)
    return found


def backend_of(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face (fast) tokenizer, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    return backend


class ByteTable:
    """``id -> bytes`` of one tokenizer's tokens (special tokens: no bytes), with a round-trip check."""

    def __init__(self, tokenizer):
        backend = backend_of(tokenizer)
        if backend is None:
            raise LETConfigError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; causal-span "
                                 "alignment needs one (AutoTokenizer.from_pretrained(..., use_fast=True)).")
        spec = json.loads(backend.to_str())
        decoders = _component_types(spec.get("decoder"))
        size = backend.get_vocab_size(with_added_tokens=True)
        added = {t["id"]: t for t in spec.get("added_tokens") or []}
        size = max([size, *[i + 1 for i in added]])
        self.special_ids = frozenset(i for i, t in added.items() if t.get("special"))
        table: List[bytes] = []
        if "ByteLevel" in decoders:
            inverse = {c: b for b, c in bytes_to_unicode().items()}
            piece = lambda s: bytes(inverse[c] for c in s) if all(c in inverse for c in s) else s.encode()  # noqa: E731
        elif {"Metaspace", "ByteFallback", "Replace"} & set(decoders):
            fallback = "ByteFallback" in decoders

            def piece(s):
                m = _BYTE_TOKEN.match(s) if fallback else None
                return bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode()
        else:
            self.table, self.lengths, self.ok = None, None, False
            self.reason = f"its decoder ({', '.join(map(str, decoders)) or 'none'}) is neither byte-level nor " \
                          "SentencePiece-style"
            return
        for i in range(size):
            token = backend.id_to_token(i)
            if token is None or i in self.special_ids:
                table.append(b"")
            elif i in added:
                table.append(added[i]["content"].encode())
            else:
                table.append(piece(token))
        self.table = table
        self.lengths = np.fromiter((len(t) for t in table), dtype=np.int64, count=len(table))
        ids = backend.encode(_PROBE, add_special_tokens=False).ids
        got = self.join(ids)
        self.ok = got == _PROBE.encode() or got.lstrip(b" ") == _PROBE.encode()
        self.reason = None if self.ok else f"its tokens do not spell the text back ({got[:40]!r}...)"

    def join(self, ids: Sequence[int]) -> bytes:
        table = self.table
        return b"".join([table[i] for i in ids])


# ------------------------------------------------------------------------------------ text <-> bytes
def decode_bytes(data: bytes) -> Tuple[str, Optional[Tuple[np.ndarray, np.ndarray]]]:
    """UTF-8 text of ``data``, each invalid byte becoming one U+FFFD.

    Returns ``(text, None)`` when ``data`` is valid UTF-8 (text bytes == data),
    else ``(text, (text_starts, data_starts))``: per character of ``text`` its
    first byte in ``text.encode()`` and in ``data`` (both with a final sentinel).
    """
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    chars: List[str] = []
    starts: List[int] = []
    pos, n = 0, len(data)
    while pos < n:
        try:
            good, bad = data[pos:].decode("utf-8"), None
        except UnicodeDecodeError as error:
            good, bad = data[pos:pos + error.start].decode("utf-8"), pos + error.start
        for ch in good:
            chars.append(ch)
            starts.append(pos)
            pos += len(ch.encode("utf-8"))
        if bad is None:
            break
        chars.append("\ufffd")
        starts.append(bad)
        pos = bad + 1
    text = "".join(chars)
    text_starts = np.zeros(len(chars) + 1, dtype=np.int64)
    np.cumsum([len(c.encode("utf-8")) for c in chars], out=text_starts[1:])
    return text, (text_starts, np.asarray(starts + [n], dtype=np.int64))


def _to_data_bytes(text_ends: np.ndarray, mapping) -> np.ndarray:
    """Byte ends in ``text.encode()`` -> byte ends in the original data (conservative inside U+FFFD)."""
    if mapping is None:
        return text_ends
    tb, ob = mapping
    c = np.searchsorted(tb, text_ends, side="right") - 1
    nxt = np.minimum(c + 1, len(tb) - 1)
    at_start = tb[c] == text_ends
    same = (tb[nxt] - tb[c]) == (ob[nxt] - ob[c])
    return np.where(at_start, ob[c], np.where(same, ob[c] + (text_ends - tb[c]), ob[nxt]))


# ------------------------------------------------------------------------------------ the aligner
def _same_vocabulary(a, b) -> bool:
    if a is b:
        return True
    try:
        return a.get_vocab() == b.get_vocab()
    except (AttributeError, NotImplementedError):
        return False


class CausalSpanAligner:
    """``tokens [b, s] -> TokenAlignment`` from the target's to the teacher's tokenization."""

    def __init__(self, target_tokenizer, teacher_tokenizer, eod_id: int, max_teacher_len: Optional[int] = None,
                 matched_only: bool = False):
        self.eod_id = int(eod_id)
        self.max_teacher_len = max_teacher_len
        self.matched_only = matched_only  # align only positions where a teacher token ends with theirs
        self.identity = _same_vocabulary(target_tokenizer, teacher_tokenizer)
        self.truncated_rows = 0  # rows cut to max_teacher_len so far (for logs/benchmarks)
        self._executor: Optional[ThreadPoolExecutor] = None
        if self.identity:
            return
        self.target = ByteTable(target_tokenizer)
        if not self.target.ok:
            raise LETConfigError(f"--let-token-alignment causal-span: cannot recover the text of the target's "
                                 f"tokens: {self.target.reason}.")
        self.teacher = ByteTable(teacher_tokenizer)  # exact teacher ends where it spells the text back
        backend = backend_of(teacher_tokenizer)
        spec = json.loads(backend.to_str())
        _no_trim(spec)  # trimmed offsets would make whitespace tokens end too early (non-causal)
        from tokenizers import Tokenizer

        self._encoder = Tokenizer.from_str(json.dumps(spec))
        bos, eos = getattr(teacher_tokenizer, "bos_token_id", None), getattr(teacher_tokenizer, "eos_token_id", None)
        with_special = backend.encode("a", add_special_tokens=True).ids
        adds_bos = bos is not None and bool(with_special) and with_special[0] == bos and \
            backend.encode("a", add_special_tokens=False).ids[:1] != [bos]
        self.bos = [bos] if adds_bos else []
        if eos is not None:
            self.separator = [eos] + self.bos
        elif self.bos:
            self.separator = list(self.bos)
        else:
            raise LETConfigError("--let-token-alignment causal-span: the teacher's tokenizer has neither an EOS nor "
                                 "a BOS token to separate documents; set eos_token in its tokenizer_config.json.")
        pad = getattr(teacher_tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)
        if self.target.lengths.shape[0] <= self.eod_id:
            raise LETConfigError(f"EOD id {self.eod_id} is outside the target tokenizer "
                                 f"({self.target.lengths.shape[0]} tokens).")
        # ids past the tokenizer (Megatron's vocabulary padding) read as a token without text
        self._no_text_id = len(self.target.table)
        self.target.table.append(b"")
        self.target.lengths = np.append(self.target.lengths, 0)

    # -- public --------------------------------------------------------------------------------
    def __call__(self, tokens: torch.Tensor) -> TokenAlignment:
        tokens = torch.as_tensor(tokens).detach().to("cpu", torch.int64)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [b, s]; got {tuple(tokens.shape)}")
        if self.identity:
            return self._identity(tokens)
        rows = self.align_rows(list(tokens.numpy()))  # one encode_batch call: Rust, GIL released
        return self._collate(rows, tokens.shape[1])

    def align_row(self, ids: np.ndarray) -> dict:
        """One sequence: teacher ids, per-teacher-token byte ends, index/valid, target byte ends."""
        return self.align_rows([ids])[0]

    def align_rows(self, rows: Sequence[np.ndarray]) -> List[dict]:
        prepared = [self._segments(np.asarray(ids, dtype=np.int64)) for ids in rows]
        texts = [seg["text"] for row in prepared for seg in row["segments"]]
        encodings = iter(self._encoder.encode_batch(texts, add_special_tokens=False) if texts else [])
        return [self._finish(row, encodings) for row in prepared]

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="let-align")
        return self._executor

    # -- internals -----------------------------------------------------------------------------
    def _identity(self, tokens: torch.Tensor) -> TokenAlignment:
        b, s = tokens.shape
        keep = s if self.max_teacher_len is None else min(s, self.max_teacher_len)
        index = torch.arange(s).clamp(max=keep - 1).unsqueeze(0).expand(b, s).contiguous()
        valid = (torch.arange(s) < keep).unsqueeze(0).expand(b, s).contiguous()
        return TokenAlignment(tokens[:, :keep].clone(), torch.ones(b, keep, dtype=torch.int64), index, valid)

    def _segments(self, ids: np.ndarray) -> dict:
        if ids.size and (ids.max() >= self._no_text_id or ids.min() < 0):
            ids = np.where((ids >= self._no_text_id) | (ids < 0), self._no_text_id, ids)
        lengths = self.target.lengths[ids]
        eod = np.flatnonzero(ids == self.eod_id)
        lengths[eod] = 1  # the boundary is one virtual byte: an EOD position "sees" it
        ends = np.cumsum(lengths)
        segments, start, base = [], 0, 0
        for stop in [*eod.tolist(), len(ids)]:
            data = self.target.join(ids[start:stop].tolist())
            text, mapping = decode_bytes(data)
            segments.append({"text": text, "mapping": mapping, "base": base, "size": len(data),
                             "closed": stop < len(ids)})
            base += len(data) + 1
            start = stop + 1
        return {"ends": ends, "segments": segments}

    def _finish(self, row: dict, encodings: Iterator) -> dict:
        ids: List[int] = list(self.bos)
        ends: List[np.ndarray] = [np.zeros(len(self.bos), dtype=np.int64)]
        cand: List[np.ndarray] = [np.zeros(len(self.bos), dtype=bool)]
        for seg in row["segments"]:
            enc = next(encodings)
            seg_ids = enc.ids
            if self.teacher.ok and self.teacher.join(seg_ids) == seg["text"].encode("utf-8"):
                text_ends = np.cumsum(self.teacher.lengths[np.asarray(seg_ids, dtype=np.int64)])
            else:  # the teacher's tokens do not spell the text (normalizer, ...): use its offsets
                text_ends = _char_ends_to_text_bytes(seg["text"], enc.offsets)
            ids += seg_ids
            ends.append(seg["base"] + _to_data_bytes(text_ends.astype(np.int64), seg["mapping"]))
            cand.append(np.ones(len(seg_ids), dtype=bool))
            if seg["closed"]:
                ids += self.separator
                ends.append(np.full(len(self.separator), seg["base"] + seg["size"] + 1, dtype=np.int64))
                cand.append(np.arange(len(self.separator)) == 0)
        teacher_ends = np.maximum.accumulate(np.concatenate(ends)) if ids else np.zeros(0, dtype=np.int64)
        candidates = np.flatnonzero(np.concatenate(cand))
        slot = np.searchsorted(teacher_ends[candidates], row["ends"], side="right") - 1
        valid = slot >= 0
        index = candidates[np.maximum(slot, 0)] if len(candidates) else np.zeros_like(slot)
        if self.matched_only and len(candidates):  # drop the stale states (teacher token still open)
            valid &= teacher_ends[index] == row["ends"]
        if self.max_teacher_len is not None and len(ids) > self.max_teacher_len:
            valid &= index < self.max_teacher_len
            ids = ids[:self.max_teacher_len]
            self.truncated_rows += 1
        index = np.where(valid, index, 0)
        return {"teacher_ids": ids, "teacher_ends": teacher_ends[:len(ids)], "target_ends": row["ends"],
                "index": index, "valid": valid}

    def _collate(self, rows: List[dict], seq: int) -> TokenAlignment:
        width = max(1, max(len(r["teacher_ids"]) for r in rows))
        b = len(rows)
        teacher = torch.full((b, width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(b, width, dtype=torch.int64)
        for r, row in enumerate(rows):
            n = len(row["teacher_ids"])
            teacher[r, :n] = torch.as_tensor(row["teacher_ids"], dtype=torch.int64)
            mask[r, :n] = 1
        index = torch.from_numpy(np.stack([row["index"] for row in rows]).astype(np.int64))
        valid = torch.from_numpy(np.stack([row["valid"] for row in rows]))
        return TokenAlignment(teacher, mask, index.reshape(b, seq), valid.reshape(b, seq))


def _no_trim(spec) -> None:
    if isinstance(spec, dict):
        if "trim_offsets" in spec:
            spec["trim_offsets"] = False
        for value in spec.values():
            _no_trim(value)
    elif isinstance(spec, list):
        for value in spec:
            _no_trim(value)


def _char_ends_to_text_bytes(text: str, offsets) -> np.ndarray:
    char_starts = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum([len(c.encode("utf-8")) for c in text], out=char_starts[1:])
    return char_starts[np.asarray([end for _, end in offsets], dtype=np.int64)] if offsets \
        else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------ plumbing
def build_aligner(target_tokenizer, teacher_tokenizer_dir: str, eod_id: int,
                  max_teacher_len: Optional[int], matched_only: bool = False) -> CausalSpanAligner:
    """The aligner from a target tokenizer (HF, or Megatron's wrapper) and a teacher tokenizer directory."""
    from transformers import AutoTokenizer

    from megatron_let.teachers.vocabulary import hf_tokenizer_of

    if target_tokenizer is None:
        raise LETConfigError("--let-token-alignment causal-span needs the target's text: pass --tokenizer-model "
                             "(a Hugging Face tokenizer directory); mock data with NullTokenizer has none.")
    if not hasattr(target_tokenizer, "get_vocab") or backend_of(target_tokenizer) is None:
        target_tokenizer = hf_tokenizer_of(target_tokenizer) or target_tokenizer
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise LETConfigError(f"--let-teacher-tokenizer {teacher_tokenizer_dir!r}: cannot load a tokenizer "
                             f"({error}); point it at the teacher's tokenizer directory.") from None
    return CausalSpanAligner(target_tokenizer, teacher_tokenizer, eod_id, max_teacher_len, matched_only)


def alignment_to_batch(alignment: TokenAlignment) -> dict:
    return dict(zip(BATCH_KEYS, alignment))


def pop_alignment(batch: dict) -> Optional[TokenAlignment]:
    """Remove the ``let_*`` keys from a micro-batch dict (before CP slicing); the alignment or None."""
    values = [batch.pop(key, None) for key in BATCH_KEYS]
    return None if any(v is None for v in values) else TokenAlignment(*values)


class AlignmentPrefetcher:
    """Wraps a micro-batch iterator: the alignment of the next ``depth`` micro-batches is computed in a
    background thread while the current one trains; batches come out with the ``let_*`` keys added."""

    def __init__(self, iterator, aligner: CausalSpanAligner, depth: int = 2):
        self._it = iter(iterator)
        self._aligner = aligner
        self._depth = max(1, depth)
        self._pending = collections.deque()
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while not self._done and len(self._pending) < self._depth:
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                break
            self._pending.append((batch, self._aligner.executor.submit(self._aligner, batch["tokens"])))
        if not self._pending:
            raise StopIteration
        batch, future = self._pending.popleft()
        return {**batch, **alignment_to_batch(future.result())}


def gather_teacher_states(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Teacher states [s_T, b, h] -> [s, b, h] at ``index`` [b, s]."""
    idx = index.to(states.device).transpose(0, 1)
    return torch.gather(states, 0, idx.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
