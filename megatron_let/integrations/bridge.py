"""LET inside Megatron-Bridge's own GPT pretraining loop (a recipe's ``ConfigContainer`` + ``pretrain()``).

A Bridge user keeps their recipe, overrides and launcher and adds two lines::

    cfg = with_let(recipe())                       # a ConfigContainer with a ``let`` section (let.* overrides)
    pretrain(cfg, *let_forward_step_and_callbacks(cfg, forward_step))

or runs ``pretrain_bridge_let.py --recipe module:function let.teacher=DIR let.target_layer=K ...``. Without
``let.teacher`` every piece passes straight through: the run is Bridge's own.

LET is a thin adapter over :class:`megatron_let.driver.LETDriver`, attached through Bridge's public seams:

- config: the ``let`` section (:class:`LETSection`) has one field per :class:`~megatron_let.config.LETConfig`
  field (``let.target_layer``, ``let.lambda0``, ``let.stop_iter``, ...), so Hydra-style ``let.*`` overrides
  reach it like Bridge's own; they become the ``--let-*`` values of the Megatron-LM adapter;
- model: a pre-wrap hook on the model provider runs ``LateToEarlyTraining.attach`` on every chunk before Bridge
  wraps it in DDP and builds the optimizer (a learned projector trains and checkpoints like any weight);
- forward step: the stage that owns ``let.target_layer`` hands each micro-batch's tokens and loss mask to LET
  before the user's own forward step reads it (Bridge reads batches on every rank that needs them);
- callbacks: ``on_train_start`` makes the optimizer step end LET's iteration first (non-finite policy),
  ``on_train_step_end`` adds LET's scalars to the step's loss dict, which Bridge's ``training_log`` averages
  and writes to its log line, TensorBoard and W&B;
- the registry (group ``let-bridge``; what each entry changes and why): Bridge's ``train()`` reads
  ``train_step`` as a module global, wrapped so LET's iteration begins on every rank before the schedule (spread
  placement runs the teacher there, on the iteration's micro-batches read up front and replayed); the
  checkpoint state dict gains ``let`` (LET's state), which :mod:`megatron_let.resume` reads back from
  ``checkpoint.load`` before the model is built.

Export (``let.export_dir``, with ``checkpoint.load``): the loaded model without LET's projector, saved with
Bridge's own ``save_checkpoint`` (no optimizer, no RNG), and the loop runs no iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Callable, List, Optional, Set, Tuple

import torch

from megatron_let.config import LETConfig, dest_of, flag_of, let_config_from_args
from megatron_let.controller import LateToEarlyTraining
from megatron_let.driver import LETDriver, current_device
from megatron_let.errors import LETConfigError
from megatron_let.integrations.launch import build_let, refuse_unsupported_features
from megatron_let.megatron_versions import batch_on_this_cp_rank
from megatron_let.patch_registry import apply_patches, register_patch
from megatron_let.preflight.paths import check_directories
from megatron_let.resume import read_saved_let_state

__all__ = ["LETSection", "with_let", "let_forward_step_and_callbacks", "LETBridge", "let_args", "bridge_names",
           "GROUP"]

GROUP = "let-bridge"
LOOP = "Megatron-Bridge"  # the loop build_let names in its refusals (let.reset_projector: Bridge's load reads all)
# LET scalars that may be <= 0; Bridge's log line prints a loss-dict entry only when its interval average is >= 0


def _section_field(f: dataclasses.Field):
    default = None if f.default is MISSING else f.default
    return f.name, Any, field(default=default, metadata={"help": f.metadata["help"]})


# one field per LETConfig field, its default (teacher / target_layer: None, LET off); Any: OmegaConf keeps the
# override's value, converted by the flag's own type (LETConfig metadata) in let_args
LETSection = make_dataclass("LETSection", [_section_field(f) for f in fields(LETConfig)])
LETSection.__doc__ = ("The ``let`` section of a Bridge config container: LETConfig's fields (``let.teacher``, "
                      "``let.target_layer``, ``let.lambda0``, ...); ``let.teacher`` unset: LET off.")


def with_let(cfg, **settings):
    """``cfg`` (a recipe's ``ConfigContainer``) as a container of the same settings with a ``let`` section
    (``settings``: initial LET values, e.g. ``teacher=...``); Hydra-style ``let.*`` overrides then reach it."""
    from megatron.bridge.training.config import ConfigContainer

    container_cls = _container_class(type(cfg))
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init and f.name != "let"}
    section = getattr(cfg, "let", None) or LETSection()
    out = container_cls(**values, let=dataclasses.replace(section, **settings))
    for name, value in vars(cfg).items():  # non-init fields and attributes a recipe set (env_vars, ...)
        if name not in values and name != "let":
            setattr(out, name, value)
    assert isinstance(out, ConfigContainer)
    return out


@functools.lru_cache(maxsize=None)
def _container_class(base: type) -> type:
    if any(f.name == "let" for f in fields(base)):
        return base
    return dataclass(kw_only=True)(type(f"LET{base.__name__}", (base,), {
        "__annotations__": {"let": LETSection}, "let": field(default_factory=LETSection),
        "__doc__": f"{base.__name__} with LET's ``let`` section (megatron_let.integrations.bridge)."}))


def let_args(cfg) -> argparse.Namespace:
    """The Megatron-LM argument names LET's launch checks read (build_let, the stop step, resume), from a Bridge
    config container: the ``let`` section as ``--let-*`` values (typed by each flag's own type), the model, batch
    and checkpoint settings under Megatron-LM's names."""
    section = getattr(cfg, "let", None) or LETSection()
    values = {}
    for f in fields(LETConfig):
        value = getattr(section, f.name)
        kind = f.metadata["type"]
        if isinstance(value, str) and kind not in (None, str) and value.lower() not in ("none", "null"):
            try:
                value = kind(value)
            except (TypeError, ValueError) as error:
                raise LETConfigError(f"let.{f.name}={value!r}: {error}") from None
        values[dest_of(f.name)] = value
    model, schedule, ckpt = cfg.model, cfg.train, cfg.checkpoint
    return argparse.Namespace(
        **values,
        hidden_size=model.hidden_size, num_layers=model.num_layers, seq_length=model.seq_length,
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        context_parallel_size=model.context_parallel_size, sequence_parallel=model.sequence_parallel,
        micro_batch_size=schedule.micro_batch_size, global_batch_size=schedule.global_batch_size,
        train_iters=schedule.train_iters, train_samples=schedule.train_samples,
        rampup_batch_size=schedule.rampup_batch_size,
        decrease_batch_size_if_needed=schedule.decrease_batch_size_if_needed,
        data_parallel_size=getattr(cfg, "data_parallel_size", None) or 1,
        seed=cfg.rng.seed, load=ckpt.load, save=ckpt.save, ckpt_step=ckpt.ckpt_step, finetune=ckpt.finetune,
        cuda_graph_impl=getattr(model, "cuda_graph_impl", None),
        use_megatron_fsdp=cfg.dist.use_megatron_fsdp, use_torch_fsdp2=cfg.dist.use_torch_fsdp2,
        hybrid_layer_pattern=None)


class LETBridge:
    """The LET wiring of one process of a Bridge ``pretrain()`` run: the pre-wrap hook, the forward step and the
    callbacks it passes to ``pretrain()``, and the registry entries (group ``let-bridge``) :meth:`install`
    applies. LET's per-iteration work is the driver's."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.driver: Optional[LETDriver] = None  # built with the first model chunk (the tokenizer exists by then)
        self._owner_vp_stages: Set[Optional[int]] = set()
        self._wrapped_optimizers: Set[int] = set()
        self.exporting = False

    @property
    def let(self) -> Optional[LateToEarlyTraining]:
        return None if self.driver is None else self.driver.let

    # -- model -------------------------------------------------------------------------------------
    def _ensure_let(self) -> Optional[LateToEarlyTraining]:
        if self.driver is None:
            from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer
            from megatron.bridge.utils.common_utils import print_rank_last

            args = let_args(self.cfg)
            tokenizer = getattr(self.cfg.dataset, "tokenizer", None) or build_tokenizer(self.cfg.tokenizer)
            tok = self.cfg.tokenizer
            name = f"tokenizer.tokenizer_model={tok.tokenizer_model}" if getattr(tok, "tokenizer_model", None) \
                else f"tokenizer.tokenizer_type={tok.tokenizer_type}"
            saved, resume_iteration = read_saved_let_state(args)  # megatron_let/resume.py, as both other trainers
            let = build_let(args, tokenizer, name, print_rank_last, saved, resume_iteration, loop=LOOP)
            self.driver = LETDriver(let, args.micro_batch_size, args.seq_length, print_rank_last)
        return self.let

    def pre_wrap_hook(self, chunks: List) -> List:
        """LET on the chunk(s) that hold the target layer, before Bridge wraps them in DDP (the model provider's
        pre-wrap hook: takes and returns the list of chunks)."""
        let = self._ensure_let()
        for chunk in chunks:
            if let is not None and let.attach(chunk):
                self._owner_vp_stages.add(getattr(chunk, "vp_stage", None))
        return chunks

    def owns_target(self, vp_stage: Optional[int] = None) -> bool:
        return self.let is not None and not self.let.finished and vp_stage in self._owner_vp_stages

    # -- forward step ------------------------------------------------------------------------------
    def forward_step(self, base: Callable) -> Callable:
        """The user's forward step (any signature Bridge accepts) behind one that hands each micro-batch to LET
        on the stage of the target layer; Bridge injects its GlobalState into it."""
        return _LETForwardStep(self, base)

    def callbacks(self) -> list:
        from megatron.bridge.training.callbacks import Callback

        integration = self

        class LETCallback(Callback):
            """LET's end of iteration before the optimizer step, its scalars in Bridge's log, its export."""

            def on_train_start(self, context):
                integration._on_train_start(context)
                if let_args(integration.cfg).let_export_dir:
                    integration.export(context.state, context.model)
                    integration.end_before_training(context.state)

            def on_train_step_end(self, context):
                integration._on_train_step_end(context)

        return [LETCallback()]

    def _on_train_start(self, context) -> None:
        if self.let is None or context.optimizer is None:
            return
        optimizer = context.optimizer
        if id(optimizer) in self._wrapped_optimizers:
            return
        self._wrapped_optimizers.add(id(optimizer))
        step, state = optimizer.step, context.state

        @functools.wraps(step)
        def step_unless_nonfinite(*args, **kwargs):
            if self.driver.end_iteration(state.train_state.step):  # a collective: every rank steps
                return False, None, None
            return step(*args, **kwargs)

        optimizer.step = step_unless_nonfinite

    def _on_train_step_end(self, context) -> None:
        """LET's scalars (a PP + DP collective, every rank, every iteration) join the step's loss dict, which
        Bridge's training_log averages over the log interval and writes to its line, TensorBoard and W&B."""
        if self.driver is not None:
            self.driver.scalars_into(context.loss_dict, bool(context.skipped_iter))

    # -- run -----------------------------------------------------------------------------------
    def install(self) -> None:
        """This process's integration; the registry's ``let-bridge`` entries are applied once per process."""
        first = not _CURRENT
        _CURRENT[:] = [self]
        if first:
            apply_patches(GROUP)

    def export(self, state, model) -> None:
        """let.export_dir: the loaded model without LET's projector, saved with Bridge's own save_checkpoint (no
        optimizer, no RNG) through :func:`~megatron_let.checkpoint_files.write_export`; then the run ends."""
        from megatron.bridge.training.checkpointing import save_checkpoint

        from megatron_let.checkpoint_files import write_export

        export_dir = let_args(self.cfg).let_export_dir
        self.driver.strip_for_export(model)
        ckpt = state.cfg.checkpoint

        def save(partial: str) -> None:
            saved = {name: getattr(ckpt, name) for name in ("save", "save_optim", "save_rng", "async_save")}
            ckpt.save, ckpt.save_optim, ckpt.save_rng, ckpt.async_save = partial, False, False, False
            self.exporting = True
            try:
                save_checkpoint(state, model, None, None, state.train_state.floating_point_operations_so_far)
            finally:
                self.exporting = False
                for name, value in saved.items():
                    setattr(ckpt, name, value)

        write_export(export_dir, save)
        from megatron.bridge.utils.common_utils import print_rank_last

        print_rank_last(f" exported iteration {state.train_state.step} without LET state to {export_dir}")


    @staticmethod
    def end_before_training(state) -> None:
        """After the export: Bridge's loop runs no iteration (its train_iters is the loaded step), nor validation or
        test, and pretrain() returns normally."""
        state.cfg.train.train_iters = state.train_state.step
        state.train_state.do_valid = state.train_state.do_test = False


class _LETForwardStep:
    """Bridge's forward-step functor: on the chunk that owns the target layer, the micro-batch is read here (the
    same ``next()`` the user's step would make), handed to LET, and replayed to the user's step."""

    def __init__(self, integration: LETBridge, base: Callable):
        from megatron.bridge.training.utils.train_utils import prepare_forward_step_func

        # no functools.update_wrapper: Bridge inspects this functor's own signature (``state`` first: injected)
        self.integration, self.base, self._prepare = integration, base, prepare_forward_step_func

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        integration = self.integration
        vp_stage = getattr(_unwrapped(model), "vp_stage", None)
        if data_iterator is not None and integration.owns_target(vp_stage):
            batch = next(data_iterator)
            tokens, loss_mask = _tokens_and_loss_mask(batch, integration.cfg.model.context_parallel_size)
            integration.let.set_microbatch(tokens, loss_mask, None)
            data_iterator = itertools.chain([batch], data_iterator)  # the user's step reads it again
        step = self._prepare(self.base, state)
        if return_schedule_plan:
            return step(data_iterator, model, return_schedule_plan=True)
        return step(data_iterator, model)


def _unwrapped(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _tokens_and_loss_mask(batch: dict, cp_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, loss_mask) of a Bridge micro-batch as this rank feeds them to the model: on its device, the
    context-parallel slice (Bridge's get_batch slices the same way)."""
    device = current_device()
    if batch.get("tokens") is None or batch.get("loss_mask") is None:
        raise RuntimeError("LET: the micro-batch on the stage of let.target_layer has no tokens / loss_mask.")
    fields_ = {"tokens": batch["tokens"].to(device, non_blocking=True),
               "loss_mask": batch["loss_mask"].to(device, non_blocking=True)}
    if cp_size > 1:
        fields_ = batch_on_this_cp_rank(fields_)
    return fields_["tokens"], fields_["loss_mask"]


# -- the registry's entries: what LET changes in Bridge's training loop ------------------------------------------
@register_patch("let.bridge.train-step", group=GROUP, target="megatron.bridge.training.train:train_step",
                why="Bridge's train() calls train_step through its module global: LET's iteration begins there on "
                    "every rank before the pipeline schedule; spread placement reads the iteration's micro-batches "
                    "up front, runs the teacher over the model-parallel group (no collective inside the schedule) "
                    "and replays them")
def _begin_iteration(train, context) -> None:
    train_step = train.train_step

    @functools.wraps(train_step)
    def train_step_with_let(forward_step_func, data_iterator, model, optimizer, scheduler, global_state,
                            *args, **kwargs):
        driver = _CURRENT[0].driver if _CURRENT else None
        if driver is not None and driver.active:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            data_iterator = driver.begin_iteration(global_state.train_state.step, get_num_microbatches(),
                                                   data_iterator)
            if not driver.active:
                driver.log(f" LET stopped at iteration {global_state.train_state.step}: lambda 0, teacher released")
        return train_step(forward_step_func, data_iterator, model, optimizer, scheduler, global_state,
                          *args, **kwargs)

    train.train_step = train_step_with_let


@register_patch("let.bridge.checkpoint-state", group=GROUP,
                target="megatron.bridge.training.checkpointing:generate_state_dict",
                why="a saved checkpoint's common state gains 'let' (LET's settings, stop step, teacher width, "
                    "--let-lambda auto / --let-stop auto state), which a resume reads back before the model is "
                    "built, as from the lean trainer's checkpoints (megatron_let/resume.py); an export carries none")
def _let_state_in_checkpoint(checkpointing, context) -> None:
    generate_state_dict = checkpointing.generate_state_dict

    @functools.wraps(generate_state_dict)
    def with_let_state(*args, **kwargs):
        state_dict = generate_state_dict(*args, **kwargs)
        loading = bool((kwargs.get("optim_sd_kwargs") or {}).get("is_loading"))
        integration = _CURRENT[0] if _CURRENT else None
        driver = integration and integration.driver
        if driver is not None and driver.let is not None and not loading and not integration.exporting:
            state_dict["let"] = driver.checkpoint_state()
        return state_dict

    checkpointing.generate_state_dict = with_let_state


@register_patch("let.bridge.log-line", group=GROUP, target="megatron.bridge.training.utils.train_utils:print_rank_last",
                why="Bridge's training_log prints a loss-dict entry only if its interval average is >= 0: a negative "
                    "'let cos' (or 'let grad cos') is put back where Bridge would have printed it (TensorBoard and "
                    "W&B get every value from Bridge itself)")
def _signed_scalars_in_line(train_utils, context) -> None:
    print_rank_last = train_utils.print_rank_last

    @functools.wraps(print_rank_last)
    def print_with_signed_let_scalars(message, *args, **kwargs):
        integration = _CURRENT[0] if _CURRENT else None
        if integration is not None and integration.driver is not None:
            message = integration.driver.signed_scalars_into_line(message)
        return print_rank_last(message, *args, **kwargs)

    train_utils.print_rank_last = print_with_signed_let_scalars


def bridge_names(message: str) -> str:
    """A LET message in Bridge's terms: each ``--let-*`` flag named as its ``let.*`` override."""
    for f in sorted(fields(LETConfig), key=lambda f: -len(flag_of(f.name))):
        message = message.replace(flag_of(f.name), f"let.{f.name}")
    for flag, override in _BRIDGE_NAMES.items():
        message = message.replace(flag, override)
    return message


# Megatron-LM flags LET's messages name, as the Bridge settings let_args reads them from
_BRIDGE_NAMES = {"--num-layers": "model.num_layers", "--hidden-size": "model.hidden_size",
                 "--seq-length": "model.seq_length", "--train-iters": "train.train_iters",
                 "--train-samples": "train.train_samples", "--global-batch-size": "train.global_batch_size",
                 "--micro-batch-size": "train.micro_batch_size", "--load": "checkpoint.load",
                 "--save": "checkpoint.save"}


_CURRENT: List[LETBridge] = []  # this process's integration, which the registry's wrappers serve


def let_forward_step_and_callbacks(cfg, forward_step: Optional[Callable] = None) -> Tuple[Callable, list]:
    """For users with their own launcher: ``pretrain(cfg, *let_forward_step_and_callbacks(cfg, forward_step))``.

    ``cfg``: a container from :func:`with_let` (its ``let`` section; ``let.teacher`` unset: LET off, the forward
    step and callbacks pass straight through); ``forward_step``: the user's (Bridge's GPT ``forward_step`` by
    default). Registers LET's pre-wrap hook on ``cfg.model`` and applies the ``let-bridge`` registry entries."""
    if forward_step is None:
        from megatron.bridge.training.gpt_step import forward_step
    args = let_args(cfg)  # a let.* setting LET cannot use is refused here, before any process group
    if let_config_from_args(args) is not None:
        refuse_unsupported_features(args, LOOP)
    check_directories(args)  # an export over the checkpoint it reads, a save into the teacher, ... (preflight)
    integration = LETBridge(cfg)
    cfg.model.register_pre_wrap_hook(integration.pre_wrap_hook)
    integration.install()
    return integration.forward_step(forward_step), integration.callbacks()
