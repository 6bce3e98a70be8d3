"""LateToEarlyTraining: the per-process LET state shared by the model chunks and the trainer."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_let.alignment import LETAlignment
from megatron_let.config import LETConfig
from megatron_let.metrics import LETMetrics
from megatron_let.schedule import let_lambda
from megatron_let.teachers.huggingface import HFTeacher, resolve_teacher_dtype, teacher_hidden_size


class LateToEarlyTraining:
    """Owns the schedule, the teacher (only where layer k lives) and the metrics.

    Life cycle, driven by the trainer:
      ``attach(chunk)`` for every model chunk, before DDP and the optimizer;
      per iteration ``begin_iteration(it, num_microbatches)``; per micro-batch
      ``set_microbatch(tokens, loss_mask)`` just before the chunk's forward;
      ``report()`` at log time. Once lambda reaches 0 the hooks are removed
      and the teacher released: the rest of training runs as without LET.
    """

    def __init__(self, config: LETConfig, train_iters: Optional[int] = None, seed: int = 1234,
                 teacher_hidden_size: Optional[int] = None, target_tokenizer=None, eod_id: Optional[int] = None):
        self.config = config
        self.target_tokenizer, self.eod_id = target_tokenizer, eod_id
        self._aligner = None
        self._alignment = None
        self._teacher_hidden_size = teacher_hidden_size
        self.stop_iter = config.resolve_stop_iter(train_iters)
        self.seed = seed
        self.metrics = LETMetrics()
        self.alignments: List[LETAlignment] = []
        self.current_lambda = 0.0
        self.num_microbatches = 1
        self.finished = False
        self._teacher: Optional[HFTeacher] = None
        self._microbatch = None
        self._nonfinite = False

    # -- model ---------------------------------------------------------------------------------
    def attach(self, model) -> bool:
        """Add the alignment to a GPTModel chunk if it owns the target layer; True if it does."""
        for layer in model.decoder.layers:
            if layer.layer_number == self.config.target_layer:
                alignment = LETAlignment(model.config, self, layer, self.teacher_hidden_size)
                model.let_alignment = alignment
                self.alignments.append(alignment)
                return True
        return False

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
        for alignment in self.alignments:
            alignment.recompute_stash.check_drained()
        self.current_lambda = let_lambda(iteration, self.config.lambda0, self.stop_iter,
                                         self.config.schedule)
        if self.current_lambda == 0.0 and iteration >= self.stop_iter:
            self.finish()
        return self.current_lambda

    def set_microbatch(self, tokens: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor],
                       alignment=None) -> None:
        """Tokens [b, s] and loss mask [b, s] exactly as this rank feeds them to the model (CP-local).

        ``alignment``: the micro-batch's causal-span TokenAlignment (full sequence), or a Future of one being
        computed in the background, if any.
        """
        self._microbatch = (tokens, loss_mask)
        self._alignment = alignment

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
        if self.config.token_alignment != "causal-span":
            return None
        if self._aligner is None:
            from megatron_let.teachers.huggingface import resolve_teacher
            from megatron_let.teachers.token_alignment import build_aligner, teacher_max_positions

            if self.eod_id is None:
                raise RuntimeError("LET causal-span alignment needs the target's EOD id (LateToEarlyTraining("
                                   "..., target_tokenizer=..., eod_id=...)).")
            source = resolve_teacher(self.config.teacher)
            self._aligner = build_aligner(self.target_tokenizer, self.config.teacher_tokenizer or source.directory,
                                          self.eod_id, teacher_max_positions(source.config()))
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
        """Ranks whose alignment loss was NaN/Inf this iteration (a collective over all ranks)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        flags = torch.zeros(world, device=_device())
        if self._nonfinite is not False:
            flags[rank] = self._nonfinite.float().to(flags.device)
        self._nonfinite = False
        if world > 1:
            dist.all_reduce(flags)
        return [r for r, flag in enumerate(flags.tolist()) if flag]

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
        self.finished = True

    # -- teacher -------------------------------------------------------------------------------
    @property
    def teacher(self) -> HFTeacher:
        """Loaded on first use, so only ranks that own layer k, and only before the stop step."""
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
            return self.teacher.hidden_states(tokens, attention_mask)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        local_mask = None if attention_mask is None else attention_mask.chunk(tp_size, dim=0)[tp_rank]
        local = self.teacher.hidden_states(tokens.chunk(tp_size, dim=0)[tp_rank], local_mask)
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=1)

    # -- logging -------------------------------------------------------------------------------
    def report(self) -> Dict[str, float]:
        """LET scalars since the last report, identical on every rank."""
        groups = ()
        if dist.is_initialized():
            groups = (parallel_state.get_pipeline_model_parallel_group(),
                      parallel_state.get_data_parallel_group())
        return self.metrics.report(self.current_lambda, _device(), groups)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
