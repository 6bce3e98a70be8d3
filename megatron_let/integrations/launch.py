"""From parsed flags to a checked LateToEarlyTraining: shared by the lean trainer and Megatron-LM.

Everything here runs before any process group exists, so a wrong teacher path, a corrupt
teacher, a vocabulary mismatch or a tokenizer the aligner cannot read fails in seconds with one
line, never hours into a job on some rank.
"""

from typing import Callable, Optional

from megatron_let.config import TEACHER_NONE, LETConfig, let_config_from_args
from megatron_let.errors import LETConfigError
from megatron_let.resume import aligning_at, changed_settings, refuse_unusable_projector, refuse_unusable_width
from megatron_let.teachers.huggingface import output_width, preflight_teacher
from megatron_let.teachers.vocabulary import check_vocabulary, hf_tokenizer_of
from megatron_let.weight.stop import TrainingSchedule, resolve_stop

LEAN = "the lean trainer"  # the loop a build_let caller names (Megatron-LM's: "Megatron-LM")


def refuse_unsupported_features(args, loop: str = LEAN) -> None:
    """Settings LET cannot honour, refused in one line before training, under every loop (``loop``: its name,
    for the messages).

    CUDA graphs replay a captured forward: LET's hook on layer k computes a new, data-dependent loss
    from the teacher each micro-batch in Python, which a replayed graph would skip or replay stale.
    FSDP: LET's learned projector (and the hook on a sharded layer) has not been run under
    Megatron-FSDP or torch FSDP2; megatron-core 0.16's FSDP wrappers hard-code CUDA
    (``DeviceMesh(..., "cuda")``, CUDA buffers), so no CPU test can check it here. Legacy models have no
    layer-k hook. ``--let-reset-projector`` needs a loader that skips saved tensors: the lean trainer's.
    (Full activation recomputation, MoE and expert parallelism are supported.)"""
    if getattr(args, "use_legacy_models", False):
        raise LETConfigError("--let-teacher needs megatron-core models; drop --use-legacy-models.")
    if loop != LEAN and getattr(args, "let_reset_projector", False):  # its load_checkpoint reads every tensor
        raise LETConfigError(f"--let-reset-projector is implemented by the lean trainer only; under {loop} "
                             "resume with the checkpoint's teacher and --let-projector settings.")
    impl = getattr(args, "cuda_graph_impl", None)
    graph_flags = [flag for flag, on in (("--enable-cuda-graph", getattr(args, "enable_cuda_graph", False)),
                                         ("--external-cuda-graph", getattr(args, "external_cuda_graph", False)),
                                         (f"--cuda-graph-impl {impl}", impl not in (None, "none")))
                   if on]
    if graph_flags:
        raise LETConfigError(
            f"{graph_flags[0]} would capture --let-target-layer in a CUDA graph, but LET computes a new "
            "teacher-dependent loss there every micro-batch in Python, which a replayed graph would skip or "
            "reuse stale; drop the CUDA-graph flags while LET is on.")
    for flag, attribute in (("--use-megatron-fsdp", "use_megatron_fsdp"), ("--use-custom-fsdp", "use_custom_fsdp"),
                            ("--use-torch-fsdp2", "use_torch_fsdp2")):
        if getattr(args, attribute, False):
            raise LETConfigError(
                f"{flag} is not supported with LET yet: its learned projector and the hook on a sharded "
                "--let-target-layer have not been verified under FSDP (megatron-core 0.16's FSDP wrappers build CUDA device "
                "meshes and buffers, so it cannot be tested on CPU); use DDP with --use-distributed-optimizer, which shards the "
                "optimizer state, the projector's included.")


def build_let(args, tokenizer, tokenizer_name: str, log: Callable[[str], None],
              saved: Optional[dict] = None, resume_iteration: Optional[int] = None, loop: str = LEAN):
    """The LateToEarlyTraining for ``args`` (None without --let-teacher), validated against the loop
    (``loop``: its name), the target's tokenizer, the teacher files and, when resuming, the
    checkpoint's LET state.
    ``log`` prints one line on the logging rank (warnings get a WARNING prefix here)."""

    def warn(message: str) -> None:
        log(f"WARNING: {message}")

    from megatron_let.controller import LateToEarlyTraining

    config = let_config_from_args(args)
    saved = saved or {}
    if config is None:
        if getattr(args, "let_teacher", None) == TEACHER_NONE and aligning_at(saved, resume_iteration):
            log(f" LET ended at iteration {resume_iteration} by --let-teacher none (the checkpoint's stop step was "
                f"{saved.get('stop_iter')})")
        return None
    refuse_unsupported_features(args, loop)
    reset_projector = config.reset_projector
    hidden_size = getattr(args, "hidden_size", None)
    refuse_unusable_projector(saved, config, reset_projector, hidden_size)  # megatron_let/resume.py
    changed = changed_settings(saved["config"], config, hidden_size, _teacher_layers(config, saved["config"])) \
        if saved.get("config") else []
    schedule = TrainingSchedule.from_args(args)
    train_iters = schedule.total_iterations()
    stop = resolve_stop(config, schedule)
    if saved.get("stop_iter") is not None and saved.get("config") and not changed \
            and saved["stop_iter"] != stop.iteration:
        # the LET flags are the checkpoint's: its stop step stands, whatever the schedule flags say now
        log(f" LET keeps the checkpoint's stop iteration {saved['stop_iter']} (the current schedule flags "
            f"would give {stop.iteration})")
        stop.iteration, stop.source = saved["stop_iter"], "from the checkpoint"
        stop.samples = saved.get("stop_samples", schedule.samples_after(stop.iteration))
    # past the stop step the teacher is never read again (it may be gone): the saved width builds the projector
    auto_stopped = (saved.get("auto_stop") or {}).get("stopped_at")  # --let-stop auto decided (auto_stop.py)
    past_stop = resume_iteration is not None and "teacher_hidden_size" in saved and (
        resume_iteration >= stop.iteration or auto_stopped is not None and resume_iteration >= auto_stopped)
    teacher_config, width = None, saved.get("teacher_hidden_size")
    if not past_stop:
        teacher_config = preflight_teacher(config.teacher, config.teacher_layer, getattr(args, "seq_length", None),
                                           config.token_alignment, warn,
                                           allow_bidirectional=config.allow_bidirectional_teacher)
        width = output_width(teacher_config, config.teacher_layer)
        refuse_unusable_width(saved, config, width, reset_projector)
    if changed:
        warn(f"LET settings differ from the checkpoint's: {', '.join(changed)}; continuing with the new ones.")
    log(f" {stop.describe()}")
    if auto_stopped is not None:
        log(f" LET stopped automatically at iteration {auto_stopped} (--let-stop auto, from the checkpoint)")
    causal_span = config.token_alignment != "exact"
    let = LateToEarlyTraining(config, stop.iteration, stop.samples, seed=args.seed, teacher_hidden_size=width,
                              target_tokenizer=hf_tokenizer_of(tokenizer) if causal_span else None,
                              eod_id=getattr(tokenizer, "eod", None) if causal_span else None, saved=saved)
    if past_stop:
        let.finish()
        return let
    if causal_span:
        aligner = let.aligner  # built now: a tokenizer it cannot read fails before any process group
        log(f" LET token alignment {config.token_alignment}: target {tokenizer_name} -> teacher tokenizer "
            f"{config.teacher_tokenizer or config.teacher}"
            + (" (same vocabulary: identity map)" if aligner.identity else ""))
    else:
        try:
            check_vocabulary(config.teacher, tokenizer.vocab_size, hf_tokenizer_of(tokenizer), tokenizer_name, warn)
        except LETConfigError as error:
            raise LETConfigError(f"{error} Or align across tokenizers with --let-token-alignment causal-span."
                                 ) from None
    log(_placement_line(config, args))
    if getattr(args, "hybrid_layer_pattern", None):  # what k counts on a HybridModel (alignment.target_layer_of)
        from megatron_let.loss.alignment import describe_target_layer

        log(f" LET target: {describe_target_layer(config.target_layer, args.hybrid_layer_pattern)}")
    for warning in config.warnings(args.num_layers, train_iters, stop.iteration):
        warn(warning)
    if config.projector == "interp" and teacher_config.hidden_size > args.hidden_size:
        warn(f"--let-projector interp shrinks the teacher's {teacher_config.hidden_size} features to "
             f"--hidden-size {args.hidden_size} by interpolation, dropping detail; --let-projector linear or "
             "mlp learns the map instead.")
    return let


def _teacher_layers(config: LETConfig, saved_config: dict) -> Optional[int]:
    """The teacher's layer count, to tell --let-teacher-layer N (its final layer) from the default; None where
    no layer is named or its config cannot be read (past the stop step the teacher may be gone)."""
    if config.teacher_layer is None and saved_config.get("teacher_layer") is None:
        return None
    try:
        from megatron_let.teachers.huggingface import resolve_teacher

        return resolve_teacher(config.teacher).config().num_hidden_layers
    except Exception:  # noqa: BLE001 - an unreadable teacher is refused later, with its own message
        return None


def _placement_line(config: LETConfig, args) -> str:
    """Where the teacher lives and how much of its work each rank does (megatron_let/loss/placement.py)."""
    from megatron_let.loss.placement import describe, teacher_weight_bytes
    from megatron_let.teachers.huggingface import resolve_teacher, resolve_teacher_dtype

    source = resolve_teacher(config.teacher)
    weights = None if source.gguf_file else teacher_weight_bytes(source.directory,
                                                                  resolve_teacher_dtype(config.teacher_dtype))
    return describe(config.teacher_placement, getattr(args, "tensor_model_parallel_size", 1) or 1,
                    getattr(args, "context_parallel_size", 1) or 1,
                    getattr(args, "pipeline_model_parallel_size", 1) or 1,
                    getattr(args, "micro_batch_size", 1) or 1, weights)
