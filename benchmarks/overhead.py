"""LET's step-time and memory cost against the same run without LET, measured side by side.

    python benchmarks/overhead.py                      # CPU preset (a few minutes on 2 cores)
    python benchmarks/overhead.py --auto               # + a third arm with --let-lambda auto (issue 27)
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --clock process   # on shared cores: CPU seconds per step
    torchrun --nproc-per-node 1 benchmarks/overhead.py --preset gpu-1.4b   # H100/H200, bf16

Two identical targets (same seed, data, optimizer) are trained in one process,
steps alternating: A carries LET, B does not. Reported per phase (while lambda
> 0, and after the stop step when A's hooks are gone and its teacher released):
median step time, tokens/s, memory, and the ratio A/B; plus the physical floor,
teacher forward FLOPs over target forward+backward FLOPs. With --auto a third
target, C, carries LET with --let-lambda auto (the probe's extra autograd call
and sums), in the same rotation: C/B beside A/B, and C/A.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # target: layers, hidden, heads, kv groups, ffn, seq, micro batch, micro batches; teacher: HF Llama shape
    # A 10x-smaller teacher, as in the paper, at a size 2 CPU cores step through in ~0.3 s.
    "cpu-small": dict(layers=6, hidden=384, heads=6, groups=6, ffn=1024, seq=256, mbs=4, microbatches=2,
                      vocab=4096, teacher=dict(layers=3, hidden=128, heads=4, kv=2, ffn=352),
                      target_layer=1, steps=20, stop=20, dtype="fp32"),
    # The paper's 1.4B shape with a SmolLM2-135M-shaped teacher.
    "gpu-1.4b": dict(layers=24, hidden=2048, heads=16, groups=16, ffn=5504, seq=2048, mbs=4, microbatches=2,
                     vocab=49152, teacher=dict(layers=30, hidden=576, heads=9, kv=3, ffn=1536),
                     target_layer=4, steps=30, stop=15, dtype="bf16"),
}


def forward_flops_per_token(layers, hidden, ffn, seq, vocab, kv_ratio=1.0, gated=True, lm_head=True):
    """Matmul FLOPs of one token's forward pass (2 per multiply-add), causal attention included."""
    attention_proj = 2 * hidden * hidden * (2 + 2 * kv_ratio)  # q, o full; k, v by GQA ratio
    mlp = 2 * hidden * ffn * (3 if gated else 2)
    attention_scores = 2 * 2 * seq * hidden / 2  # QK^T and AV, causal: half the positions
    head = 2 * hidden * vocab if lm_head else 0
    return layers * (attention_proj + mlp + attention_scores) + head


def build_arm(p, teacher_dir, lambda0, seed, fp8=None):
    """A target and its optimizer; with LET at ``lambda0`` (0.1, or "auto") unless it is None."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_let import LateToEarlyTraining, LETConfig
    from megatron_let.training.components import build_optimizer, wrap_ddp
    from megatron_let.training.model import build_gpt_chunks

    bf16 = p["dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=p["layers"], hidden_size=p["hidden"], num_attention_heads=p["heads"],
        num_query_groups=p["groups"], ffn_hidden_size=p["ffn"], normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, fp8=fp8)
    torch.manual_seed(seed)
    let = None
    if lambda0 is not None:
        let = LateToEarlyTraining(LETConfig(teacher=teacher_dir, target_layer=p["target_layer"], lambda0=lambda0,
                                            stop_iter=p["stop"], projector="linear"), seed=seed)
    chunks = build_gpt_chunks(config, p["vocab"], p["seq"], let=let)
    if bf16:
        chunks = [Float16Module(config, c) for c in chunks]
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, clip_grad=1.0))
    return model, optimizer, let


def make_teacher(p, directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = p["teacher"]
    config = LlamaConfig(vocab_size=p["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         num_key_value_heads=t["kv"], max_position_embeddings=max(2048, p["seq"]),
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def memory_now():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm and phase")
    parser.add_argument("--teacher", default=None, help="HF teacher dir (default: random, preset shape)")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None,
                        help="target in fp8 (TransformerEngine layers on a GPU); the teacher stays in --preset dtype")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU seconds per step (time.process_time; with OMP_NUM_THREADS=1 "
                             "a CPU cost that other jobs on the cores do not inflate); wall: elapsed time (GPU)")
    parser.add_argument("--auto", action="store_true",
                        help="a third arm with --let-lambda auto: its cost against the fixed lambda 0.1 arm")
    args = parser.parse_args()
    from megatron_let.training.arguments import has_transformer_engine

    if args.fp8 and not (torch.cuda.is_available() and has_transformer_engine()):
        sys.exit("error: --fp8 needs a GPU with TransformerEngine (pip install megatron-let[gpu]); "
                 "run without --fp8 for bf16/fp32.")
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = p["stop"] = args.steps

    from megatron_let.compat.cpu import enable_cpu_megatron
    from megatron_let.training.components import initialize_parallel
    from megatron_let.driver import LETDriver
    from megatron_let.training.step import train_step

    os.environ.setdefault("MASTER_PORT", "29517")
    enable_cpu_megatron()  # only without CUDA
    initialize_parallel(seed=1234)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    teacher_dir = args.teacher or make_teacher(p, tempfile.mkdtemp(prefix="let-teacher-"))
    arms = {"baseline": build_arm(p, teacher_dir, None, 1, args.fp8),
            "let": build_arm(p, teacher_dir, 0.1, 1, args.fp8)}
    if args.auto:
        arms["let auto"] = build_arm(p, teacher_dir, "auto", 1, args.fp8)
    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, p["vocab"], (p["mbs"], p["seq"]), generator=gen)}
    batch["labels"] = torch.roll(batch["tokens"], -1, 1)
    batch["loss_mask"] = torch.ones(p["mbs"], p["seq"])
    batch["position_ids"] = torch.arange(p["seq"]).expand(p["mbs"], p["seq"])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["attention_mask"] = None
    tokens_per_step = p["mbs"] * p["seq"] * p["microbatches"]
    clock = time.process_time if args.clock == "process" else time.perf_counter

    drivers = {}

    def step(name, iteration):
        model, optimizer, let = arms[name]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = clock()
        driver = drivers.setdefault(name, LETDriver(let, p["mbs"], p["seq"], lambda line: None))
        train_step(iter([batch] * p["microbatches"]), model, optimizer, driver, iteration, p["microbatches"],
                   p["seq"], p["mbs"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return clock() - start, memory_now()

    times = {(arm, phase): [] for arm in arms for phase in ("align", "after")}
    memory = {key: [] for key in times}
    for warm in range(2):  # warm-up every arm (allocator, teacher load), not timed
        for name in arms:
            step(name, 0)
    names = list(arms)
    for i in range(2 * p["steps"]):
        iteration = i if i < p["stop"] else p["stop"] + i  # second half: past the stop step
        phase = "align" if iteration < p["stop"] else "after"
        for name in names[i % len(names):] + names[:i % len(names)]:  # each arm first in turn
            seconds, mem = step(name, iteration)
            times[(name, phase)].append(seconds)
            memory[(name, phase)].append(mem)
        if phase == "after":
            gc.collect()

    t = p["teacher"]
    teacher_flops = forward_flops_per_token(t["layers"], t["hidden"], t["ffn"], p["seq"], p["vocab"],
                                            kv_ratio=t["kv"] / t["heads"], lm_head=False)
    target_flops = 3 * forward_flops_per_token(p["layers"], p["hidden"], p["ffn"], p["seq"], p["vocab"],
                                               kv_ratio=p["groups"] / p["heads"])
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    precision = f"fp8 {args.fp8} (TransformerEngine)" if args.fp8 else p["dtype"]
    print(f"\nLET overhead, preset {args.preset} ({precision}) on {device_name}, torch {torch.__version__}, "
          f"{p['steps']} alternating steps per phase and arm, {tokens_per_step} tokens/step, "
          f"{'CPU seconds of this process' if args.clock == 'process' else 'wall-clock seconds'} per step")
    print(f"FLOP floor (teacher fwd / target fwd+bwd): {100 * teacher_flops / target_flops:.1f}%")
    print("| phase | arm | baseline s/step | LET s/step | ratio | baseline tok/s | LET tok/s | memory LET/baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for phase in ("align", "after"):
        b, mb = statistics.median(times[("baseline", phase)]), max(memory[("baseline", phase)])
        label = "alignment (lambda > 0)" if phase == "align" else "after the stop step"
        for name in names[1:]:
            l, ml = statistics.median(times[(name, phase)]), max(memory[(name, phase)])
            arm = "lambda 0.1" if name == "let" else "lambda auto"
            print(f"| {label} | {arm} | {b:.4f} | {l:.4f} | {l / b:.3f} | {tokens_per_step / b:,.0f} | "
                  f"{tokens_per_step / l:,.0f} | {ml / mb:.3f} ({ml / 2**30:.2f} / {mb / 2**30:.2f} GiB) |")
    if args.auto:
        for phase in ("align", "after"):
            fixed, auto = (statistics.median(times[(name, phase)]) for name in ("let", "let auto"))
            print(f"auto / fixed lambda, {phase}: {auto / fixed:.3f} ({100 * (auto / fixed - 1):+.1f} points)")
    if not torch.cuda.is_available():
        print("(CPU memory is the process RSS high-water mark, shared by both arms; on GPU it is each arm's "
              "peak allocated memory per step)")


if __name__ == "__main__":
    main()
