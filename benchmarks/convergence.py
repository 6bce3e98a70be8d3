"""Does LET make pretraining converge faster, and is it the teacher's knowledge that does it?

    python benchmarks/convergence.py [--plan core|full] [--work-dir runs/convergence]

The quickstart's experiment (examples/quickstart.py: real text, a tiny Hugging Face teacher trained
on more tokens than the target sees, the target trained by pretrain_gpt_let.py) made into a
measurement:
- 2 seeds per arm, and the seed-to-seed spread next to every difference;
- a RANDOM-teacher control (same architecture, untrained) beside the trained teacher, so the
  teacher's knowledge is measured, not only the regulariser;
- speed-up at several loss levels (the baseline's loss at 25/50/75/100% of training), not only at
  the final loss whose cosine tail inflates step ratios; and a constant-LR variant;
- (plan full) sweeps of lambda0, the stop step, the target layer and the projector.
Stages and runs are cached in the work dir like the quickstart's, so a re-run only adds what is new.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import quickstart as qs  # noqa: E402

LEVELS = (0.25, 0.5, 0.75, 1.0)


def random_teacher(a, trained: dict) -> dict:
    """Same architecture and tokenizer as the trained teacher, weights as initialised."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = a.work_dir / "teacher_random"
    if not (out / "config.json").exists():
        torch.manual_seed(a.seed + 1)
        LlamaForCausalLM(LlamaConfig.from_pretrained(trained["path"])).save_pretrained(out)
        AutoTokenizer.from_pretrained(trained["path"]).save_pretrained(out)
    return {**trained, "path": str(out), "key": trained["key"] + "-random"}


def arms(a, trained, random, plan):
    """name -> (extra flags, upstream key); each name is run for every seed in its list."""
    let = lambda teacher, **o: [str(x) for x in qs.let_flags(argparse.Namespace(**{**vars(a), **o}), teacher)]  # noqa: E731
    k_mid, k_late = a.target_layers // 2, a.target_layers - 1
    core = {
        "baseline": ([], "", (1, 2)),
        "let": (let(trained), trained["key"], (1, 2)),
        "let-random-teacher": (let(random), random["key"], (1, 2)),
    }
    constant_lr = ["--lr-decay-style", "constant"]
    core.update({
        "baseline-constlr": (constant_lr, "", (1,)),
        "let-constlr": (constant_lr + let(trained), trained["key"], (1,)),
        "let-random-constlr": (constant_lr + let(random), random["key"], (1,)),
    })
    if plan == "core":
        return core
    sweeps = {
        "let-lambda0.1": (let(trained, let_lambda=0.1), trained["key"], (1,)),
        "let-lambda1.0": (let(trained, let_lambda=1.0), trained["key"], (1,)),
        "let-stop25%": (let(trained, let_stop_iter=a.target_iters // 4), trained["key"], (1,)),
        f"let-layer{k_mid}": (let(trained, let_target_layer=k_mid), trained["key"], (1,)),
        f"let-layer{k_late}": (let(trained, let_target_layer=k_late), trained["key"], (1,)),
        "let-linear": (let(trained, let_projector="linear"), trained["key"], (1,)),
        "let-mlp": (let(trained, let_projector="mlp"), trained["key"], (1,)),
    }
    return {**core, **sweeps}


def mean_curve(runs):
    steps = sorted(set.intersection(*(set(r["log"]["valid"]) for r in runs)))
    return {s: statistics.mean(r["log"]["valid"][s] for r in runs) for s in steps}


def speedups(base_curve, curve):
    """Baseline steps / arm steps to reach the baseline's loss at each fraction of training."""
    steps = sorted(base_curve)
    out = {}
    for fraction in LEVELS:
        step = steps[max(0, round(fraction * len(steps)) - 1)]
        level = base_curve[step]
        reach = qs.steps_to_reach(curve, level)
        out[fraction] = None if reach is None else (step / reach[0], not reach[1])
    return out


def fmt_speedup(value):
    if value is None:
        return "not reached"
    ratio, bound = value
    return f"{'>=' if bound else ''}{ratio:.2f}x"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=["core", "full"], default="full")
    parser.add_argument("--work-dir", default="runs/convergence")
    args, rest = parser.parse_known_args(argv)
    a = qs.parse_args(["--work-dir", args.work_dir, *rest])
    a.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = qs.stage_data(a)
    trained = qs.stage_teacher(a, data)
    random = random_teacher(a, trained)
    runs = {}
    plan = arms(a, trained, random, args.plan)
    total = sum(len(seeds) for _, _, seeds in plan.values())
    done = 0
    for name, (extra, upstream, seeds) in plan.items():
        for seed in seeds:
            done += 1
            a.seed = 1234 + seed - 1
            runs.setdefault(name, []).append(
                qs.stage_target(a, data, f"{name}-s{seed}", extra, upstream, f"{done}/{total}"))
    a.seed = 1234

    base = {"cosine": mean_curve(runs["baseline"]), "constant": mean_curve(runs["baseline-constlr"])}
    lines = [f"# LET convergence benchmark ({time.strftime('%Y-%m-%d')}, {total} runs, "
             f"{(time.time() - started) / 60:.0f} min)", "",
             f"Target {a.target_layers}x{a.target_hidden} ({a.target_iters} iters x {a.batch_size} x "
             f"{a.seq_length}), teacher {a.teacher_layers}x{a.teacher_hidden} trained on {trained['tokens']:,} "
             f"tokens (val loss {trained['val_loss']:.3f}); LET default: layer {a.let_target_layer}, lambda0 "
             f"{a.let_lambda:g}, stop {a.let_stop_iter}, projector {a.let_projector}.", "",
             "| arm | seeds | final val loss (per seed) | vs baseline | seed spread | speed-up at the baseline's "
             "loss after 25% / 50% / 75% / 100% of training |", "|---|---|---|---|---|---|"]
    results = {}
    for name, group in runs.items():
        schedule = "constant" if "constlr" in name else "cosine"
        baseline_name = "baseline-constlr" if schedule == "constant" else "baseline"
        finals = [r["log"]["valid"][max(r["log"]["valid"])] for r in group]
        base_finals = [r["log"]["valid"][max(r["log"]["valid"])] for r in runs[baseline_name]]
        curve = mean_curve(group)
        spread = max(finals) - min(finals) if len(finals) > 1 else None
        ups = speedups(base[schedule], curve)
        results[name] = {"finals": finals, "delta": statistics.mean(finals) - statistics.mean(base_finals),
                         "spread": spread, "speedups": {str(k): v for k, v in ups.items()},
                         "curve": {str(k): v for k, v in curve.items()}}
        lines.append(f"| {name} | {len(group)} | {' / '.join(f'{f:.4f}' for f in finals)} | "
                     f"{results[name]['delta']:+.4f} | {'-' if spread is None else f'{spread:.4f}'} | "
                     f"{' / '.join(fmt_speedup(ups[f]) for f in LEVELS)} |")
    md = "\n".join(lines) + "\n"
    (a.work_dir / "convergence.md").write_text(md)
    (a.work_dir / "convergence.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, a.work_dir / "convergence.png", a)
    print("\n" + md, flush=True)


def plot(runs, path, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    styles = {"baseline": "tab:blue", "let": "tab:orange", "let-random-teacher": "tab:gray"}
    for ax, suffix, title in ((axes[0], "", "cosine LR"), (axes[1], "constlr", "constant LR")):
        for name, color in styles.items():
            key = name if not suffix else {"baseline": "baseline-constlr", "let": "let-constlr",
                                           "let-random-teacher": "let-random-constlr"}[name]
            for i, run in enumerate(runs.get(key, [])):
                pts = sorted(run["log"]["valid"].items())
                ax.plot(*zip(*pts), color=color, alpha=0.9 if i == 0 else 0.5, lw=1.5,
                        label=key if i == 0 else None)
        ax.axvline(a.let_stop_iter, color="black", ls="--", lw=0.8)
        ax.set_title(f"validation loss, {title}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
