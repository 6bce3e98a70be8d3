"""Causal-span token alignment (--let-token-alignment causal-span): a teacher with another tokenizer.

Two real, different byte-level tokenizers: GPT-2's BPE (rebuilt offline from whisper's gpt2.tiktoken by
experiments.corpus; skipped when pip cannot fetch it) and a BPE trained here. Property-based
(hypothesis) checks that every target position gets the LAST teacher token ending at or before its end,
in bytes, document by document; identity for identical tokenizers; EOD and BOS handling; truncation;
padding with an attention mask; and that LET with a mismatched teacher gives the single-process numbers
under TP2+SP and PP2 (alignments prefetched by the micro-batch iterator there, computed in the hook in
the single process).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from let_testing import CORPUS, OWNER, assert_same_numbers, bpe_tokenizer as _bpe, launch, make_mismatched, run_layout
from megatron_let import LateToEarlyTraining, LETConfig, LETConfigError
from megatron_let.data.byte_level import bytes_to_unicode
from megatron_let.teachers.token_alignment import (AlignmentPrefetcher, CausalSpanAligner, _to_data_bytes, decode_bytes,
                                          pop_alignment)

_UNBYTE = {c: b for b, c in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from experiments.corpus import DownloadError, build_tokenizer

    cache = Path(os.environ.get("MEGATRON_LET_CACHE", os.path.expanduser("~/.cache/megatron-let/downloads")))
    try:
        return build_tokenizer(tmp_path_factory.mktemp("gpt2"), "gpt2", cache, [], 0)
    except DownloadError as error:
        pytest.skip(f"GPT-2 tokenizer unavailable (pip cannot fetch openai-whisper): {str(error)[:200]}")


@pytest.fixture(scope="module")
def bpe():
    return _bpe(CORPUS, 400, "alpha beta gamma")


@pytest.fixture(scope="module")
def pairs(gpt2, bpe):
    return {"gpt2->bpe": (gpt2, bpe), "bpe->gpt2": (bpe, gpt2)}


_ALIGNERS = {}


def aligner_for(target, teacher, max_len=None, matched=False):
    """Built once per pair: GPT-2's 50k-entry tables take a moment."""
    key = (id(target), id(teacher), max_len, matched)
    if key not in _ALIGNERS:
        _ALIGNERS[key] = CausalSpanAligner(target, teacher, target.eos_token_id, max_len, matched_only=matched)
    return _ALIGNERS[key]


def _ids(tokenizer, text):
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _token_bytes(tokenizer, ids):
    """Independent of the module: the GPT-2 byte alphabet, read from prepare_corpus."""
    return [bytes(_UNBYTE[c] for c in tok) for tok in tokenizer.convert_ids_to_tokens(ids)]


def _ends(tokenizer, ids, text):
    pieces = _token_bytes(tokenizer, ids)
    assert b"".join(pieces) == text.encode(), "token bytes do not spell the text"
    return np.cumsum([len(p) for p in pieces]).tolist()


def check_documents(target, teacher, docs, closed_last, max_len=None, matched=False):
    """Build the target row from ``docs`` joined by EOD and check the alignment against the spec;
    ``matched`` (causal-span-matched): only positions whose teacher token ends with theirs stay valid."""
    eod, eos = target.eos_token_id, teacher.eos_token_id
    ids, where = [], []  # where[i]: (doc, byte end in doc) or (doc, "eod")
    for d, doc in enumerate(docs):
        t = _ids(target, doc)
        ids += t
        where += [(d, e) for e in _ends(target, t, doc)]
        if d < len(docs) - 1 or closed_last:
            ids.append(eod)
            where.append((d, "eod"))
    if not ids:
        return
    expected, teacher_text, eos_pos = [], {}, {}
    for d, doc in enumerate(docs):
        t = _ids(teacher, doc)
        teacher_text[d] = list(zip(range(len(expected), len(expected) + len(t)), _ends(teacher, t, doc)))
        expected += t
        if d < len(docs) - 1 or closed_last:
            eos_pos[d] = len(expected)
            expected.append(eos)
    out = aligner_for(target, teacher, max_len, matched)(torch.tensor([ids]))
    row = out.teacher_tokens[0][out.teacher_attention_mask[0].bool()].tolist()
    assert row == expected[:max_len]  # documents tokenized apart, each closed by the teacher's EOS
    for i, (d, end) in enumerate(where):
        stale = False
        if end == "eod":
            j = eos_pos[d]  # the boundary: both have seen document d and its end
        else:
            before = [p for p, e in teacher_text[d] if e <= end]
            j = before[-1] if before else eos_pos.get(d - 1)
            if before:  # causality: teacher token j ends at or before target token i, and is the last one
                assert dict(teacher_text[d])[j] <= end
                assert all(e > end for p, e in teacher_text[d] if p > j)
            stale = not before or dict(teacher_text[d])[j] != end  # the teacher's token is still open
        if j is None or (max_len is not None and j >= max_len) or (matched and stale):
            assert not out.valid[0, i], (i, d, end)
        else:
            assert out.valid[0, i] and out.index[0, i] == j, (i, d, end, out.index[0, i].item(), j)


TEXT = st.one_of(
    st.text(st.sampled_from(list("abcdefz  .,;'\n\t") + ["é", "ï", "東", "京", "🙂", "Ω", "ß", "\u200d"]),
            max_size=60),
    st.lists(st.sampled_from(["the", "quick", "fox", "naïve", "café", "question", "to", "be", "\n", "  "]),
             max_size=20).map(" ".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
)


@pytest.mark.parametrize("pair", ["gpt2->bpe", "bpe->gpt2"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(TEXT, min_size=1, max_size=3), closed_last=st.booleans(), matched=st.booleans())
def test_causal_and_last_property(pairs, pair, docs, closed_last, matched):
    target, teacher = pairs[pair]
    check_documents(target, teacher, docs, closed_last, matched=matched)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 371), min_size=1, max_size=40))
def test_arbitrary_ids_partial_utf8(gpt2, bpe, ids):
    """Random ids spell arbitrary bytes (windows cut inside characters): still causal in bytes."""
    aligner = aligner_for(bpe, gpt2)
    ids = [i % len(bpe) for i in ids]
    row = aligner.align_row(np.asarray(ids))
    tends, ends, index, valid = row["teacher_ends"], row["target_ends"], row["index"], row["valid"]
    assert np.all(tends[index[valid]] <= ends[valid])
    assert np.all(np.diff(index[valid]) >= 0)
    # the teacher reads each segment's bytes, each invalid byte as one U+FFFD
    segments, cur = [], []
    for t in ids:
        if t == bpe.eos_token_id:
            segments.append(cur)
            cur = []
        else:
            cur.append(t)
    expected = []
    for k, seg in enumerate([*segments, cur]):
        data = b"".join(_token_bytes(bpe, seg))
        expected += _ids(gpt2, decode_bytes(data)[0])
        if k < len(segments):
            expected.append(gpt2.eos_token_id)
    assert row["teacher_ids"] == expected


def test_partial_characters_map_conservatively():
    data = "a🙂b".encode()[:3] + "é".encode()  # 'a' + half an emoji + 'é'
    text, mapping = decode_bytes(data)
    assert text == "a\ufffd\ufffdé"
    # text bytes: a=0..1, U+FFFD=1..4, U+FFFD=4..7, é=7..9 ; data bytes: a=0..1, 1..2, 2..3, é=3..5
    got = _to_data_bytes(np.array([1, 2, 4, 7, 8, 9]), mapping).tolist()
    assert got == [1, 2, 2, 3, 4, 5]  # inside a replacement -> after its byte; inside 'é' -> exact


def test_identical_tokenizers_are_the_identity(gpt2, bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path / "bpe")
    for a, b in ((gpt2, gpt2), (bpe, AutoTokenizer.from_pretrained(tmp_path / "bpe"))):
        tokens = torch.randint(0, 300, (3, 17))
        out = CausalSpanAligner(a, b, a.eos_token_id)(tokens)
        assert torch.equal(out.teacher_tokens, tokens) and out.teacher_attention_mask.all()
        assert torch.equal(out.index, torch.arange(17).expand(3, 17)) and out.valid.all()
    out = CausalSpanAligner(gpt2, gpt2, 0, max_teacher_len=10)(tokens)
    assert out.teacher_tokens.shape == (3, 10) and out.valid[:, :10].all() and not out.valid[:, 10:].any()


def test_eod_boundaries(gpt2, bpe):
    check_documents(gpt2, bpe, ["Hello world", "", "Goodbye, moon 🙂"], closed_last=True)
    ids = _ids(gpt2, "Hello world") + [gpt2.eos_token_id] + _ids(gpt2, "Hello")
    out = CausalSpanAligner(gpt2, bpe, gpt2.eos_token_id)(torch.tensor([ids]))
    eos_at = out.teacher_tokens[0].tolist().index(bpe.eos_token_id)
    assert out.index[0, 2] == eos_at  # the target EOD -> the teacher EOS of the same boundary
    assert "Hello" in bpe.decode(out.teacher_tokens[0, eos_at + 1:].tolist())


def test_teacher_with_bos(gpt2):
    """A teacher whose tokenizer prepends BOS: rows start with BOS, documents are separated by EOS BOS,
    and no target position is ever aligned to a BOS (it carries no text)."""
    from tokenizers import processors

    teacher = _bpe(CORPUS, 350, "bos teacher")
    teacher.add_special_tokens({"bos_token": "<s>"})
    bos = teacher.bos_token_id
    teacher.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    ids = _ids(gpt2, "to be or not") + [gpt2.eos_token_id] + _ids(gpt2, "naïve café")
    aligner = CausalSpanAligner(gpt2, teacher, gpt2.eos_token_id)
    out = aligner(torch.tensor([ids]))
    row = out.teacher_tokens[0].tolist()
    eos = row.index(teacher.eos_token_id)
    assert row[0] == bos and row[eos + 1] == bos
    assert not any(row[j] == bos for j in out.index[0][out.valid[0]].tolist())


def test_truncation_to_teacher_positions(gpt2, bpe):
    text = "the quick brown fox jumps over the lazy dog, naïve café 🙂 " * 4
    full = CausalSpanAligner(gpt2, bpe, gpt2.eos_token_id)(torch.tensor([_ids(gpt2, text)]))
    cut = CausalSpanAligner(gpt2, bpe, gpt2.eos_token_id, max_teacher_len=16)(torch.tensor([_ids(gpt2, text)]))
    assert full.teacher_tokens.shape[1] > 16 and cut.teacher_tokens.shape[1] == 16
    assert torch.equal(cut.teacher_tokens[0], full.teacher_tokens[0, :16])
    kept = full.valid & (full.index < 16)
    assert torch.equal(cut.valid, kept) and torch.equal(cut.index[kept], full.index[kept])
    assert cut.valid.any() and not cut.valid.all()  # tail positions are masked, never mapped to stale tokens
    check_documents(gpt2, bpe, [text[:120], text[120:]], closed_last=False, max_len=16)


def test_padding_and_prefetcher(gpt2, bpe):
    tokens = torch.tensor([_ids(gpt2, "a b c d e f g h i j k"), _ids(gpt2, "abcdefghijklmnopqrstu")])
    aligner = CausalSpanAligner(gpt2, bpe, gpt2.eos_token_id)
    out = aligner(tokens)
    lengths = [len(_ids(bpe, "a b c d e f g h i j k")), len(_ids(bpe, "abcdefghijklmnopqrstu"))]
    assert out.teacher_attention_mask.sum(1).tolist() == lengths
    assert out.teacher_tokens.shape[1] == max(lengths)
    batches = [{"tokens": tokens, "step": k} for k in range(3)]
    got = list(AlignmentPrefetcher(iter(batches), aligner, depth=2))
    assert [b["step"] for b in got] == [0, 1, 2]
    for batch in got:
        alignment = pop_alignment(batch)
        assert set(batch) == {"tokens", "step"}
        assert all(torch.equal(x, y) for x, y in zip(alignment, out))


def test_config_flags():
    with pytest.raises(LETConfigError, match="--let-token-alignment"):
        LETConfig(teacher="t", target_layer=1, stop_iter=1, token_alignment="fuzzy").validate()
    with pytest.raises(LETConfigError, match="only used with --let-token-alignment causal-span"):
        LETConfig(teacher="t", target_layer=1, stop_iter=1, teacher_tokenizer="dir").validate()
    LETConfig(teacher="t", target_layer=1, stop_iter=1, token_alignment="causal-span",
              teacher_tokenizer="dir").validate()


# ------------------------------------------------------------------------------------------- LET
@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    return make_mismatched(tmp_path_factory.mktemp("mismatch"))


def test_teacher_states_padding_masked_and_gathered(megatron_world1, mismatched):
    """The hook's teacher states: padded rows equal each row run alone, then gathered to target positions."""
    _, teacher, target = mismatched
    let = LateToEarlyTraining(LETConfig(teacher=teacher, target_layer=1, stop_iter=2, token_alignment="causal-span"),
                              target_tokenizer=target, eod_id=target.eos_token_id)
    tokens = torch.tensor([_ids(target, "the quick brown fox jumps")[:6], _ids(target, "to be or not to be")[:6]])
    states, valid = let.aligned_teacher_hidden_states(tokens)
    out = let.aligner(tokens)
    assert out.teacher_attention_mask.sum(1).tolist()[0] != out.teacher_attention_mask.sum(1).tolist()[1]
    for r in range(2):
        n = int(out.teacher_attention_mask[r].sum())
        alone = let.teacher.hidden_states(out.teacher_tokens[r:r + 1, :n])[:, 0]  # [n, h]
        expect = alone[out.index[r]]
        torch.testing.assert_close(states[:, r][valid[r]], expect[valid[r]], rtol=1e-4, atol=1e-5)
    assert valid.any()
    matched = LateToEarlyTraining(LETConfig(teacher=teacher, target_layer=1, stop_iter=2,
                                            token_alignment="causal-span-matched"),
                                  target_tokenizer=target, eod_id=target.eos_token_id)
    matched_states, matched_valid = matched.aligned_teacher_hidden_states(tokens)
    assert matched_valid.any() and not torch.equal(matched_valid, valid)  # this text has stale positions
    assert not (matched_valid & ~valid).any()  # a subset: the stale positions are dropped, nothing added
    torch.testing.assert_close(matched_states[matched_valid.T], states[matched_valid.T])


@pytest.fixture(scope="module")
def mismatched_reference(tmp_path_factory, mismatched):
    target, teacher, _ = mismatched
    ckpt = tmp_path_factory.mktemp("mm_ref") / "init"
    common = ["--teacher", teacher, "--target-tokenizer", target]
    run_layout(tmp_path_factory.mktemp("mm_save"), "save", 1, [*common, "--save-ref", ckpt])
    common += ["--load-ref", ckpt]
    single = run_layout(tmp_path_factory.mktemp("mm_single"), "single", 1, common)  # hook computes alignments
    assert all(r["let lambda"] > 0 and r["let loss"] > 0 for r in single["records"])
    return common, single


@pytest.mark.parametrize("layout,flags", [("tp2_sp", ["--tp", 2, "--sp"]), ("pp2", ["--pp", 2])])
def test_mismatched_teacher_layouts_match_single_process(tmp_path, mismatched_reference, layout, flags):
    """Spread and (in the same launch) owner placement."""
    common, single = mismatched_reference
    got = run_layout(tmp_path, layout, 2, [*common, *flags, "--prefetch-alignment"],
                     also=OWNER)
    assert_same_numbers(single, got, f"causal-span {layout}")
    assert_same_numbers(single, got["also"]["owner"], f"causal-span {layout} owner")


def test_trainer_cli_causal_span(tmp_path, mismatched):
    # lean=True: skipped where the lean trainer cannot run (the Megatron-LM driver's causal-span run: test_megatron_lm.py)
    target, teacher, _ = mismatched
    flags = ["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 32,
             "--micro-batch-size", 2, "--global-batch-size", 4, "--train-iters", 2, "--lr", "1e-3", "--mock-data",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", target, "--log-interval", 1,
             "--let-teacher", teacher, "--let-target-layer", 1, "--let-stop-iter", 2]
    run = lambda extra: launch(flags + extra, lean=True, timeout=120)  # noqa: E731
    refused = run([])
    assert refused.returncode == 2 and "--let-token-alignment causal-span" in refused.stderr
    proc = run(["--let-token-alignment", "causal-span-matched"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LET token alignment causal-span-matched" in proc.stdout and "let loss" in proc.stdout
