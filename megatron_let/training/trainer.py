"""The megatron-core-only training loop behind pretrain_gpt_let.py (when Megatron-LM is absent)."""

import math
from typing import List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_let.checkpoint_files import latest_iteration
from megatron_let.controller import LateToEarlyTraining
from megatron_let.driver import LETDriver
from megatron_let.errors import LETConfigError
from megatron_let.integrations.launch import build_let
from megatron_let.resume import read_saved_let_state
from megatron_let.training import checkpoint as ckpt
from megatron_let.training.arguments import vocab_size_with_padding
from megatron_let.training.components import build_optimizer, initialize_parallel, wrap_ddp
from megatron_let.training.data import build_datasets, build_tokenizer, microbatches
from megatron_let.training.logger import TrainingLogger, print_rank_last
from megatron_let.training.model import build_gpt_chunks, layer_spec
from megatron_let.training.step import run_schedule, train_step
from megatron_let.weight.stop import TrainingSchedule


def transformer_config_from_args(args) -> TransformerConfig:
    """Megatron-LM's flag -> TransformerConfig mapping, fusions only where CUDA kernels exist."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=args.add_bias_linear,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
        pipeline_dtype=dtype, params_dtype=dtype, bf16=args.bf16, fp16=args.fp16, fp8=args.fp8_format,
        calculate_per_token_loss=args.calculate_per_token_loss,
        use_cpu_initialization=args.use_cpu_initialization or not on_gpu,
        bias_activation_fusion=False, masked_softmax_fusion=on_gpu and not args.no_masked_softmax_fusion,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # gloo: batched p2p gives silently wrong interleaved-pipeline results (see cpu_compat).
        batch_p2p_comm=on_gpu, batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=True,
        **recompute_and_moe_config(args),
    )


def recompute_and_moe_config(args) -> dict:
    """TransformerConfig fields of --recompute-* and the MoE flags (Megatron-LM's mapping)."""
    kwargs = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                  recompute_num_layers=args.recompute_num_layers)
    if args.recompute_modules is not None:
        kwargs["recompute_modules"] = args.recompute_modules
    if args.num_experts is not None:
        kwargs.update(
            num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type, moe_grouped_gemm=False)
    return kwargs


def _reseed(seed: int, iteration: int) -> None:
    """RNG that depends only on (seed, iteration): a resumed run draws what an unbroken one draws."""
    torch.manual_seed(seed + iteration)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + iteration)


def _prefetch_alignments(iterators: list, model: list, let: Optional[LateToEarlyTraining]) -> list:
    """causal-span: the chunk owning the target layer gets its micro-batches' alignments computed in a
    background thread ahead of time (other chunks and stages never need them)."""
    if let is None or let.finished or not let.owns_target_layer or let.aligner is None \
            or let.config.teacher_placement == "spread":  # spread: each rank aligns its own rows up front
        return iterators
    from megatron_let.teachers.token_alignment import AlignmentPrefetcher

    def owns(chunk) -> bool:
        while chunk is not None and not hasattr(chunk, "let_alignment"):
            chunk = getattr(chunk, "module", None)
        return chunk is not None

    return [AlignmentPrefetcher(it, let.aligner) if owns(chunk) else it for it, chunk in zip(iterators, model)]


def pretrain(args) -> dict:
    """Train (or export) per ``args``; returns the last logged metrics."""
    # Everything that can be wrong with the input is checked before process groups exist.
    resume_iteration = latest_iteration(args.load)
    saved_let, let_iteration = read_saved_let_state(args)  # megatron_let/resume.py: shared with Megatron-LM's loop
    try:
        tokenizer = build_tokenizer(args)
    except (OSError, ValueError) as error:  # e.g. a directory without tokenizer.json / tokenizer_config.json
        raise LETConfigError(f"--tokenizer-model {args.tokenizer_model!r}: cannot load a Hugging Face tokenizer "
                             f"from it ({error}); point it at a directory written by save_pretrained.") from None
    tokenizer_name = f"--tokenizer-model {args.tokenizer_model}" if args.tokenizer_model \
        else "the target's vocabulary"
    let = build_let(args, tokenizer, tokenizer_name, print_rank_last, saved_let, let_iteration)
    driver = LETDriver(let, args.micro_batch_size, args.seq_length, print_rank_last)
    initialize_parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        vpp=args.virtual_pipeline_model_parallel_size, cp=args.context_parallel_size,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                        seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    padded_vocab = vocab_size_with_padding(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                           args.tensor_model_parallel_size)
    config = transformer_config_from_args(args)
    chunks = build_gpt_chunks(config, padded_vocab, args.max_position_embeddings, let=let,
                              position_embedding_type=args.position_embedding_type,
                              share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                              spec=layer_spec(config, args.transformer_impl))
    if args.bf16 or args.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    model = wrap_ddp(chunks, args.use_distributed_optimizer, args.overlap_grad_reduce)
    optimizer = build_optimizer(model, OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer))
    G = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_steps, lr_decay_steps=args.lr_decay_steps,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.wd_incr_steps, wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_steps, lr_wsd_decay_style=args.lr_wsd_decay_style)

    iteration, consumed = 0, 0
    if resume_iteration is not None:
        loaded = ckpt.load_checkpoint(args.load, resume_iteration, model, optimizer,
                                      load_optimizer=not (args.no_load_optim or args.finetune),
                                      fresh_let=bool(let is not None and let.config.reset_projector))
        if not args.finetune:
            iteration, consumed = loaded["iteration"], loaded["consumed_train_samples"]
            if "opt_param_scheduler" in loaded and not args.no_load_optim:
                scheduler.load_state_dict(loaded["opt_param_scheduler"])
        print_rank_last(f" loaded checkpoint from {args.load} at iteration {resume_iteration}")
    elif args.load:
        print_rank_last(f"WARNING: no checkpoint found in --load {args.load}; training from scratch.")
    if args.let_export_dir:
        ckpt.save_export(args.let_export_dir, iteration, model, {"iteration": iteration,
                         "consumed_train_samples": consumed})
        print_rank_last(f" exported iteration {iteration} without LET state to {args.let_export_dir}")
        return {}

    train_ds, valid_ds = build_datasets(args, tokenizer)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = G // (args.micro_batch_size * dp_size)
    logger = TrainingLogger(args)
    skipped = nan_iters = 0
    interval_losses: List[float] = []
    last = {}

    def common_state():
        state = {"iteration": iteration, "consumed_train_samples": consumed,
                 "opt_param_scheduler": scheduler.state_dict(),
                 "args": args}  # as Megatron-LM: lets megatron_teacher convert this model into a teacher
        if let is not None:
            state["let"] = driver.checkpoint_state()
        return state

    batch_sizes = TrainingSchedule.from_args(args)._calculator()  # megatron-core's, ramp-up included
    while iteration < args.train_iters:
        batch_sizes.update(consumed, consistency_check=True)
        G = batch_sizes.get_current_running_global_batch_size()
        num_microbatches = G // (args.micro_batch_size * dp_size)
        _reseed(args.seed, iteration)
        for chunk in model:
            chunk.train()
        iterators = [microbatches(train_ds, consumed, args.micro_batch_size, dp_rank, dp_size, num_microbatches)
                     for _ in model]
        iterators = _prefetch_alignments(iterators, model, let)
        metrics = train_step(iterators if len(model) > 1 else iterators[0], model, optimizer, driver, iteration,
                             num_microbatches, args.seq_length, args.micro_batch_size)
        iteration += 1
        consumed += G
        if metrics.get("skipped"):
            skipped += 1
        else:
            scheduler.step(increment=G)
        if metrics["lm loss"] is not None:
            if not math.isfinite(metrics["lm loss"]):
                nan_iters += 1
            interval_losses.append(metrics["lm loss"])
        if iteration % args.log_interval == 0:
            last = {"lm loss": sum(interval_losses) / max(len(interval_losses), 1),
                    "grad norm": metrics.get("grad norm")}
            last.update(driver.scalars())
            logger.iteration(iteration, consumed, optimizer.param_groups[0]["lr"], last, skipped, nan_iters,
                             optimizer.get_loss_scale().item(), global_batch_size=G)
            interval_losses, skipped, nan_iters = [], 0, 0
        if args.eval_interval and args.eval_iters and valid_ds is not None and iteration % args.eval_interval == 0:
            evaluate(args, model, valid_ds, iteration, args.global_batch_size // (args.micro_batch_size * dp_size),
                     dp_rank, dp_size, logger)
        if args.save and args.save_interval and (iteration % args.save_interval == 0
                                                  or iteration == args.train_iters):
            ckpt.save_checkpoint(args.save, iteration, model, optimizer, common_state(),
                                 save_optimizer=not args.no_save_optim)
            print_rank_last(f" saved checkpoint at iteration {iteration} to {args.save}")
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
    logger.close()
    return last


def evaluate(args, model, valid_ds, iteration, num_microbatches, dp_rank, dp_size, logger) -> float:
    """Megatron-LM style validation: --eval-iters global batches, LET off (no grad, eval mode)."""
    evals_done = iteration // args.eval_interval - 1
    first = evals_done * args.eval_iters * args.global_batch_size
    for chunk in model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for step in range(args.eval_iters):
            start = first + step * args.global_batch_size
            iterators = [microbatches(valid_ds, start, args.micro_batch_size, dp_rank, dp_size, num_microbatches)
                         for _ in model]
            total += run_schedule(iterators if len(model) > 1 else iterators[0], model, None, num_microbatches,
                                  args.seq_length, args.micro_batch_size, forward_only=True)
    loss = (total[0] / total[1]).item()
    for chunk in model:
        chunk.train()
    logger.validation(iteration, loss)
    return loss
