"""LET inside Megatron-LM's own GPT pretraining loop (``pretrain_gpt.py`` + ``pretrain()``).

``main()`` runs exactly what ``pretrain_gpt.py``'s ``__main__`` runs, with the
user's own Megatron-LM pieces (model provider and builder, forward step,
datasets provider, embedding ranks, ModelOpt arguments), wrapped as follows:

- arguments: ``add_let_args`` is chained after the script's own
  ``extra_args_provider`` (ModelOpt's when it is installed);
- model: every GPTModel chunk goes through ``LateToEarlyTraining.attach``
  right after the builder returns it, i.e. before Megatron wraps it in DDP
  and builds the optimizer (so a learned projector is trained and
  checkpointed like any other weight);
- data: ``pretrain_gpt.get_batch`` hands ``(tokens, loss_mask)`` to LET on
  the chunk that owns ``--let-target-layer``. If that chunk is a middle
  pipeline stage, ``get_batch`` would return nothing there; LET therefore
  marks its stage as one that needs the full batch through the predicate
  ``pretrain_gpt`` already has for this case, ``mtp_on_this_rank``
  (Multi-Token Prediction needs the tokens on its stage too): with it the
  dataset is built on that stage and ``get_batch_on_this_tp_rank`` broadcasts
  every field to all its TP ranks, then slices them for CP as usual;
- iteration: the forward step calls ``begin_iteration(args.curr_iteration,
  get_num_microbatches())`` on the first training micro-batch of each
  iteration (``curr_iteration`` is the 0-based number of completed
  iterations);
- logging: ``training.training_log`` is wrapped so that, on every rank and
  every iteration, ``let.report()`` (a PP + DP collective) is added to the
  iteration's ``loss_dict`` as ``let loss`` / ``let cos`` / ``let lambda``.
  Megatron-LM then averages them over the log interval, prints them in its
  log line next to ``lm loss`` and writes them to TensorBoard / W&B with its
  own code. The loss function's report dict was not used: it exists only on
  the last pipeline stage, while LET's numbers live on the stage of layer k.

The patches touch only names in ``pretrain_gpt``'s and
``megatron.training.training``'s module namespaces, for this process; no file
is edited. Without ``--let-teacher`` every wrapper passes straight through and
the run is plain ``pretrain_gpt.py``.

On a machine without CUDA, ``enable_cpu_megatron_lm()`` is applied first
(see :mod:`megatron_let.compat.cpu_megatron_lm`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import time
from typing import Callable, Optional, Set

import torch

from megatron_let.config import add_let_args
from megatron_let.integrations.launch import build_let, refuse_unsupported_features
from megatron_let.errors import LETConfigError, LETNonFiniteError
from megatron_let.controller import LateToEarlyTraining

__all__ = ["LETMegatronLM", "import_pretrain_gpt", "main", "megatron_lm_available"]

_PROGRAM_START_TIME = time.time()
_LET_KEYS = ("let loss", "let cos", "let lambda")


def _prepare_runtime() -> None:
    """CPU redirections (only without CUDA), before anything imports megatron.training."""
    if not torch.cuda.is_available():
        from megatron_let.compat.cpu_megatron_lm import enable_cpu_megatron_lm

        enable_cpu_megatron_lm()


def megatron_lm_available() -> bool:
    """True if Megatron-LM's ``megatron.training`` imports here (after the CPU redirections).

    ``$MEGATRON_LM_PATH``, if set, is appended to ``sys.path`` first. On CPU,
    ``megatron.training`` imports a triton module, so a plain ``import`` fails
    there: this applies the redirections first, and a launcher should use it
    to choose the integration.
    """
    path = os.environ.get("MEGATRON_LM_PATH")
    if path and os.path.abspath(path) not in map(os.path.abspath, sys.path):
        sys.path.append(os.path.abspath(path))  # appended: megatron.core stays where it was
    try:
        if importlib.util.find_spec("megatron.training") is None:
            return False
        _prepare_runtime()
        importlib.import_module("megatron.training")
    except ImportError:
        return False
    return True


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
    """The user's ``pretrain_gpt`` module (from the Megatron-LM checkout that holds megatron.training)."""
    _prepare_runtime()
    try:
        return importlib.import_module("pretrain_gpt")
    except ModuleNotFoundError as exc:
        if exc.name != "pretrain_gpt":
            raise
    for root in _checkout_roots():
        if os.path.isfile(os.path.join(root, "pretrain_gpt.py")):
            if root not in sys.path:
                sys.path.append(root)  # appended: megatron.core keeps coming from where it did
            return importlib.import_module("pretrain_gpt")
    raise ImportError(
        "LET's Megatron-LM integration needs Megatron-LM's pretrain_gpt.py: put the Megatron-LM "
        "checkout on PYTHONPATH or set MEGATRON_LM_PATH to it."
    )


class LETMegatronLM:
    """The LET wiring for one process of a Megatron-LM ``pretrain()`` run."""

    def __init__(self, pretrain_gpt):
        self.pretrain_gpt = pretrain_gpt
        self.let: Optional[LateToEarlyTraining] = None
        self._let_created = False
        self._owner_vp_stages: Set[Optional[int]] = set()
        self._last_iteration: Optional[int] = None
        self._training = False  # the model's mode in the current forward step
        missing = [name for name in ("get_batch", "mtp_on_this_rank", "forward_step",
                                     "train_valid_test_datasets_provider", "model_provider")
                   if not hasattr(pretrain_gpt, name)]
        if missing:
            raise ImportError(f"this pretrain_gpt.py lacks {missing}; LET's integration was written "
                              "for Megatron-LM core_v0.16 (pretrain_gpt.py with gpt_builders.py).")

    # -- arguments -----------------------------------------------------------------------------
    def extra_args_provider(self, base: Optional[Callable] = None) -> Callable:
        """``base`` (e.g. ModelOpt's) then LET's ``--let-*`` flags."""

        def provider(parser):
            if base is not None:
                parser = base(parser)
            return add_let_args(parser)

        return provider

    # -- model ---------------------------------------------------------------------------------
    def _ensure_let(self) -> Optional[LateToEarlyTraining]:
        if not self._let_created:
            from megatron.training import get_args

            from megatron.training import get_tokenizer, print_rank_last

            args = get_args()
            if getattr(args, "let_teacher", None) is not None:
                _check_supported(args)
            name = f"--tokenizer-model {args.tokenizer_model}" if getattr(args, "tokenizer_model", None) \
                else f"--tokenizer-type {args.tokenizer_type}"
            self.let = build_let(args, get_tokenizer(), name, print_rank_last)
            self._let_created = True
        return self.let

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

    # -- data ----------------------------------------------------------------------------------
    def _patch_pretrain_gpt(self) -> None:
        module = self.pretrain_gpt
        needs_full_batch = module.mtp_on_this_rank
        get_batch = module.get_batch

        @functools.wraps(needs_full_batch)
        def mtp_or_let_on_this_rank(config, *args, vp_stage=None, **kwargs):
            return needs_full_batch(config, *args, vp_stage=vp_stage, **kwargs) or \
                self.owns_target(vp_stage)

        @functools.wraps(get_batch)
        def get_batch_for_let(data_iterator, vp_stage=None):
            batch = get_batch(data_iterator, vp_stage)
            if self.owns_target(vp_stage):
                tokens, loss_mask = batch[0], batch[2]
                if tokens is None or loss_mask is None:
                    raise RuntimeError("LET: get_batch returned no tokens/loss mask on the stage of "
                                       "--let-target-layer.")
                self.let.set_microbatch(tokens, loss_mask, self._alignment_in_background(tokens))
            return batch

        module.mtp_on_this_rank = mtp_or_let_on_this_rank
        module.get_batch = get_batch_for_let

    def _alignment_in_background(self, tokens: torch.Tensor):
        """causal-span: start re-tokenizing the micro-batch on the aligner's thread as soon as get_batch
        has it, so the text work overlaps the layers below k (Megatron-LM builds each batch inside the
        forward step, so there is no iterator to prefetch from as the lean trainer does). A future, or
        None where the hook computes it: exact mode, evaluation, and CP (tokens here are CP-local)."""
        let = self.let
        if not self._training or let.current_lambda == 0.0 or let.aligner is None:
            return None
        from megatron.core import parallel_state

        if parallel_state.get_context_parallel_world_size() > 1:
            return None
        return let.aligner.executor.submit(let.aligner, tokens)

    # -- iteration -----------------------------------------------------------------------------
    def forward_step(self, base: Callable) -> Callable:
        """Wrap the forward step: ``begin_iteration`` once per training iteration."""

        @functools.wraps(base)
        def forward_step(data_iterator, model, *args, **kwargs):
            self._training = model.training
            if self.let is not None and model.training:
                from megatron.core.num_microbatches_calculator import get_num_microbatches
                from megatron.training import get_args

                iteration = get_args().curr_iteration
                if iteration != self._last_iteration:
                    self._last_iteration = iteration
                    self.let.begin_iteration(iteration, get_num_microbatches())
            return base(data_iterator, model, *args, **kwargs)

        return forward_step

    # -- logging -------------------------------------------------------------------------------
    def _patch_training_log(self, training) -> None:
        training_log = training.training_log

        @functools.wraps(training_log)
        def training_log_with_let(loss_dict, total_loss_dict, *args, **kwargs):
            if self.let is not None and not self.let.finished:
                bad_ranks = self.let.nonfinite_ranks()  # collective, like report()
                if bad_ranks:
                    from megatron.training import get_args

                    raise LETNonFiniteError(
                        f"non-finite LET alignment loss at iteration {get_args().curr_iteration + 1} on "
                        f"rank(s) {bad_ranks}: the teacher ({self.let.config.teacher}) produced NaN/Inf "
                        "hidden states or the target diverged.")
                device = torch.device("cuda", torch.cuda.current_device()) \
                    if torch.cuda.is_available() else torch.device("cpu")
                for key, value in self.let.report().items():  # collective: all ranks, every iteration
                    loss_dict[key] = torch.tensor(value, dtype=torch.float32, device=device)
            return training_log(loss_dict, total_loss_dict, *args, **kwargs)

        training.training_log = training_log_with_let

    # -- run -----------------------------------------------------------------------------------
    def install(self) -> None:
        from megatron.training import training

        self._patch_pretrain_gpt()
        self._patch_training_log(training)


def _check_supported(args) -> None:
    """Settings LET cannot honour under Megatron-LM yet."""
    if getattr(args, "use_legacy_models", False):
        raise LETConfigError("--let-teacher needs megatron-core models; drop --use-legacy-models.")
    refuse_unsupported_features(args)  # CUDA graphs, FSDP (full recompute works: megatron_let/recompute.py)
    if getattr(args, "let_on_nonfinite", "error") == "skip":
        raise LETConfigError("--let-on-nonfinite skip needs the megatron-core trainer; under Megatron-LM use "
                             "--let-on-nonfinite error with Megatron's --check-for-nan-in-loss-and-grad.")


def main(extra_args_provider: Optional[Callable] = None) -> int:
    """``pretrain_gpt.py``'s ``__main__`` with LET; ``extra_args_provider`` adds more flags."""
    pretrain_gpt = import_pretrain_gpt()
    from megatron.core.enums import ModelType
    from megatron.training import training

    integration = LETMegatronLM(pretrain_gpt)
    integration.install()

    set_startup_timestamps = getattr(training, "set_startup_timestamps", None)
    if set_startup_timestamps is not None:
        set_startup_timestamps(program_start=getattr(pretrain_gpt, "_PROGRAM_START_TIME", _PROGRAM_START_TIME),
                               main_entry=time.time())

    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True  # as pretrain_gpt.py's __main__ ("transition to core datasets")

    base_args = None
    if getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        base_args = getattr(pretrain_gpt, "add_modelopt_args", None)
    if extra_args_provider is not None:
        script_args = base_args

        def base_args(parser):  # noqa: F811 - both providers, then LET's
            if script_args is not None:
                parser = script_args(parser)
            return extra_args_provider(parser)

    model_provider = pretrain_gpt.model_provider
    if hasattr(pretrain_gpt, "gpt_builder"):
        model_provider = functools.partial(model_provider, pretrain_gpt.gpt_builder)

    pretrain, kwargs = training.pretrain, {}
    inprocess_restart = getattr(importlib.import_module("megatron.training"), "inprocess_restart", None)
    if inprocess_restart is not None:
        pretrain, kwargs["store"] = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    if hasattr(pretrain_gpt, "get_embedding_ranks"):
        kwargs["get_embedding_ranks"] = pretrain_gpt.get_embedding_ranks

    try:
        pretrain(
            provider,
            integration.model_provider(model_provider),
            ModelType.encoder_or_decoder,
            integration.forward_step(pretrain_gpt.forward_step),
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
            extra_args_provider=integration.extra_args_provider(base_args),
            **kwargs,
        )
    except (LETConfigError, LETNonFiniteError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_gpt_let.py: error: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, LETConfigError) else 1
    return 0
