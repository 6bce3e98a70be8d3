"""LateToEarlyTraining: the per-process LET state shared by the model chunks and the trainer."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_let.config import LAMBDA_AUTO, STOP_AUTO, LETConfig
from megatron_let.loss.alignment import LETAlignment, target_layer_of
from megatron_let.loss.metrics import IntervalMean, LETMetrics
from megatron_let.loss.placement import SpreadPlacement, SpreadStates, TeacherWork
from megatron_let.loss.probe import SLOTS as PROBE_SLOTS, GradientProbe, pull_ratio
from megatron_let.teachers.huggingface import HFTeacher, resolve_teacher_dtype, teacher_hidden_size
from megatron_let.weight.auto_lambda import AutoLambda
from megatron_let.weight.auto_stop import AutoStop
from megatron_let.weight.schedule import let_lambda


class LateToEarlyTraining:
    """Owns the schedule, the teacher (only where layer k lives) and the metrics.

    Life cycle, driven by the trainer:
      ``attach(chunk)`` for every model chunk, before DDP and the optimizer;
      per iteration ``begin_iteration(it, num_microbatches)``; per micro-batch
      ``set_microbatch(tokens, loss_mask)`` just before the chunk's forward;
      ``report()`` at log time. Once lambda reaches 0 the hooks are removed
      and the teacher released: the rest of training runs as without LET.
    """

    def __init__(self, config: LETConfig, stop_iter: Optional[int] = None, stop_samples: Optional[int] = None,
                 seed: int = 1234, teacher_hidden_size: Optional[int] = None, target_tokenizer=None,
                 eod_id: Optional[int] = None, saved: Optional[dict] = None):
        """``stop_iter`` / ``stop_samples``: the stop step resolved on the run's schedule
        (:func:`megatron_let.weight.stop.resolve_stop`; default: ``config.stop_iter``). ``saved``: a checkpoint's LET
        state (:meth:`checkpoint_state`), whose --let-lambda auto EMA and --let-stop auto window continue here."""
        self.config = config
        self.target_tokenizer, self.eod_id = target_tokenizer, eod_id
        self._aligner = None
        self._alignment = None
        self._teacher_hidden_size = teacher_hidden_size
        self.stop_iter = config.stop_iter if stop_iter is None else stop_iter
        if self.stop_iter is None:
            raise ValueError("LateToEarlyTraining needs its stop step: resolve it with megatron_let.weight.stop.resolve_stop")
        self.stop_samples = stop_samples
        self.seed = seed
        saved = saved or {}
        self.metrics = LETMetrics()
        self.alignments: List[LETAlignment] = []
        self.current_lambda = 0.0
        # --let-lambda auto: the weight follows the measured pulls at layer k (megatron_let/weight/auto_lambda.py)
        self.auto_lambda: Optional[AutoLambda] = \
            AutoLambda(config.auto_fraction) if config.lambda0 == LAMBDA_AUTO else None
        # --let-stop auto: also stop once cos(g_A, g_LM) at layer k stays below a threshold (auto_stop.py); a
        # checkpoint's decision stands, and goes on into checkpoints, whatever --let-stop says now
        decided = (saved.get("auto_stop") or {}).get("stopped_at") is not None
        self.auto_stop: Optional[AutoStop] = AutoStop.from_config(config) \
            if config.stop == STOP_AUTO or decided else None
        if self.auto_lambda is not None:
            self.auto_lambda.load_state_dict(saved.get("auto_lambda"))
        if self.auto_stop is not None:
            self.auto_stop.load_state_dict(saved.get("auto_stop"))
        # both measure the two gradients at layer k's output (megatron_let/loss/probe.py); neither: nothing runs
        self.probe: Optional[GradientProbe] = GradientProbe(dot=self.auto_stop is not None) \
            if self.auto_lambda is not None or self.auto_stop is not None else None
        # logged with the probe, fixed lambda too: "let ratio" = lambda * ||g_A|| / ||g_LM|| at layer k, the
        # alignment's pull as a fraction of the LM's (~ fraction * decay under auto), an interval's mean
        self._pull_fraction = IntervalMean()
        self._iteration = 0
        self.num_microbatches = 1
        self.finished = False
        self._teacher: Optional[HFTeacher] = None
        self._microbatch = None
        self._nonfinite = False
        self._sequence_parallel = False
        self._placement: Optional[SpreadPlacement] = None  # built on the first spread iteration
        self._spread: Optional[SpreadStates] = None  # this iteration's precomputed states
        self.work = TeacherWork()  # teacher rows / seconds this rank ran in the current iteration

    # -- model ---------------------------------------------------------------------------------
    def attach(self, model) -> bool:
        """Add the alignment to a GPTModel / HybridModel chunk if it owns the target layer; True if it does."""
        self._sequence_parallel = bool(model.config.sequence_parallel)  # every rank: spread needs it
        layer = target_layer_of(model, self.config.target_layer)  # GPTModel or HybridModel: alignment.py
        if layer is None:
            return False
        alignment = LETAlignment(model.config, self, layer, self.teacher_hidden_size)
        model.let_alignment = alignment
        self.alignments.append(alignment)
        return True

    @property
    def teacher_hidden_size(self) -> int:
        """From the teacher's config (or the checkpoint, so a resume past the stop needs no teacher)."""
        if self._teacher_hidden_size is None:
            self._teacher_hidden_size = teacher_hidden_size(self.config.teacher, self.config.teacher_layer)
        return self._teacher_hidden_size

    @property
    def owns_target_layer(self) -> bool:
        return bool(self.alignments)

    # -- iteration -----------------------------------------------------------------------------
    def begin_iteration(self, iteration: int, num_microbatches: int) -> float:
        """Set lambda for the step starting at ``iteration`` (0-based); release LET once it is 0."""
        self.num_microbatches = num_microbatches
        self._iteration = iteration
        self._spread = None
        self.work.reset()
        for alignment in self.alignments:
            alignment.recompute_stash.check_drained()
        stopped = self.auto_stop is not None and self.auto_stop.stopped_at is not None \
            and iteration >= self.auto_stop.stopped_at  # --let-stop auto decided: as a stop step there
        if stopped:
            self.current_lambda = 0.0
        elif self.auto_lambda is None:
            self.current_lambda = let_lambda(iteration, self.config.lambda0, self.stop_iter,
                                             self.config.schedule)
        else:  # auto: the measured scale times the schedule's shape (0 while nothing is measured yet)
            self.current_lambda = self.auto_lambda.weight(let_lambda(iteration, 1.0, self.stop_iter,
                                                                     self.config.schedule))
        if self.current_lambda == 0.0 and (iteration >= self.stop_iter or stopped):
            self.finish()
        if not self.finished:
            for alignment in self.alignments:  # --let-teacher-norm standardize: the statistics this step uses
                alignment.teacher_norm.begin_iteration(iteration)
        return self.current_lambda

    def set_microbatch(self, tokens: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor],
                       alignment=None) -> None:
        """Tokens [b, s] and loss mask [b, s] exactly as this rank feeds them to the model (CP-local).

        ``alignment``: the micro-batch's causal-span TokenAlignment (full sequence), or a Future of one being
        computed in the background, if any.
        """
        self._microbatch = (tokens, loss_mask)
        self._alignment = alignment

    @property
    def aligning(self) -> bool:
        """Does layer k's hook run the alignment this iteration? lambda > 0, or --let-lambda auto before the
        stop (its first iteration measures at weight 0)."""
        return not self.finished and (self.current_lambda != 0.0 or self.auto_lambda is not None)

    # -- spread placement (megatron_let/loss/placement.py) --------------------------------------------
    @property
    def spreads_teacher(self) -> bool:
        """True when this iteration's teacher work is to be precomputed over the model-parallel group."""
        return self.config.teacher_placement == "spread" and self.aligning

    def precompute_teacher(self, tokens: torch.Tensor, micro_batch_size: int) -> None:
        """On EVERY rank of the replica's model-parallel group, before the schedule: ``tokens`` [rows, s] are
        the iteration's full-sequence tokens, micro-batch after micro-batch. Runs this rank's share of the
        teacher and delivers layer k's ranks their slices (collectives: never call inside the schedule)."""
        if not self.spreads_teacher:
            return
        if self._placement is None:
            self._placement = SpreadPlacement(self.owns_target_layer, self._sequence_parallel)
        self._spread = self._placement.compute(tokens, micro_batch_size,
                                               lambda rows: self._teacher_rows(rows, micro_batch_size))

    def take_spread(self):
        """Micro-batch i's precomputed (states [s_local, b, h_T], valid [s_local, b] | None), or None
        (owner placement, or no precompute this iteration: the hook runs the teacher itself)."""
        return None if self._spread is None else self._spread.take()

    def _teacher_rows(self, tokens: torch.Tensor, chunk: int):
        """Teacher states [n, s, h_T] at the target's positions for whole sequences ``tokens`` [n, s], and
        valid [n, s] (causal-span; None in exact mode). Runs in chunks of ``chunk`` rows (the micro-batch
        size the user sized memory for)."""
        aligner = self.aligner
        n, seq = tokens.shape
        if n == 0:  # fewer sequences than ranks: nothing to run, the teacher is not even loaded here
            states = torch.empty(0, seq, self.teacher_hidden_size, device=_device(),
                                 dtype=resolve_teacher_dtype(self.config.teacher_dtype))
            return states, (None if aligner is None else torch.zeros(0, seq, dtype=torch.bool))
        alignment = aligner(tokens) if aligner is not None else None
        source = tokens if alignment is None else alignment.teacher_tokens
        mask = None if alignment is None else alignment.teacher_attention_mask
        parts = []
        for first in range(0, n, chunk):
            with self.work.timed(min(chunk, n - first)):
                parts.append(self.teacher.hidden_states(source[first:first + chunk],
                                                        None if mask is None else mask[first:first + chunk]))
        states = torch.cat(parts, dim=1)  # [s_T, n, h]
        if alignment is None:
            return states.transpose(0, 1), None
        from megatron_let.teachers.token_alignment import gather_teacher_states

        return gather_teacher_states(states, alignment.index).transpose(0, 1), alignment.valid

    def take_microbatch(self):
        if self._microbatch is None or self._microbatch[0] is None:
            raise RuntimeError(
                "LET: the target layer ran without this micro-batch's tokens; the forward step must "
                "call set_microbatch(tokens, loss_mask) on the pipeline stage owning --let-target-layer."
            )
        microbatch, self._microbatch = self._microbatch, None
        return microbatch

    def take_alignment(self):
        """The precomputed TokenAlignment given with this micro-batch (None: the hook computes it)."""
        alignment, self._alignment = self._alignment, None
        return alignment.result() if isinstance(alignment, Future) else alignment

    @property
    def aligner(self):
        """The CausalSpanAligner, or None in exact mode (the teacher reads the target's ids)."""
        if self.config.token_alignment == "exact":
            return None
        if self._aligner is None:
            from megatron_let.teachers.huggingface import resolve_teacher, teacher_max_positions
            from megatron_let.teachers.token_alignment import build_aligner

            if self.eod_id is None:
                raise RuntimeError("LET causal-span alignment needs the target's EOD id (LateToEarlyTraining("
                                   "..., target_tokenizer=..., eod_id=...)).")
            source = resolve_teacher(self.config.teacher)
            self._aligner = build_aligner(self.target_tokenizer, self.config.teacher_tokenizer or source.directory,
                                          self.eod_id, teacher_max_positions(source.config()),
                                          matched_only=self.config.token_alignment == "causal-span-matched")
        return self._aligner

    def aligned_teacher_hidden_states(self, tokens: torch.Tensor, alignment=None):
        """Teacher states [s, b, h_T] for the target's full-sequence ``tokens`` [b, s], and the
        [b, s] bool mask of aligned positions (None in exact mode)."""
        aligner = self.aligner
        if aligner is None:
            return self.teacher_hidden_states(tokens), None
        from megatron_let.teachers.token_alignment import gather_teacher_states

        if alignment is None:
            alignment = aligner(tokens)
        states = self.teacher_hidden_states(alignment.teacher_tokens, alignment.teacher_attention_mask)
        return gather_teacher_states(states, alignment.index), alignment.valid

    def record_loss(self, loss_sum: torch.Tensor) -> None:
        """Remember (without a device sync) whether this micro-batch's alignment loss was finite."""
        bad = ~torch.isfinite(loss_sum.detach())
        self._nonfinite = bad if self._nonfinite is False else (self._nonfinite | bad)

    def nonfinite_ranks(self) -> List[int]:
        """Ranks whose alignment loss was NaN/Inf this iteration (a collective over all ranks).

        Both trainers call it on every rank after each iteration's backward while LET runs, before any
        checkpoint: the probe's per-iteration sums (--let-lambda auto, --let-stop auto) ride on its all-reduce;
        the EMA and the stop window are updated here, identically on every rank (a second call in the same
        iteration finds nothing to add)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        auto, probe = self.auto_lambda, self.probe
        if probe is None:
            flags = torch.zeros(world, device=_device())
        else:
            flags = torch.zeros(world + PROBE_SLOTS, dtype=torch.float64, device=_device())
            flags[world:] = probe.take_local(flags.device)
        if self._nonfinite is not False:
            flags[rank] = self._nonfinite.to(flags.dtype).to(flags.device)
        self._nonfinite = False
        if world > 1:
            dist.all_reduce(flags)
        values = flags.tolist()
        bad = [r for r, flag in enumerate(values[:world]) if flag]
        if probe is not None and not bad and (ratio := pull_ratio(values[world:])) is not None:
            self._pull_fraction.add(self.current_lambda / ratio)
        if auto is not None:
            auto.update(values[world:], skip=bool(bad))
        if self.auto_stop is not None and probe is not None:
            decided = self.auto_stop.stopped_at
            self.auto_stop.update(values[world:], self._iteration, self.stop_iter, skip=bool(bad))
            if decided is None and self.auto_stop.stopped_at is not None:  # logged once, where the log is
                _print_last_rank(f" {self.auto_stop.describe()}")
        return bad

    def finish(self) -> None:
        """Past the stop step: remove hooks, free the teacher (its memory is returned)."""
        if self.finished:
            return
        for alignment in self.alignments:
            alignment.detach_hook()
            alignment.recompute_stash.clear()
        if self._teacher is not None:
            self._teacher.release()
        self._teacher = None
        self._microbatch = None
        self._alignment = None
        self._spread = None
        self.finished = True

    # -- teacher -------------------------------------------------------------------------------
    @property
    def teacher(self) -> HFTeacher:
        """Loaded on first use, so only where it runs (spread: every model-parallel rank given rows; owner:
        the ranks owning layer k), and never after the stop step."""
        if self._teacher is None:
            if self.finished:
                raise RuntimeError("LET teacher requested after the stop step")
            self._teacher = HFTeacher(self.config.teacher, resolve_teacher_dtype(self.config.teacher_dtype),
                                      layer=self.config.teacher_layer)
        return self._teacher

    def teacher_hidden_states(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
        """Teacher states [s, b, h_T] for the full micro-batch.

        With TP > 1 each TP rank runs 1/TP of the micro-batch and the parts are
        all-gathered, so the teacher's cost is not repeated on every TP rank.
        ``attention_mask`` [b, s] (causal-span token alignment) masks right padding.
        """
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if tp_size == 1 or tokens.shape[0] % tp_size:
            with self.work.timed(tokens.shape[0]):
                return self.teacher.hidden_states(tokens, attention_mask)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        local_mask = None if attention_mask is None else attention_mask.chunk(tp_size, dim=0)[tp_rank]
        local_tokens = tokens.chunk(tp_size, dim=0)[tp_rank]
        with self.work.timed(local_tokens.shape[0]):
            local = self.teacher.hidden_states(local_tokens, local_mask)
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=1)

    # -- checkpoint, logging ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of LET: its settings, the resolved stop step and the teacher width (a resume
        needs neither the flags that derived them nor the teacher); --let-lambda auto's EMA and --let-stop
        auto's window as the live dicts (Megatron-LM keeps this state in ``args`` from start-up and pickles it
        at each save)."""
        state = {"config": self.config.to_dict(), "stop_iter": self.stop_iter, "stop_samples": self.stop_samples,
                 "teacher_hidden_size": self.teacher_hidden_size}
        if self.auto_lambda is not None:
            state["auto_lambda"] = self.auto_lambda.state
        if self.auto_stop is not None:
            state["auto_stop"] = self.auto_stop.state
        return state

    def report(self) -> Dict[str, float]:
        """LET scalars since the last report, identical on every rank."""
        groups = ()
        if dist.is_initialized():
            groups = (parallel_state.get_pipeline_model_parallel_group(),
                      parallel_state.get_data_parallel_group())
        scalars = self.metrics.report(self.current_lambda, _device(), groups)
        if (pull_fraction := self._pull_fraction.pop()) is not None:
            scalars["let ratio"] = pull_fraction  # already the same on every rank
        if self.auto_stop is not None:
            scalars.update(self.auto_stop.report())  # "let grad cos", the same on every rank
        return scalars


def _print_last_rank(message: str) -> None:
    """Where both trainers print their log lines (Megatron-LM's print_rank_last)."""
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(message, flush=True)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
