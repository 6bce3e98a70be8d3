"""Megatron-LM's command line, the subset the megatron-core-only trainer implements.

Flag names, defaults and meanings follow ``megatron/training/arguments.py`` so a
user's launch script works unchanged. A flag outside this subset stops the run
with one line naming it: silently ignoring e.g. ``--recompute-granularity``
would train something other than what the user asked for.
"""

import argparse
import math
import sys
from typing import List, Optional

from megatron_let.config import LETConfigError, add_let_args

NEEDS_MEGATRON_LM = ("needs Megatron-LM: put a Megatron-LM checkout on PYTHONPATH (or MEGATRON_LM_PATH) "
                     "and pretrain_gpt_let.py runs on its pretrain()")


class ArgumentError(ValueError):
    """A bad command line: one line for the user, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ArgumentError(message)


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="transformer_engine")
    g.add_argument("--attention-backend", default="auto")
    # Fusions Megatron-LM lets users switch off; on CPU they are always off.
    for flag in ("--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
                 "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                 "--no-rope-fusion", "--use-cpu-initialization", "--attention-softmax-in-fp32",
                 "--accumulate-allreduce-grads-in-fp32", "--use-flash-attn"):
        g.add_argument(flag, action="store_true")


def _add_parallel_args(p):
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--calculate-per-token-loss", action="store_true")


def _add_training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--rampup-batch-size", nargs="*", default=None,
                   help="START INCREMENT SAMPLES: ramp the global batch size up, as Megatron-LM")
    g.add_argument("--decrease-batch-size-if-needed", action="store_true")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"],
                   default="exponential")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 32)
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)


def _add_data_args(p):
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--split", type=str, default="969, 30, 1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer", "NullTokenizer"],
                   default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)


def _add_checkpoint_logging_args(p):
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    g.add_argument("--exit-interval", type=int, default=None)
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default="")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="")
    g.add_argument("--log-throughput", action="store_true")


def _add_recompute_and_moe_args(p):
    g = p.add_argument_group("activation recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None)
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"],
                   default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather")
    # Megatron-LM features the lean trainer lacks, parsed only to refuse them with the right reason
    # (with LET on, LET's own reason comes first: see integrations.launch.refuse_unsupported_features)
    for flag in ("--enable-cuda-graph", "--external-cuda-graph", "--use-megatron-fsdp", "--use-torch-fsdp2"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cuda-graph-impl", default="none", help=argparse.SUPPRESS)


def _validate_recompute_and_moe(args):
    if args.let_teacher and args.let_teacher != "none":  # --let-teacher none: LET off (config.TEACHER_NONE)
        from megatron_let.integrations.launch import refuse_unsupported_features

        refuse_unsupported_features(args)
    for flag in ("--enable-cuda-graph", "--external-cuda-graph", "--use-megatron-fsdp", "--use-torch-fsdp2"):
        if getattr(args, flag[2:].replace("-", "_")):
            raise ArgumentError(f"unsupported flag {flag}: the megatron-core-only trainer does not implement it; "
                                f"it {NEEDS_MEGATRON_LM}.")
    if args.cuda_graph_impl != "none":
        raise ArgumentError(f"unsupported flag --cuda-graph-impl: the megatron-core-only trainer does not "
                            f"implement it; it {NEEDS_MEGATRON_LM}.")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-method uniform|block and "
                                "--recompute-num-layers N.")
        per_chunk = args.num_layers // args.pipeline_model_parallel_size // (args.virtual_pipeline_model_parallel_size or 1)
        if args.recompute_num_layers < 1 or (args.recompute_method == "uniform" and per_chunk % args.recompute_num_layers):
            raise ArgumentError(f"--recompute-num-layers {args.recompute_num_layers} must be >= 1 and, with "
                                f"--recompute-method uniform, divide the {per_chunk} layers of each model chunk.")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        raise ArgumentError("--recompute-method / --recompute-num-layers need --recompute-granularity full.")
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.num_experts is None:
        if ep > 1 or args.expert_tensor_parallel_size is not None:
            raise ArgumentError("--expert-model-parallel-size / --expert-tensor-parallel-size need --num-experts.")
        return
    if args.num_experts % ep:
        raise ArgumentError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size {ep}.")
    if not 1 <= args.moe_router_topk <= args.num_experts:
        raise ArgumentError(f"--moe-router-topk {args.moe_router_topk} must be in 1..--num-experts {args.num_experts}.")
    world = args.data_parallel_size * args.tensor_model_parallel_size * args.pipeline_model_parallel_size \
        * args.context_parallel_size
    if world % (etp * ep * args.pipeline_model_parallel_size):
        raise ArgumentError(f"world size {world} is not divisible by expert-TP x EP x PP = "
                            f"{etp} x {ep} x {args.pipeline_model_parallel_size}.")
    if args.moe_token_dispatcher_type == "alltoall":
        import torch

        if not torch.cuda.is_available():
            raise ArgumentError("--moe-token-dispatcher-type alltoall needs CUDA (megatron-core's dispatcher "
                                "creates a CUDA stream); use allgather on CPU.")
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain_gpt_let.py", allow_abbrev=False,
                     description="GPT pretraining with Late-to-Early Training (megatron-core trainer)")
    for add in (_add_model_args, _add_parallel_args, _add_training_args, _add_data_args,
                _add_checkpoint_logging_args, _add_recompute_and_moe_args, add_let_args):
        add(parser)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate; raises ArgumentError / LETConfigError with a one-line message."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    flags = [u for u in unknown if u.startswith("--")]
    if unknown:
        raise ArgumentError(f"unsupported flag {(flags or unknown)[0]}: the megatron-core-only trainer does not "
                            f"implement it; it {NEEDS_MEGATRON_LM}.")
    _validate(args, world_size)
    return args


def _validate(args, world_size):
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    model_parallel = tp * pp * cp
    if args.fp8_format is not None and not has_transformer_engine():
        raise ArgumentError("--fp8-format needs TransformerEngine on a GPU (pip install megatron-let[gpu]).")
    if cp > 1 and not has_transformer_engine():
        raise ArgumentError("--context-parallel-size > 1 needs TransformerEngine attention on a GPU.")
    if world_size % model_parallel:
        raise ArgumentError(f"world size {world_size} is not divisible by TP x PP x CP = {model_parallel}.")
    args.data_parallel_size = world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"x data-parallel size ({args.micro_batch_size} x {args.data_parallel_size}).")
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}.")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage must divide num-layers / pipeline size.")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
    if args.virtual_pipeline_model_parallel_size is not None and pp == 1:
        raise ArgumentError("a virtual pipeline (--num-layers-per-virtual-pipeline-stage) needs "
                            "--pipeline-model-parallel-size > 1.")
    if args.virtual_pipeline_model_parallel_size == 1:
        args.virtual_pipeline_model_parallel_size = None
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM does
    if args.bf16 and args.fp16:
        raise ArgumentError("give --bf16 or --fp16, not both.")
    if args.transformer_impl == "transformer_engine" and not has_transformer_engine():
        args.transformer_impl = "local"
    if not args.mock_data and not args.data_path:
        raise ArgumentError("give --data-path PREFIX (Megatron indexed data) or --mock-data.")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
        if args.swiglu:  # Megatron-LM: keep the parameter count of a 4h MLP
            args.ffn_hidden_size = int(2 * 4 * args.hidden_size / 3 / 64) * 64
    if not args.group_query_attention:
        args.num_query_groups = None
    _validate_schedule(args)
    if args.save is not None and args.save_interval is None:
        args.save_interval = args.train_iters
    if args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer" if args.mock_data and args.tokenizer_model is None \
            else "HuggingFaceTokenizer"
    if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR.")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ArgumentError("--tokenizer-type NullTokenizer needs --vocab-size N.")
    _validate_recompute_and_moe(args)


def _validate_schedule(args) -> None:
    """Iteration- or sample-based training, with Megatron-LM's rules; sets ``train_iters`` (as
    Megatron-LM's update_train_iters) and the lr schedule in samples (``lr_*_steps``)."""
    from megatron_let.weight.stop import TrainingSchedule

    if (args.train_iters is None) == (args.train_samples is None):
        raise ArgumentError("give exactly one of --train-iters N (iteration-based training) and "
                            "--train-samples N (sample-based).")
    if args.train_iters is not None:
        mixed = [flag for flag, value in (("--train-samples", args.train_samples),
                                          ("--lr-decay-samples", args.lr_decay_samples),
                                          ("--lr-warmup-samples", args.lr_warmup_samples or None),
                                          ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples),
                                          ("--rampup-batch-size", args.rampup_batch_size)) if value]
        if mixed:
            raise ArgumentError(f"{mixed[0]} is for sample-based training (--train-samples); with --train-iters "
                                "use the -iters form (as Megatron-LM).")
    else:
        mixed = [flag for flag, value in (("--lr-decay-iters", args.lr_decay_iters),
                                          ("--lr-warmup-iters", args.lr_warmup_iters or None),
                                          ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters)) if value]
        if mixed:
            raise ArgumentError(f"{mixed[0]} is for iteration-based training; with --train-samples use the "
                                "-samples form (as Megatron-LM).")
    warmup_given = args.lr_warmup_iters or args.lr_warmup_samples
    if args.lr_warmup_fraction is not None and warmup_given:
        raise ArgumentError("give one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples.")
    if args.rampup_batch_size is not None:
        if len(args.rampup_batch_size) != 3:
            raise ArgumentError("--rampup-batch-size takes 3 values: START INCREMENT SAMPLES; got "
                                f"{' '.join(args.rampup_batch_size) or 'none'}.")
        try:
            start, increment, samples = (int(v) for v in args.rampup_batch_size)
        except ValueError:
            raise ArgumentError(f"--rampup-batch-size values must be integers; got "
                                f"{' '.join(args.rampup_batch_size)}.") from None
        step = args.micro_batch_size * args.data_parallel_size
        if not (0 < start <= args.global_batch_size and increment > 0 and samples >= 0
                and (args.global_batch_size - start) % increment == 0):
            raise ArgumentError(f"--rampup-batch-size {start} {increment} {samples}: START must be in "
                                f"1..--global-batch-size {args.global_batch_size} and INCREMENT must divide "
                                "their difference.")
        if not args.decrease_batch_size_if_needed and (start % step or increment % step):
            raise ArgumentError(f"--rampup-batch-size {start} {increment} {samples}: every batch size of the ramp "
                                f"must be a multiple of --micro-batch-size x data-parallel size ({step}); or add "
                                "--decrease-batch-size-if-needed.")
        args.rampup_batch_size = [start, increment, samples]
    schedule = TrainingSchedule.from_args(args)
    G = args.global_batch_size
    if args.train_iters is not None:  # Megatron-LM's get_optimizer_param_scheduler, in samples
        args.lr_decay_iters = args.lr_decay_iters or args.train_iters
        args.lr_decay_steps = args.lr_decay_iters * G
        args.wd_incr_steps = args.train_iters * G
        args.lr_wsd_decay_steps = (args.lr_wsd_decay_iters or 0) * G
        args.lr_warmup_steps = args.lr_warmup_fraction * args.lr_decay_steps \
            if args.lr_warmup_fraction is not None else args.lr_warmup_iters * G
    else:
        args.train_iters = schedule.total_iterations()
        if args.train_iters < 1:
            raise ArgumentError(f"--train-samples {args.train_samples} is less than one global batch "
                                f"({G}).")
        args.lr_decay_steps = args.lr_decay_samples or args.train_samples
        args.wd_incr_steps = args.train_samples
        args.lr_wsd_decay_steps = args.lr_wsd_decay_samples or 0
        args.lr_warmup_steps = args.lr_warmup_fraction * args.lr_decay_steps \
            if args.lr_warmup_fraction is not None else args.lr_warmup_samples


def has_transformer_engine() -> bool:
    """Importable TransformerEngine (fp8, CP attention): a GPU install, never on CPU machines."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["ArgumentError", "LETConfigError", "build_parser", "parse_args", "vocab_size_with_padding"]
