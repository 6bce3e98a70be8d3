"""End-to-end check of megatron_let.compat.cpu: megatron-core training on CPU.

Not a pytest file.  Builds a tiny GPTModel (local layer spec), wraps it in
megatron DDP, trains it with get_megatron_optimizer (Adam) and
get_forward_backward_func() for a few steps, and prints loss and grad norm per
step.  Different layouts are made comparable by loading identical weights from
a dist_checkpointing (torch_dist) checkpoint and feeding the same global batch
(micro-batches are always 4; micro-batch size is 2 / DP).

    # reference: single process, saves its initial weights
    torchrun --nproc-per-node 1 tests/cpu_compat_smoke.py --save-init /tmp/ck/init --out /tmp/ck/ref.json
    # a layout, compared with the reference (exit code 1 if it differs)
    torchrun --nproc-per-node 2 tests/cpu_compat_smoke.py --tp 2 --sp --load /tmp/ck/init \
        --compare /tmp/ck/ref.json
    # save from a 2-process run; re-load it in one process and compare eval loss
    torchrun --nproc-per-node 2 tests/cpu_compat_smoke.py --pp 2 --load /tmp/ck/init \
        --save-final /tmp/ck/pp2 --out /tmp/ck/pp2.json
    torchrun --nproc-per-node 1 tests/cpu_compat_smoke.py --load /tmp/ck/pp2 --eval-only \
        --compare /tmp/ck/pp2.json

Layout flags: --tp N, --sp, --pp N, --vpp N (model chunks per stage),
--dist-opt; DP is world_size / (tp * pp).  --arch llama (RoPE, RMSNorm,
SwiGLU, GQA; default) or gpt (learned positions, LayerNorm, GeLU).
"""

import argparse
import json
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

VOCAB, SEQ, LAYERS, HIDDEN, HEADS = 128, 32, 4, 64, 4
MICROBATCHES, GLOBAL_SAMPLES = 4, 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="model chunks per pipeline stage")
    p.add_argument("--sp", action="store_true", help="sequence parallel")
    p.add_argument("--dist-opt", action="store_true", help="distributed optimizer")
    p.add_argument("--arch", choices=["llama", "gpt"], default="llama")
    p.add_argument("--batch-p2p-comm", action="store_true",
                   help="batched P2P (wrong losses with interleaved PP=2 on gloo without cpu_compat)")
    p.add_argument("--bf16", action="store_true", help="bf16 params, fp32 main params")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--load", help="torch_dist checkpoint to load the model from")
    p.add_argument("--save-init", help="save the initial model (torch_dist) here")
    p.add_argument("--save-final", help="save the trained model (torch_dist) here")
    p.add_argument("--fully-parallel", action="store_true",
                   help="save/load through the FullyParallel*StrategyWrapper (over DP)")
    p.add_argument("--eval-only", action="store_true", help="only the eval loss")
    p.add_argument("--out", help="write results (json) here")
    p.add_argument("--compare", help="json of a reference run to compare with")
    p.add_argument("--rtol", type=float, default=1e-6)
    return p.parse_args()


def build_config(args):
    from megatron.core.transformer import TransformerConfig

    llama = args.arch == "llama"
    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=2 if llama else None,
        ffn_hidden_size=4 * HIDDEN,
        normalization="RMSNorm" if llama else "LayerNorm",
        gated_linear_unit=llama,
        activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
        add_bias_linear=not llama,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        sequence_parallel=args.sp,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_sync=False,
        batch_p2p_comm=args.batch_p2p_comm,  # see compat/cpu.py's cpu.unbatched-p2p
    )


def build_model(args, config):
    """The project's own chunk builder (one GPTModel per virtual stage), without LET."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_let.training.model import build_gpt_chunks

    return build_gpt_chunks(config, VOCAB, SEQ,
                            position_embedding_type="rope" if args.arch == "llama" else "learned_absolute",
                            spec=get_gpt_layer_local_spec(normalization=config.normalization))


def _strategy(fully_parallel, save, path=None):
    """None (the default torch_dist strategy) or it wrapped to spread work over DP."""
    if not fully_parallel:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies import fully_parallel as fp

    group = ps.get_data_parallel_group(with_context_parallel=True)
    if save:
        return fp.FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
    return fp.FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


def load_checkpoint(chunks, path, fully_parallel=False):
    """All chunks in ONE load call (separate calls fail under interleaved PP)."""
    from megatron.core import dist_checkpointing

    sharded = {f"chunk{i}": m.sharded_state_dict() for i, m in enumerate(chunks)}
    loaded = dist_checkpointing.load(sharded, path, _strategy(fully_parallel, False, path))
    for i, m in enumerate(chunks):
        result = m.load_state_dict(loaded[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not missing, f"not in checkpoint: {missing}"


def save_checkpoint(chunks, path, fully_parallel=False):
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    sharded = {f"chunk{i}": m.sharded_state_dict() for i, m in enumerate(chunks)}
    dist_checkpointing.save(sharded, path, _strategy(fully_parallel, True))


def global_batch(step):
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_SAMPLES, SEQ + 1), generator=g)


def micro_batches(step, dp_rank, dp_size):
    """Micro-batch m holds samples [2m, 2m+2) of the global batch, split over DP."""
    tokens = global_batch(step)
    mbs = GLOBAL_SAMPLES // MICROBATCHES // dp_size
    batches = []
    for m in range(MICROBATCHES):
        start = m * (GLOBAL_SAMPLES // MICROBATCHES) + dp_rank * mbs
        t = tokens[start : start + mbs]
        batches.append(
            {
                "tokens": t[:, :-1].contiguous(),
                "labels": t[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, SEQ),
                "position_ids": torch.arange(SEQ).unsqueeze(0).expand(mbs, -1),
            }
        )
    return batches, mbs


def loss_func(loss_mask, output_tensor):
    loss = (output_tensor.float().view(-1) * loss_mask.view(-1)).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def run_schedule(args, model, step, forward_only):
    """One global batch through the pipeline schedule; returns the mean loss (or None)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches, mbs = micro_batches(
        step, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    )
    iters = [iter(batches) for _ in model]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.stack([x["lm loss"] for x in losses]).mean().item()


def gather_to_rank0(value):
    """Mean over the ranks that hold a loss (last stage, TP rank 0: one per DP rank)."""
    from megatron.core import parallel_state as ps

    keep = value is not None and ps.get_tensor_model_parallel_rank() == 0
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value if keep else None)
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def check_rng_tracker(args):
    """model_parallel_cuda_manual_seed on CPU: TP-rank-aware, seeded, reproducible."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    def draw():
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        default = torch.rand(4)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            model_parallel = torch.rand(4)
        after = torch.rand(4)  # the default stream continues where it left off
        return default, model_parallel, after

    d1, mp1, a1 = draw()
    d2, mp2, a2 = draw()
    assert torch.equal(d1, d2) and torch.equal(mp1, mp2) and torch.equal(a1, a2), "not seeded"
    assert not torch.equal(d1, mp1)
    torch.manual_seed(args.seed)
    ref = torch.rand(8)
    assert torch.equal(torch.cat([d1, a1]), ref), "fork() disturbed the default generator"
    world = torch.distributed.get_world_size()
    rows = [None] * world
    torch.distributed.all_gather_object(
        rows, (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), d1, mp1)
    )
    for tp_a, dp_a, d_a, mp_a in rows:
        for tp_b, dp_b, d_b, mp_b in rows:
            assert torch.equal(d_a, d_b), "default (DP) stream must match on all ranks"
            assert torch.equal(mp_a, mp_b) == (tp_a == tp_b), "TP stream must differ by TP rank"
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def main():
    args = parse_args()
    from megatron_let.compat.cpu import enable_cpu_megatron

    patched = enable_cpu_megatron()
    torch.distributed.init_process_group(backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
    )
    check_rng_tracker(args)

    t0 = time.perf_counter()
    config = build_config(args)
    chunks = build_model(args, config)
    if args.load:
        load_checkpoint(chunks, args.load, args.fully_parallel)
    if args.save_init:
        save_checkpoint(chunks, args.save_init, args.fully_parallel)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.dist_opt
    )
    if args.bf16:  # as Megatron-LM does: cast the model, fp32 main params in the optimizer
        from megatron.core.transformer.module import Float16Module

        chunks_to_wrap = [Float16Module(config, m) for m in chunks]
    else:
        chunks_to_wrap = chunks
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m)
        for m in chunks_to_wrap
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=5e-3,
            weight_decay=0.01,
            clip_grad=0.5,  # below the grad norm: exercises clip_grad_by_total_norm_fp32
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.dist_opt,
        ),
        model,
    )

    results = {"loss": [], "grad_norm": []}
    for step in range(0 if args.eval_only else args.steps):
        for m in model:
            m.train()
            m.zero_grad_buffer()
        optimizer.zero_grad()
        loss = gather_to_rank0(run_schedule(args, model, step, forward_only=False))
        ok, grad_norm, _ = optimizer.step()
        assert ok
        results["loss"].append(loss)
        results["grad_norm"].append(grad_norm)
        if rank == 0:
            print(f"step {step}: loss {loss:.8f} grad_norm {grad_norm:.8f}", flush=True)

    for m in model:
        m.eval()
    with torch.no_grad():
        results["eval_loss"] = gather_to_rank0(
            run_schedule(args, model, 1000, forward_only=True)
        )
    if rank == 0:
        print(f"eval loss {results['eval_loss']:.8f}", flush=True)
    if args.save_final:
        save_checkpoint(chunks, args.save_final, args.fully_parallel)
    results["wall_s"] = time.perf_counter() - t0
    torch.distributed.barrier()

    status = 0
    if rank == 0:
        dp = ps.get_data_parallel_world_size()
        layout = (
            f"world={world} tp={args.tp} sp={args.sp} pp={args.pp} vpp={args.vpp} dp={dp} "
            f"dist_opt={args.dist_opt} arch={args.arch} patched={patched}"
        )
        print(f"{layout}: {results['wall_s']:.2f} s build+train+eval", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"layout": layout, **results}, f, indent=1)
        if args.compare:
            with open(args.compare) as f:
                ref = json.load(f)
            pairs = [("eval_loss", ref["eval_loss"], results["eval_loss"])]
            for key in ("loss", "grad_norm"):
                pairs += [(f"{key}[{i}]", a, b) for i, (a, b) in enumerate(zip(ref[key], results[key]))]
            worst = max(abs(a - b) / abs(a) for _, a, b in pairs)
            for name, a, b in pairs:
                print(f"  {name:13s} ref {a:.8f} this {b:.8f} rel {abs(a - b) / abs(a):.1e}")
            print(f"max relative diff vs {args.compare}: {worst:.2e} (rtol {args.rtol:.0e})")
            status = 0 if worst <= args.rtol else 1
            print("PASS" if status == 0 else "FAIL", flush=True)
    status_t = torch.tensor([status])
    torch.distributed.broadcast(status_t, 0)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    sys.exit(int(status_t.item()))


if __name__ == "__main__":  # the torch_dist saver's helper process re-imports this file
    main()
