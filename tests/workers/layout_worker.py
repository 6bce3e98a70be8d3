"""Trains a tiny GPTModel with LET under one parallel layout and writes per-iteration numbers.

Run under torchrun. All layouts load the same initial weights (a torch_dist
checkpoint written once with ``--save-ref``), see the same global batches, and
record lm loss, let loss/cos/lambda, grad norm and a teacher weight checksum.
"""

import argparse
import gc
import json
import os
import shlex
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: let_testing

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from let_testing import tiny_transformer_config  # noqa: E402
from megatron_let import LateToEarlyTraining, LETConfig  # noqa: E402
from megatron_let.compat.cpu import enable_cpu_megatron  # noqa: E402
from megatron_let.driver import LETDriver  # noqa: E402
from megatron_let.training.components import build_optimizer, initialize_parallel, shutdown_parallel, wrap_ddp  # noqa: E402
from megatron_let.training.model import build_gpt_chunks, layer_spec  # noqa: E402
from megatron_let.training.step import train_step  # noqa: E402

VOCAB, SEQ = 128, 32


LAYOUT_FLAGS = ("tp", "pp", "vpp", "ep")  # the process groups: one per launch, shared by every --also run


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--placement", default="spread", choices=("spread", "owner"))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--teacher", default=None, help="HF teacher dir; no LET when absent")
    p.add_argument("--target-layer", type=int, default=2)
    p.add_argument("--lambda0", type=lambda v: v if v == "auto" else float(v), default=0.5)  # or auto (issue 27)
    p.add_argument("--auto-fraction", type=float, default=None, help="--lambda0 auto: lambda_auto_fraction")
    p.add_argument("--stop-iter", type=int, default=100)
    p.add_argument("--stop", default="schedule", help="auto: --let-stop auto (issue 27), with the three below")
    p.add_argument("--stop-threshold", type=float, default=None)
    p.add_argument("--stop-window", type=int, default=None)
    p.add_argument("--stop-warmup", type=int, default=None)
    p.add_argument("--projector", default="linear")
    p.add_argument("--per-token-loss", action="store_true")
    p.add_argument("--save-ref", default=None)
    p.add_argument("--load-ref", default=None)
    p.add_argument("--out", required=True)
    # activation recompute (issue 16): each variant trains from the same weights in this process;
    # "none", "selective", "full:uniform|block:N", or "no-let" (same model, LET off). Results under "variants",
    # the first also as "records".
    p.add_argument("--recompute", nargs="+", default=["none"])
    # MoE target (issue 16): experts in every layer, expert parallelism, MoE's load-balancing aux loss
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--moe-aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--dispatcher", default="allgather")
    # LET token alignment (tests/test_token_alignment.py): a teacher with another tokenizer
    p.add_argument("--target-tokenizer", default=None, help="HF tokenizer dir of the target: ids drawn from it, "
                                                            "EOD = its eos id, --let-token-alignment causal-span")
    p.add_argument("--teacher-tokenizer", default=None)
    p.add_argument("--prefetch-alignment", action="store_true", help="alignments from the micro-batch iterator")
    # more runs in this launch (a launch costs seconds of imports per rank; a run of 3 tiny iterations, less)
    p.add_argument("--also", action="append", default=[], metavar="NAME=FLAGS",
                   help="train again from the same weights with FLAGS added (not the layout's): under 'also'[NAME]")
    return p.parse_args(argv)


def also_runs(args) -> dict:
    """NAME -> the args of each --also run: this launch's flags with the run's own added last (they win)."""
    runs = {}
    for spec in args.also:
        name, flags = spec.split("=", 1)
        runs[name] = parse([*sys.argv[1:], *shlex.split(flags)])
        assert all(getattr(runs[name], f) == getattr(args, f) for f in LAYOUT_FLAGS), f"--also {spec}: layout flag"
    return runs


def global_batch(iteration: int, size: int, vocab: int = VOCAB, eod: int = 0):
    """Deterministic token batch for one iteration; some EOD (0) tokens give loss-mask zeros."""
    gen = torch.Generator().manual_seed(1000 + iteration)
    data = torch.randint(1, vocab, (size, SEQ + 1), generator=gen)
    data[torch.rand(size, SEQ + 1, generator=gen) < 0.1] = eod
    return data


def microbatches(iteration: int, args):
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = global_batch(iteration, args.global_batch, args.data_vocab, args.eod)
    per_rank = args.global_batch // dp_size
    local = data[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    for start in range(0, per_rank, args.mbs):
        chunk = local[start:start + args.mbs]
        tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        yield {"tokens": tokens, "labels": labels, "loss_mask": (tokens != args.eod).float(),
               "position_ids": torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], SEQ).contiguous(),
               "attention_mask": None}


def moe_settings(args) -> dict:
    if not args.num_experts:
        return {}
    return {"num_moe_experts": args.num_experts, "moe_router_topk": args.topk, "moe_ffn_hidden_size": 128,
            "expert_model_parallel_size": args.ep, "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": args.moe_aux_loss_coeff, "moe_token_dispatcher_type": args.dispatcher,
            "moe_grouped_gemm": False}


def moe_aux_loss() -> float:
    """MoE's load-balancing loss of this iteration, summed over layers and all micro-batches of the
    global batch (megatron-core's tracker; summed over PP and DP), then cleared."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]
    values = entry["values"].clone()
    clear_aux_losses_tracker()
    torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    if entry.get("reduce_group") is not None:  # as megatron's reduce_aux_losses_tracker_across_ranks
        torch.distributed.all_reduce(values, group=entry["reduce_group"])
    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values.sum().item()


def recompute_settings(variant: str) -> dict:
    if variant in ("none", "no-let"):
        return {}
    if variant == "selective":
        return {"recompute_granularity": "selective"}
    granularity, method, num_layers = variant.split(":")
    return {"recompute_granularity": granularity, "recompute_method": method,
            "recompute_num_layers": int(num_layers)}


TEACHER_CALLS = [0]


def count_teacher_forwards() -> None:
    """Count teacher forward passes (a wrapper around the real one): full recompute must not add any."""
    from megatron_let.teachers.huggingface import HFTeacher

    forward = HFTeacher.hidden_states

    def counted(self, *args, **kwargs):
        TEACHER_CALLS[0] += 1
        return forward(self, *args, **kwargs)

    HFTeacher.hidden_states = counted


def main():
    args = parse()
    count_teacher_forwards()
    enable_cpu_megatron()  # only without CUDA
    initialize_parallel(tp=args.tp, pp=args.pp, vpp=args.vpp, seed=1234, ep=args.ep)
    results = {variant: train(args, variant) for variant in args.recompute}
    also = {name: train(run, run.recompute[0]) for name, run in also_runs(args).items()}
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1 and not args.save_ref:
        first = results[args.recompute[0]]
        with open(args.out, "w") as f:
            json.dump({**first, "variants": results, "also": also}, f)
    shutdown_parallel()


def train(args, variant: str) -> dict:
    config = tiny_transformer_config(
        args.num_layers, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, sequence_parallel=args.sp,
        calculate_per_token_loss=args.per_token_loss, **recompute_settings(variant), **moe_settings(args))
    let = None
    # LET token alignment: ids from a real target tokenizer, teacher re-tokenizes (causal-span)
    target_tokenizer, vocab, args.data_vocab, args.eod = None, VOCAB, VOCAB, 0
    if args.target_tokenizer:
        from transformers import AutoTokenizer

        target_tokenizer = AutoTokenizer.from_pretrained(args.target_tokenizer)
        args.data_vocab, args.eod = len(target_tokenizer), target_tokenizer.eos_token_id
        vocab = -(-args.data_vocab // 128) * 128
    if args.teacher and variant != "no-let":
        alignment = {"token_alignment": "causal-span", "teacher_tokenizer": args.teacher_tokenizer} \
            if args.target_tokenizer else {}
        let = LateToEarlyTraining(LETConfig(teacher=args.teacher, target_layer=args.target_layer,
                                            lambda0=args.lambda0, stop_iter=args.stop_iter,
                                            projector=args.projector, teacher_placement=args.placement,
                                            lambda_auto_fraction=args.auto_fraction, stop=args.stop,
                                            stop_auto_threshold=args.stop_threshold,
                                            stop_auto_window=args.stop_window,
                                            stop_auto_warmup=args.stop_warmup, **alignment),
                                  target_tokenizer=target_tokenizer, eod_id=args.eod)
    chunks = build_gpt_chunks(config, vocab, SEQ, let=let, spec=layer_spec(config, "local"))
    if args.save_ref:
        os.makedirs(args.save_ref, exist_ok=True)
        dist_checkpointing.save(chunks[0].sharded_state_dict(), args.save_ref)
        with open(args.out, "w") as f:
            json.dump({"saved": args.save_ref}, f)
        return {}
    if args.load_ref:
        if len(chunks) == 1:
            state = dist_checkpointing.load(chunks[0].sharded_state_dict(), args.load_ref)
            chunks[0].load_state_dict(state)
        else:  # interleaved: one load call for all chunks
            sharded = {f"model{i}": c.sharded_state_dict(prefix="") for i, c in enumerate(chunks)}
            state = dist_checkpointing.load(sharded, args.load_ref)
            for i, chunk in enumerate(chunks):
                chunk.load_state_dict(state[f"model{i}"])
    model = wrap_ddp(chunks, use_distributed_optimizer=args.dist_opt)
    optimizer = build_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, bf16=False, fp16=False,
        use_distributed_optimizer=args.dist_opt))
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = args.global_batch // dp_size // args.mbs
    teacher_before = None
    teacher_refs = []
    records, per_rank = [], []
    driver = LETDriver(let, args.mbs, SEQ, lambda line: None)
    for iteration in range(args.iters):
        iterators = [microbatches(iteration, args) for _ in model]
        if args.prefetch_alignment and let is not None and let.owns_target_layer:  # LET token alignment
            from megatron_let.teachers.token_alignment import AlignmentPrefetcher

            iterators = [AlignmentPrefetcher(it, let.aligner) for it in iterators]
        metrics = train_step(iterators if len(model) > 1 else iterators[0], model, optimizer, driver,
                             iteration, num_microbatches, SEQ, args.mbs)
        if let is not None:
            metrics.update(let.report())
            # per rank: teacher rows run this iteration, and whether a teacher this rank loaded is alive
            if let._teacher is not None and let._teacher.model is not None:
                teacher_refs.append(weakref.ref(let._teacher.model))
            gc.collect()
            mine = (let.work.rows, any(ref() is not None for ref in teacher_refs), bool(teacher_refs))
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
            per_rank.append({"teacher rows": [e[0] for e in every], "teacher alive": [e[1] for e in every],
                             "teacher loaded": [e[2] for e in every]})
            calls = torch.tensor([float(TEACHER_CALLS[0])])
            torch.distributed.all_reduce(calls)  # summed over ranks: the owners' TP parts add up
            if calls.item() > 0:  # (lambda 0: no teacher ran, the record stays that of a run without LET)
                metrics["teacher forwards"] = calls.item()
            TEACHER_CALLS[0] = 0
        if args.num_experts:
            metrics["moe aux loss"] = moe_aux_loss()
        if let is not None and let.owns_target_layer and let._teacher is not None:
            teacher_params = list(let._teacher.model.parameters())
            checksum = sum(p.double().sum().item() for p in teacher_params)
            metrics["teacher checksum"] = checksum
            metrics["teacher has grad"] = any(p.grad is not None for p in teacher_params)
            teacher_before = checksum if teacher_before is None else teacher_before
        records.append(metrics)
    return {"records": records, "teacher_first_checksum": teacher_before, "per_rank": per_rank}


if __name__ == "__main__":
    main()
