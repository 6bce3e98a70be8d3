"""The teacher's step-time cost by parallel layout, spread vs owner placement, measured side by side.

    python benchmarks/placement.py                     # CPU: PP1, PP2, TP2 mb1, TP2 mb2, DP2 (gloo, 1 thread/rank)
    python benchmarks/placement.py --layouts pp2 tp2_mb1 --reps 30
    python benchmarks/placement.py --preset gpu-7b-layout   # one GPU: the 7B template's per-rank shard

CPU: for each layout one torchrun job builds three identical targets in the same processes -- baseline
(no LET), LET with ``--let-teacher-placement spread`` and LET with ``owner`` -- and alternates their steps
(rotating the order each repetition) so load changes hit all arms alike. A step is timed between two
barriers (the slowest rank's time). Printed per layout and placement: the median step-time ratio
LET / baseline, the spread of the per-repetition ratios (25th-75th percentile), and the median teacher
seconds per step on every rank. The teacher's FLOP floor (teacher forward over target forward+backward)
is printed too; with spread every layout should sit near the PP1 ratio.

gpu-7b-layout: one GPU cannot hold the TP4 x PP2 ranks of examples/cluster/llama_7b.flags, so it runs ONE
rank's share: a target shard with the per-rank FLOPs of a TP4 x PP2 rank (16 of 32 layers, a quarter of
the heads and of the MLP width, micro-batch 1 of 4096 tokens) over M micro-batches, against the
Llama-3.2-1B-shaped teacher on the rows that rank runs: M/8 sequences (spread) or all M (owner, a TP
rank of the stage owning layer k). Ratio = (step + teacher seconds) / step. Transfers are not included
(about 0.5 GB per owning rank per iteration at 128 micro-batches, see ../shared/notes/teacher-cost.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# target / teacher shapes: the teacher's forward is ~12% of the target's forward+backward (the FLOP floor)
CPU = dict(layers=4, hidden=256, heads=4, ffn=1024, seq=128, vocab=1024, target_layer=1, global_batch=8,
           teacher=dict(layers=2, hidden=256, heads=4, kv=4, ffn=704))
LAYOUTS = {  # name: (processes, tp, pp, micro-batch size)
    "pp1": (1, 1, 1, 2), "pp2": (2, 1, 2, 2), "tp2_mb1": (2, 2, 1, 1), "tp2_mb2": (2, 2, 1, 2),
    "dp2": (2, 1, 1, 2),
}
ARMS = ("baseline", "spread", "owner")


def forward_flops_per_token(layers, hidden, ffn, seq, vocab, kv_ratio=1.0, lm_head=True):
    """Matmul FLOPs of one token's forward (2 per multiply-add; gated MLP; causal attention)."""
    per_layer = 2 * hidden * hidden * (2 + 2 * kv_ratio) + 2 * hidden * ffn * 3 + 2 * seq * hidden
    return layers * per_layer + (2 * hidden * vocab if lm_head else 0)


def floor(p) -> float:
    t = p["teacher"]
    teacher = forward_flops_per_token(t["layers"], t["hidden"], t["ffn"], p["seq"], 0, t["kv"] / t["heads"], False)
    return teacher / (3 * forward_flops_per_token(p["layers"], p["hidden"], p["ffn"], p["seq"], p["vocab"]))


def make_teacher(p, directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = p["teacher"]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=p["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"],
                                 num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                                 num_key_value_heads=t["kv"], max_position_embeddings=max(4096, p["seq"]),
                                 tie_word_embeddings=True)).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------ CPU worker
def worker(args):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    from megatron_let import LateToEarlyTraining, LETConfig
    from megatron_let.compat.cpu import enable_cpu_megatron
    from megatron_let.training.components import build_optimizer, initialize_parallel, shutdown_parallel, wrap_ddp
    from megatron_let.training.model import build_gpt_chunks
    from megatron_let.driver import LETDriver
    from megatron_let.training.step import train_step

    torch.set_num_threads(1)
    p = CPU
    _, tp, pp, mbs = LAYOUTS[args.layout]
    enable_cpu_megatron()
    initialize_parallel(tp=tp, pp=pp, seed=1234)
    config = TransformerConfig(
        num_layers=p["layers"], hidden_size=p["hidden"], num_attention_heads=p["heads"], ffn_hidden_size=p["ffn"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        batch_p2p_sync=False, batch_p2p_comm=False)

    def arm(placement):
        torch.manual_seed(1)
        let = None if placement is None else LateToEarlyTraining(LETConfig(
            teacher=args.teacher, target_layer=p["target_layer"], lambda0=0.1, stop_iter=10 ** 6,
            projector="linear", teacher_placement=placement), seed=1)
        if let is not None:
            let.work.synchronize = True
        model = wrap_ddp(build_gpt_chunks(config, p["vocab"], p["seq"], let=let))
        return model, build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0)), let

    arms = {"baseline": arm(None), "spread": arm("spread"), "owner": arm("owner")}
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_replica = p["global_batch"] // dp_size
    num_microbatches = per_replica // mbs
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, p["vocab"], (p["global_batch"], p["seq"] + 1), generator=gen)

    def batches():
        local = data[dp_rank * per_replica:(dp_rank + 1) * per_replica]
        for first in range(0, per_replica, mbs):
            rows = local[first:first + mbs]
            yield {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                   "loss_mask": torch.ones(rows.shape[0], p["seq"]),
                   "position_ids": torch.arange(p["seq"]).expand(rows.shape[0], p["seq"]).contiguous(),
                   "attention_mask": None}

    drivers = {}

    def step(name, iteration):
        model, optimizer, let = arms[name]
        dist.barrier()
        start = time.perf_counter()
        driver = drivers.setdefault(name, LETDriver(let, mbs, p["seq"], lambda line: None))
        train_step(batches(), model, optimizer, driver, iteration, num_microbatches, p["seq"], mbs)
        dist.barrier()
        return time.perf_counter() - start, (let.work.seconds if let is not None else 0.0)

    for iteration in range(args.warmup):
        for name in ARMS:
            step(name, iteration)
    times = {name: [] for name in ARMS}
    teacher = {name: [] for name in ARMS}
    for rep in range(args.reps):
        order = ARMS[rep % 3:] + ARMS[:rep % 3]
        for name in order:
            seconds, teacher_seconds = step(name, args.warmup + rep)
            times[name].append(seconds)
            teacher[name].append(teacher_seconds)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {name: statistics.median(teacher[name]) for name in ARMS})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"times": times, "teacher_seconds_per_rank": per_rank}, f)
    shutdown_parallel()


def quartiles(values):
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def cpu_main(args):
    teacher = make_teacher(CPU, tempfile.mkdtemp(prefix="let-placement-teacher-"))
    print(f"target {CPU['layers']}x{CPU['hidden']} seq {CPU['seq']} vocab {CPU['vocab']}, global batch "
          f"{CPU['global_batch']}; teacher {CPU['teacher']['layers']}x{CPU['teacher']['hidden']}; FLOP floor "
          f"{floor(CPU):.1%}; {args.reps} alternating repetitions after {args.warmup} warm-up steps", flush=True)
    rows = []
    for layout in args.layouts:
        nproc = LAYOUTS[layout][0]
        out = os.path.join(tempfile.mkdtemp(prefix="let-placement-"), "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={29600 + len(rows)}", os.path.abspath(__file__), "--worker", "--layout", layout,
               "--teacher", teacher, "--reps", str(args.reps), "--warmup", str(args.warmup), "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
                   CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{layout} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            result = json.load(f)
        base = result["times"]["baseline"]
        for placement in ("spread", "owner"):
            ratios = [a / b for a, b in zip(result["times"][placement], base)]
            low, high = quartiles(ratios)
            ratio = statistics.median(result["times"][placement]) / statistics.median(base)
            teacher_s = [r[placement] for r in result["teacher_seconds_per_rank"]]
            paired = statistics.median(ratios)
            rows.append((layout, placement, statistics.median(base), ratio, paired, low, high, teacher_s))
            print(f"{layout:8s} {placement:6s} baseline {statistics.median(base) * 1e3:7.1f} ms  LET/baseline "
                  f"{ratio:.3f} (median of per-rep ratios {paired:.3f}, IQR {low:.3f}-{high:.3f})  teacher s/step per rank "
                  f"{' '.join(f'{s * 1e3:.1f}ms' for s in teacher_s)}", flush=True)
    print("\n| layout | placement | baseline s/step | LET / baseline (medians) | median per-rep ratio (IQR) "
          "| teacher ms/step per rank |")
    print("|---|---|---|---|---|---|")
    for layout, placement, base, ratio, paired, low, high, teacher_s in rows:
        print(f"| {layout} | {placement} | {base:.3f} | {ratio:.3f} | {paired:.3f} ({low:.3f}-{high:.3f}) | "
              f"{', '.join(f'{s * 1e3:.0f}' for s in teacher_s)} |")
    pp1 = {placement: ratio for layout, placement, _, ratio, *_ in rows if layout == "pp1"}
    if "spread" in pp1:
        worst = max(abs(ratio - pp1["spread"]) for _, placement, _, ratio, *_ in rows if placement == "spread")
        print(f"\nspread: largest distance of a layout's ratio from PP1's: {worst * 100:.1f} points (goal <= 2)")


# ------------------------------------------------------------------------------------------ GPU preset
GPU_7B = dict(layers=16, hidden=4096, heads=8, groups=2, ffn=2752, seq=4096, vocab=128256 // 4, microbatches=16,
              group=8, teacher=dict(layers=16, hidden=2048, heads=32, kv=8, ffn=8192))


def gpu_main(args):
    """One TP4 x PP2 rank's share of the 7B template on one GPU (bf16), see the module docstring."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_let.compat.cpu import enable_cpu_megatron
    from megatron_let.teachers.huggingface import HFTeacher
    from megatron_let.training.components import build_optimizer, initialize_parallel, wrap_ddp
    from megatron_let.training.model import build_gpt_chunks
    from megatron_let.driver import LETDriver
    from megatron_let.training.step import train_step

    p = dict(GPU_7B)
    on_gpu = torch.cuda.is_available()
    if args.dry_run:  # CPU smoke of the same code path, tiny shapes
        p.update(layers=2, hidden=128, heads=2, groups=2, ffn=128, seq=64, vocab=256, microbatches=8,
                 teacher=dict(layers=1, hidden=64, heads=2, kv=2, ffn=128))
    m = args.microbatches or p["microbatches"]
    os.environ.setdefault("MASTER_PORT", "29619")
    enable_cpu_megatron()
    initialize_parallel(seed=1234)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = TransformerConfig(
        num_layers=p["layers"], hidden_size=p["hidden"], num_attention_heads=p["heads"],
        num_query_groups=p["groups"], kv_channels=128 if not args.dry_run else 64, ffn_hidden_size=p["ffn"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=on_gpu, params_dtype=dtype,
        pipeline_dtype=dtype, use_cpu_initialization=not on_gpu, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False)
    chunks = build_gpt_chunks(config, p["vocab"], p["seq"])
    if on_gpu:
        chunks = [Float16Module(config, c) for c in chunks]
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-4, bf16=on_gpu, clip_grad=1.0))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tokens = torch.randint(0, p["vocab"], (1, p["seq"]), device=device)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(1, p["seq"], device=device),
             "position_ids": torch.arange(p["seq"], device=device).unsqueeze(0), "attention_mask": None}
    teacher = HFTeacher(make_teacher(dict(p, vocab=p["vocab"]), tempfile.mkdtemp(prefix="let-7b-teacher-")),
                        dtype, device=device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def target_step(i):
        sync()
        start = time.perf_counter()
        train_step(iter([batch] * m), model, optimizer, LETDriver(None, 1, p["seq"], print), i, m, p["seq"], 1)
        sync()
        return time.perf_counter() - start

    def teacher_rows(n):
        sync()
        start = time.perf_counter()
        for _ in range(n):  # micro-batch 1: one sequence at a time, as the hook would run it
            teacher.hidden_states(tokens)
        sync()
        return time.perf_counter() - start

    spread_rows, owner_rows = -(-m // p["group"]), m
    target_step(0), teacher_rows(1)  # warm-up
    steps, spread, owner = [], [], []
    for rep in range(args.reps):
        steps.append(target_step(rep + 1))
        spread.append(teacher_rows(spread_rows))
        owner.append(teacher_rows(owner_rows))
    step = statistics.median(steps)
    t = p["teacher"]
    print(f"one TP4 x PP2 rank of the 7B template ({p['layers']} layers, {m} micro-batches of 1 x {p['seq']}), "
          f"{'bf16 ' + torch.cuda.get_device_name() if on_gpu else 'CPU dry run'}; teacher {t['layers']}x{t['hidden']}")
    print(f"target step {step:.3f} s; teacher {spread_rows} rows (spread, 1/{p['group']}) "
          f"{statistics.median(spread):.3f} s -> LET/baseline {1 + statistics.median(spread) / step:.3f}; "
          f"{owner_rows} rows (owner, a TP rank of layer k's stage) {statistics.median(owner):.3f} s -> "
          f"{1 + statistics.median(owner) / step:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("cpu", "gpu-7b-layout"), default="cpu")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions (cpu 20, gpu 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=None, help="gpu-7b-layout: micro-batches per step")
    parser.add_argument("--dry-run", action="store_true", help="gpu-7b-layout at tiny shapes (CPU check)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.preset == "gpu-7b-layout":
        args.reps = args.reps or 5
        return gpu_main(args)
    args.reps = args.reps or 20
    return cpu_main(args)


if __name__ == "__main__":
    main()
