"""LET inside Megatron-LM's own GPT pretraining loop (``pretrain_gpt.py`` + ``pretrain()``).

``main()`` runs exactly what ``pretrain_gpt.py``'s ``__main__`` runs (``pretrain_hybrid.py``'s for a
HybridModel), with the user's own Megatron-LM pieces, and adds LET as a thin adapter over
:class:`megatron_let.driver.LETDriver`:

- arguments: LET's ``--let-*`` group after the script's own ``extra_args_provider`` (ModelOpt's when on);
- model: every chunk goes through ``LateToEarlyTraining.attach`` before Megatron wraps it in DDP and builds
  the optimizer (the model provider up to 0.18, the config container's pre-wrap hook from 0.19), so a
  learned projector is trained and checkpointed like any other weight;
- the registry entries below (groups ``let-script`` and ``let-megatron-lm``; each says what it changes and
  why): the stage of ``--let-target-layer`` gets its micro-batch's tokens through the script's own "needs
  the full batch" predicate (there for Multi-Token Prediction) and ``get_batch``; ``train_step`` begins LET's
  iteration on every rank before the schedule (spread placement runs the teacher there); the optimizer step
  ends it (non-finite policy); ``training_log`` adds LET's scalars to the loss dict, which Megatron-LM
  averages, prints and writes to TensorBoard / W&B; ``--let-export-dir`` exports after the checkpoint is
  loaded; a failed save into ``--save`` is one line;
- checkpoint: LET's state is ``args.let_state``, which Megatron-LM saves with every checkpoint, and is read
  back from ``--load`` before the model is built.

Only names in the script's and ``megatron.training.training``'s namespaces are rebound, for this process; no
file is edited. Without ``--let-teacher`` every wrapper passes straight through. Without CUDA the CPU entries
(:mod:`megatron_let.compat.cpu_megatron_lm`) are applied first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
import time
from typing import Callable, Optional, Set

import torch

from megatron_let.config import add_let_args
from megatron_let.controller import LateToEarlyTraining
from megatron_let.driver import LETDriver
from megatron_let.errors import CheckpointWriteError, LETConfigError, LETNonFiniteError, print_error
from megatron_let.integrations.launch import build_let
from megatron_let.megatron_versions import call_pretrain, script_model_provider, tokens_and_loss_mask
from megatron_let.patch_registry import announce as announce_patches, apply_patches, register_patch
from megatron_let.resume import read_saved_let_state

__all__ = ["LETMegatronLM", "import_pretrain_gpt", "import_pretrain_script", "main", "megatron_lm_available"]

_PROGRAM_START_TIME = time.time()
def _prepare_runtime() -> None:
    """CPU redirections (only without CUDA), before anything imports megatron.training."""
    if not torch.cuda.is_available():
        from megatron_let.compat.cpu_megatron_lm import enable_cpu_megatron_lm

        enable_cpu_megatron_lm()


def _on_this_device(script):
    """The script's own CUDA calls redirected on a machine without CUDA (compat layer)."""
    if not torch.cuda.is_available():
        from megatron_let.compat.cpu_megatron_lm import enable_cpu_script

        enable_cpu_script(script)
    return script


def megatron_lm_available() -> bool:
    """True if Megatron-LM's ``megatron.training`` imports here (after the CPU redirections).

    ``$MEGATRON_LM_PATH``, if set, is put first on ``sys.path`` (its megatron.core is used). A
    Megatron-LM that is asked for (MEGATRON_LM_PATH, or megatron.training found) but cannot be
    imported raises :class:`~megatron_let.integrations.selection.TrainerSelectionError` with the cause.
    """
    from megatron_let.integrations.selection import choose_trainer

    return choose_trainer().megatron_lm


def _checkout_roots():
    """Candidate Megatron-LM checkout roots: $MEGATRON_LM_PATH, then where megatron.training lives."""
    roots = []
    if os.environ.get("MEGATRON_LM_PATH"):
        roots.append(os.path.abspath(os.environ["MEGATRON_LM_PATH"]))
    try:
        training = importlib.import_module("megatron.training")
        roots.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(training.__file__)))))
    except ImportError:
        pass
    return roots


def import_pretrain_gpt():
    """The user's ``pretrain_gpt`` module (from the Megatron-LM checkout that holds megatron.training), or,
    for a megatron-core wheel that ships megatron.training without the script (0.17+),
    :mod:`megatron_let.integrations.gpt_script`."""
    return import_pretrain_script("pretrain_gpt")


def import_pretrain_script(name: str = "pretrain_gpt"):
    """Megatron-LM's ``name`` script module (``pretrain_gpt`` or ``pretrain_hybrid``) from the checkout that
    holds megatron.training, or :mod:`megatron_let.integrations.gpt_script` for a wheel without the scripts:
    ``pretrain_hybrid.py`` reads batches, runs the model and reduces the loss as ``pretrain_gpt.py`` does;
    only its model config differs (:func:`megatron_let.integrations.hybrid.hybrid_model_config`)."""
    _prepare_runtime()
    try:
        return _on_this_device(importlib.import_module(name))
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    for root in _checkout_roots():
        if os.path.isfile(os.path.join(root, f"{name}.py")):
            if root not in sys.path:
                sys.path.append(root)  # the checkout itself is already first (selection.choose_trainer)
            return _on_this_device(importlib.import_module(name))
    if os.environ.get("MEGATRON_LM_PATH"):
        raise ImportError(f"MEGATRON_LM_PATH={os.environ['MEGATRON_LM_PATH']} holds no {name}.py: point it "
                          "at the root of a Megatron-LM checkout.")
    return importlib.import_module("megatron_let.integrations.gpt_script")


class LETMegatronLM:
    """The LET wiring for one process of a Megatron-LM ``pretrain()`` run: the arguments, the model hook and
    the forward step it passes to ``pretrain()``, and the registry entries (groups ``let-script`` and
    ``let-megatron-lm``, below) that :meth:`install` applies. LET's per-iteration work is the driver's."""

    def __init__(self, script):
        self.script = script
        self.driver: Optional[LETDriver] = None  # built with the first model chunk (the args are parsed by then)
        self._owner_vp_stages: Set[Optional[int]] = set()
        self._training = False  # the model's mode in the current forward step

    @property
    def let(self) -> Optional[LateToEarlyTraining]:
        return None if self.driver is None else self.driver.let

    # -- arguments -----------------------------------------------------------------------------
    @staticmethod
    def extra_args_provider(base: Optional[Callable] = None) -> Callable:
        """``base`` (e.g. ModelOpt's) then LET's ``--let-*`` flags."""

        def provider(parser):
            return add_let_args(base(parser) if base is not None else parser)

        return provider

    # -- model ---------------------------------------------------------------------------------
    def _ensure_let(self) -> Optional[LateToEarlyTraining]:
        if self.driver is None:
            from megatron.training import get_args, get_tokenizer, print_rank_last

            args = get_args()
            name = f"--tokenizer-model {args.tokenizer_model}" if getattr(args, "tokenizer_model", None) \
                else f"--tokenizer-type {args.tokenizer_type}"
            saved, resume_iteration = read_saved_let_state(args)  # megatron_let/resume.py: shared with the lean trainer
            let = build_let(args, get_tokenizer(), name, print_rank_last, saved, resume_iteration, loop="Megatron-LM")
            self.driver = LETDriver(let, args.micro_batch_size, args.seq_length, print_rank_last)
            if let is not None:
                args.let_state = self.driver.checkpoint_state()  # Megatron-LM saves args in every checkpoint
        return self.let

    def attach(self, chunks):
        """LET on the chunk(s) that hold the target layer, before Megatron wraps them in DDP; returns
        ``chunks`` (a model-config pre-wrap hook, 0.19)."""
        let = self._ensure_let()
        for chunk in chunks:
            if let is not None and let.attach(chunk):
                self._owner_vp_stages.add(getattr(chunk, "vp_stage", None))
        return chunks

    def model_provider(self, base: Callable) -> Callable:
        """Wrap Megatron-LM's model provider: attach LET to every chunk it builds."""

        @functools.wraps(base)
        def provider(*args, **kwargs):
            model = base(*args, **kwargs)
            let = self._ensure_let()
            if let is not None and let.attach(model):
                self._owner_vp_stages.add(getattr(model, "vp_stage", kwargs.get("vp_stage")))
            return model

        return provider

    def owns_target(self, vp_stage: Optional[int] = None) -> bool:
        """Does this rank's chunk ``vp_stage`` (None without virtual PP) hold the target layer?"""
        return self.let is not None and not self.let.finished and vp_stage in self._owner_vp_stages

    def forward_step(self, base: Callable) -> Callable:
        """Wrap the forward step: note whether it trains (evaluation runs no alignment)."""

        @functools.wraps(base)
        def forward_step(data_iterator, model, *args, **kwargs):
            self._training = model.training
            return base(data_iterator, model, *args, **kwargs)

        return forward_step

    def alignment_in_background(self, tokens: torch.Tensor):
        """causal-span: start re-tokenizing the micro-batch on the aligner's thread as soon as get_batch
        has it, so the text work overlaps the layers below k (Megatron-LM builds each batch inside the
        forward step, so there is no iterator to prefetch from as the lean trainer does). A future, or
        None where the hook computes it: exact mode, evaluation, and CP (tokens here are CP-local)."""
        let = self.let
        if not self._training or let.current_lambda == 0.0 or let.aligner is None or let.spreads_teacher:
            return None
        from megatron.core import parallel_state

        if parallel_state.get_context_parallel_world_size() > 1:
            return None
        return let.aligner.executor.submit(let.aligner, tokens)

    # -- run -----------------------------------------------------------------------------------
    def install(self) -> None:
        """The registry's LET entries: the script's batch functions, then megatron.training's loop."""
        apply_patches(SCRIPT_GROUP, self, module=self.script)
        apply_patches(LOOP_GROUP, self)

    def export(self, model, args) -> None:
        """--let-export-dir: the loaded model without LET's projector, saved with Megatron-LM's own
        save_checkpoint (no optimizer, no RNG, synchronously) through :func:`~megatron_let.checkpoint_files.write_export`,
        then the run ends (_Exported)."""
        from megatron.training import checkpointing, print_rank_last

        from megatron_let.checkpoint_files import write_export

        self.driver.strip_for_export(model)

        def save(partial: str) -> None:
            saved = {name: getattr(args, name, None) for name in ("save", "no_save_optim", "no_save_rng", "async_save")}
            args.save, args.no_save_optim, args.no_save_rng, args.async_save = partial, True, True, False
            let_state = args.__dict__.pop("let_state", None)  # the export carries no LET state
            if let_state is not None:
                saved["let_state"] = let_state
            try:
                checkpointing.save_checkpoint(args.iteration, model, None, None,
                                              getattr(args, "num_floating_point_operations_so_far", 0))
            finally:
                for name, value in saved.items():
                    setattr(args, name, value)

        write_export(args.let_export_dir, save)
        print_rank_last(f" exported iteration {args.iteration} without LET state to {args.let_export_dir}")
        raise _Exported()


# -- the registry's entries: what LET changes in a pretrain_gpt.py script and in megatron.training --------------
SCRIPT_GROUP, LOOP_GROUP = "let-script", "let-megatron-lm"


def _full_batch_on_let_stage(predicate: str) -> Callable:
    def apply(script, integration: LETMegatronLM) -> None:
        needs_full_batch = getattr(script, predicate)

        @functools.wraps(needs_full_batch)
        def mtp_or_let_on_this_rank(*args, vp_stage=None, **kwargs):
            return needs_full_batch(*args, vp_stage=vp_stage, **kwargs) or integration.owns_target(vp_stage)

        setattr(script, predicate, mtp_or_let_on_this_rank)

    return apply


_FULL_BATCH_WHY = ("the stage of --let-target-layer needs the tokens: the script's own 'this stage needs the full "
                   "batch' predicate (there for Multi-Token Prediction) also answers yes there, so the dataset is "
                   "built on that stage and get_batch_on_this_tp_rank broadcasts every field to its TP ranks")
register_patch("let.script.full-batch", group=SCRIPT_GROUP, target="pretrain_gpt:mtp_on_this_rank", until="0.18",
               why=_FULL_BATCH_WHY)(_full_batch_on_let_stage("mtp_on_this_rank"))
register_patch("let.script.full-batch-func", group=SCRIPT_GROUP, target="pretrain_gpt:mtp_on_this_rank_func",
               since="0.18", why=_FULL_BATCH_WHY + " (megatron.core's, imported under this name)"
               )(_full_batch_on_let_stage("mtp_on_this_rank_func"))


@register_patch("let.script.get-batch", group=SCRIPT_GROUP, target="pretrain_gpt:get_batch",
                why="hands (tokens, loss_mask) of each micro-batch to LET on the chunk that owns --let-target-layer")
def _tokens_to_let(script, integration: LETMegatronLM) -> None:
    get_batch = script.get_batch

    @functools.wraps(get_batch)
    def get_batch_for_let(data_iterator, vp_stage=None):
        batch = get_batch(data_iterator, vp_stage)
        if integration.owns_target(vp_stage):
            tokens, loss_mask = tokens_and_loss_mask(script, batch)
            if tokens is None or loss_mask is None:
                raise RuntimeError("LET: get_batch returned no tokens/loss mask on the stage of --let-target-layer.")
            integration.let.set_microbatch(tokens, loss_mask, integration.alignment_in_background(tokens))
        return batch

    script.get_batch = get_batch_for_let


@register_patch("let.train-step", group=LOOP_GROUP, target="megatron.training.training:train_step",
                why="LET's iteration begins on every rank before the pipeline schedule; spread placement runs the "
                    "teacher over the model-parallel group there (no collective inside the schedule)")
def _begin_iteration(training, integration: LETMegatronLM) -> None:
    train_step = training.train_step

    @functools.wraps(train_step)
    def train_step_with_let(forward_step_func, data_iterator, *args, **kwargs):
        driver = integration.driver
        if driver is not None and driver.active:
            from megatron.core.num_microbatches_calculator import get_num_microbatches
            from megatron.training import get_args

            data_iterator = driver.begin_iteration(get_args().curr_iteration, get_num_microbatches(), data_iterator)
        return train_step(forward_step_func, data_iterator, *args, **kwargs)

    training.train_step = train_step_with_let


@register_patch("let.setup-model-and-optimizer", group=LOOP_GROUP,
                target="megatron.training.training:setup_model_and_optimizer",
                why="after the checkpoint is loaded: --let-export-dir exports and ends the run; the optimizer step "
                    "ends LET's iteration first (--let-on-nonfinite: error raises, skip reports an unsuccessful "
                    "update, which Megatron-LM counts as skipped, leaving its lr schedule alone)")
def _end_iteration_before_step(training, integration: LETMegatronLM) -> None:
    setup = training.setup_model_and_optimizer

    @functools.wraps(setup)
    def setup_with_let(*args, **kwargs):
        model, optimizer, scheduler = setup(*args, **kwargs)  # the checkpoint is loaded here
        from megatron.training import get_args

        if get_args().let_export_dir:
            integration.export(model, get_args())
        if integration.let is not None and optimizer is not None:
            step = optimizer.step

            @functools.wraps(step)
            def step_unless_nonfinite(*step_args, **step_kwargs):
                if integration.driver.end_iteration(get_args().curr_iteration):  # a collective: every rank steps
                    return False, None, None
                return step(*step_args, **step_kwargs)

            optimizer.step = step_unless_nonfinite
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = setup_with_let


@register_patch("let.training-log", group=LOOP_GROUP, target="megatron.training.training:training_log",
                why="LET's scalars (a PP + DP collective, every rank, every iteration) join the iteration's loss_dict: "
                    "Megatron-LM averages them over the log interval and writes them to its line, TensorBoard and W&B")
def _log_let_scalars(training, integration: LETMegatronLM) -> None:
    training_log = training.training_log

    @functools.wraps(training_log)
    def training_log_with_let(loss_dict, total_loss_dict, *args, **kwargs):
        if integration.driver is not None:
            integration.driver.scalars_into(loss_dict, bool(kwargs.get("skipped_iter", args[4] if len(args) > 4 else 0)))
        return training_log(loss_dict, total_loss_dict, *args, **kwargs)

    training.training_log = training_log_with_let


@register_patch("let.print-rank-last", group=LOOP_GROUP, target="megatron.training.training:print_rank_last",
                why="Megatron-LM prints a loss-dict entry only if its interval average is > 0 (0.19: >= 0): a "
                    "zero 'let lambda' / 'let loss' or a negative 'let cos' is put back where Megatron-LM would "
                    "have printed it")
def _signed_scalars_in_line(training, integration: LETMegatronLM) -> None:
    print_rank_last = training.print_rank_last

    def print_with_let_cos(message, *args, **kwargs):
        if integration.driver is not None:
            message = integration.driver.signed_scalars_into_line(message)
        return print_rank_last(message, *args, **kwargs)

    training.print_rank_last = print_with_let_cos


@register_patch("let.save-checkpoint", group=LOOP_GROUP, target="megatron.training.training:save_checkpoint",
                why="a save into --save that fails (disk full, file-size limit, read-only directory) ends the run "
                    "with one line (exit 1), not torch's worker traceback; with or without LET")
def _save_or_one_line(training, integration: LETMegatronLM) -> None:
    """The partial iter_N Megatron-LM leaves is removed unless the tracker names it. Every rank raises: torch's
    distributed checkpoint gathers the write results of all ranks before it fails, and Megatron-LM writes the
    tracker only after that. A background (--async-save with a persistent worker) save fails later, in
    maybe_finalize_async_save, with Megatron-LM's own error."""
    save_checkpoint = training.save_checkpoint  # what save_checkpoint_and_time and train() call

    @functools.wraps(save_checkpoint)
    def save_or_one_line(iteration, *args, **kwargs):
        from megatron.training import get_args

        from megatron_let.checkpoint_files import SAVE_ERRORS, iteration_dir, write_failure

        root = get_args().save
        if kwargs.get("non_persistent_ckpt") or not root:  # not --save's directory: as Megatron-LM reports it
            return save_checkpoint(iteration, *args, **kwargs)
        logged = _LoggedOSError()  # torch's writer threads log the errno, then raise without it
        logger = logging.getLogger("megatron.core.dist_checkpointing")
        logger.addHandler(logged)
        try:
            return save_checkpoint(iteration, *args, **kwargs)
        except SAVE_ERRORS as error:  # any failed save: the tracker still names the last good checkpoint
            raise CheckpointWriteError(write_failure(root, iteration, error, iteration_dir(root, iteration),
                                                     logged.error)) from error
        finally:
            logger.removeHandler(logged)

    training.save_checkpoint = save_or_one_line


class _Exported(Exception):
    """--let-export-dir is done: leave pretrain() before training."""


class _LoggedOSError(logging.Handler):
    """The first "[Errno N] text" megatron-core's checkpoint writer logs, as an OSError (it raises without it)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.error: Optional[OSError] = None

    def emit(self, record) -> None:
        found = re.search(r"\[Errno (\d+)\] ([^\n]*)", record.getMessage())
        if found and self.error is None:
            self.error = OSError(int(found.group(1)), found.group(2))


def main(extra_args_provider: Optional[Callable] = None, model: str = "gpt") -> int:
    """``pretrain_gpt.py``'s ``__main__`` with LET (``model="hybrid"``: ``pretrain_hybrid.py``'s, a HybridModel
    from ``--hybrid-layer-pattern``); ``extra_args_provider`` adds more flags."""
    program = "pretrain_hybrid_let.py" if model == "hybrid" else "pretrain_gpt_let.py"
    model_config_from_args = None  # GPT: the version's own (megatron_versions.call_pretrain)
    if model == "hybrid":
        try:
            model_config_from_args = _hybrid_model_config()
        except LETConfigError as error:
            print_error(program, error)
            return 2
    pretrain_gpt = import_pretrain_script("pretrain_hybrid" if model == "hybrid" else "pretrain_gpt")
    from megatron.core.enums import ModelType
    from megatron.training import training

    integration = LETMegatronLM(pretrain_gpt)
    integration.install()
    announce_patches()

    training.set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())

    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True  # as pretrain_gpt.py's __main__ ("transition to core datasets")

    base_args = pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None
    if extra_args_provider is not None:
        script_args = base_args

        def base_args(parser):  # noqa: F811 - both providers, then LET's
            if script_args is not None:
                parser = script_args(parser)
            return extra_args_provider(parser)

    model_provider = script_model_provider(pretrain_gpt)  # None: the config container builds (0.19)
    try:  # before maybe_wrap_for_inprocess_restart, which parses the flags (--help) and may open a TCPStore
        _check_before_start(integration.extra_args_provider(base_args))
    except LETConfigError as error:
        print_error(program, error)
        return 2

    from megatron.training import inprocess_restart

    kwargs = {}
    pretrain, kwargs["store"] = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
    if model != "hybrid":  # pretrain_hybrid.py passes none
        kwargs["get_embedding_ranks"] = pretrain_gpt.get_embedding_ranks

    try:
        call_pretrain(pretrain, provider, model_provider and integration.model_provider(model_provider),
                      ModelType.encoder_or_decoder,
                      integration.forward_step(pretrain_gpt.forward_step),
                      args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                      extra_args_provider=integration.extra_args_provider(base_args), attach=integration.attach,
                      model_config_from_args=model_config_from_args, **kwargs)
    except _Exported:
        return 0
    except (LETConfigError, LETNonFiniteError, CheckpointWriteError) as error:
        print_error(program, error)
        return 2 if isinstance(error, LETConfigError) else 1
    return 0


def _check_before_start(extra_args_provider: Callable) -> None:
    """The command line through Megatron-LM's own parser, then the launch checks (:mod:`megatron_let.preflight`),
    before ``pretrain()`` creates any process group or writes anything."""
    from megatron.training.arguments import parse_args

    from megatron_let.preflight import check_launch

    if help_requested():
        try:
            parse_args(extra_args_provider=extra_args_provider)  # argparse prints the help and exits 0
        except Exception as error:  # noqa: BLE001 - a help string Megatron-LM's parser cannot format
            from megatron_let.megatron_versions import core_version

            print_let_help(extra_args_provider, f"Megatron-LM {core_version()}'s own --help fails ({type(error).__name__}: "
                           f"{error}: a help string of its parser), so only LET's flags are listed; Megatron-LM's "
                           "are those of its megatron/training/arguments.py.")
        raise SystemExit(0)
    check_launch(parse_args(extra_args_provider=extra_args_provider), megatron_lm=True)


def help_requested() -> bool:
    return any(flag in ("-h", "--help") for flag in sys.argv[1:])


def print_let_help(extra_args_provider: Callable, why: str) -> None:
    """--help where Megatron-LM's flags cannot be listed: LET's flags (``extra_args_provider``'s), then ``why``
    on one line."""
    import argparse

    program = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(prog=program, usage=f"torchrun {program} <Megatron-LM flags> --let-teacher DIR "
                                     "--let-target-layer K [LET flags]", allow_abbrev=False)
    extra_args_provider(parser)
    print(parser.format_help(), flush=True)
    print(f"{program}: {why}", flush=True)


def _hybrid_model_config() -> Callable:
    """:func:`megatron_let.integrations.hybrid.hybrid_model_config`, where this megatron-core has HybridModel."""
    from megatron_let.megatron_versions import core_version, has_hybrid_model

    if not has_hybrid_model():
        raise LETConfigError(f"HybridModel (--hybrid-layer-pattern) needs megatron-core 0.19 or newer; this is "
                             f"{core_version()}: use pretrain_gpt_let.py, or Python 3.12 with "
                             "megatron-core 0.19.")
    from megatron_let.integrations.hybrid import hybrid_model_config

    return hybrid_model_config
