"""The alignment loss on target layer k of one megatron-core GPTModel chunk."""

from __future__ import annotations

from typing import Optional

import weakref

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import make_viewless_tensor

from megatron_let.loss.autoscaler import LETLossAutoScaler, MeasuredLETLossAutoScaler, aux_loss_scale
from megatron_let.loss.parallel import cp_shard, cp_unshard, sp_shard
from megatron_let.loss.probe import GradientProbe
from megatron_let.loss.projector import build_projector, cosine_alignment_terms
from megatron_let.loss.recompute import RecomputeStash, in_checkpointed_forward
from megatron_let.loss.teacher_norm import TeacherFeatureNorm, feature_energy_report


def target_layer_of(model, target_layer: int) -> Optional[torch.nn.Module]:
    """The layer of this model chunk whose output is h_k (``--let-target-layer k``), or None if another chunk
    holds it. The one place that knows which models LET aligns, and what k counts in each:

    - ``GPTModel`` (``TransformerBlock``): k counts transformer blocks, each attention + MLP; h_k is block k's
      output (the residual stream after its MLP).
    - ``HybridModel`` (``HybridStack``): k counts the symbols of ``--hybrid-layer-pattern``, 1-based, over the
      whole model (``|`` pipeline separators and the ``/`` multi-token-prediction part not counted); h_k is
      the output of the k-th symbol's layer. Every HybridStack layer (``*``, ``-``, ``E``, ``M``, ``G``,
      ``D``) adds its result to the residual stream and returns it, so every k names a residual-stream
      state; as in GPT, the last layer's output is taken before the final norm. On a ``*-`` pattern, "after
      GPT block k" is hybrid layer 2k (the k-th ``-``); an odd k is the residual stream between a block's
      attention and its MLP.

    Both stacks number their layers globally (``layer_number``, 1-based, counting the layers of earlier
    pipeline stages), so one rule serves every pipeline layout.
    """
    for layer in model.decoder.layers:
        if layer.layer_number == target_layer:
            return layer
    return None


def describe_target_layer(target_layer: int, hybrid_layer_pattern: Optional[str] = None) -> str:
    """How the start-up line names layer k: ``"layer 3"``, or on a hybrid pattern which symbol it is and,
    where the pattern has one, the GPT block it ends."""
    if not hybrid_layer_pattern:
        return f"layer {target_layer}"
    symbols = hybrid_layer_pattern.split("/")[0].replace("|", "")
    if not 1 <= target_layer <= len(symbols):
        return f"hybrid layer {target_layer} (pattern of {len(symbols)} layers)"
    symbol = symbols[target_layer - 1]
    text = f"hybrid layer {target_layer} of '{hybrid_layer_pattern}' ('{symbol}')"
    if len(symbols) % 2 == 0 and set(symbols[0::2]) == {"*"} and set(symbols[1::2]) <= {"-", "E"}:
        if target_layer % 2 == 0:
            return text + f", the output of GPT block {target_layer // 2}"
        return text + f", between GPT block {target_layer // 2 + 1}'s attention and its MLP"
    return text


class LETAlignment(MegatronModule):
    """Submodule ``let_alignment`` of the chunk owning layer k; its hook adds the LET loss.

    Being a submodule puts a learned projector into the chunk's parameters, so
    DDP, the (distributed) optimizer and ``sharded_state_dict`` treat it like
    any other replicated weight. Under sequence parallelism each TP rank sees
    only its tokens, so projector weights carry ``sequence_parallel`` and their
    gradients are all-reduced over TP like LayerNorm weights.
    """

    def __init__(self, config, let, layer: torch.nn.Module, teacher_size: int):
        super().__init__(config)
        cfg = let.config
        self.projector = build_projector(cfg.projector, config.hidden_size, teacher_size,
                                         cfg.projector_hidden_size, seed=let.seed)
        for param in self.projector.parameters():
            param.sequence_parallel = config.sequence_parallel
        # --let-teacher-norm: its statistics (standardize) are buffers here, so the checkpoint holds them
        self.teacher_norm = TeacherFeatureNorm(cfg.teacher_norm, teacher_size, cfg.teacher_norm_iters)
        self._reported_features = False
        object.__setattr__(self, "_let", let)  # not a submodule: it holds the teacher
        self.recompute_stash = RecomputeStash()  # full recompute: targets from the no-grad run to the re-run
        object.__setattr__(self, "_layer_ref", weakref.ref(layer))  # not a submodule: the layer is the model's
        if not let.finished:
            self._hook = layer.register_forward_hook(self._after_target_layer)
        else:  # resumed past the stop step
            self._hook = layer.register_forward_hook(self._zero_projector_grad) \
                if any(True for _ in self.projector.parameters()) else None

    def detach_hook(self) -> None:
        """After the stop step: the target layer runs exactly as without LET. A learned projector keeps
        getting a zero gradient: megatron-core's DDP with --overlap-grad-reduce launches a bucket's
        reduction only once every parameter in it has a gradient, and asserts otherwise."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            if any(True for _ in self.projector.parameters()):
                self._hook = self._layer_ref().register_forward_hook(self._zero_projector_grad) \
                    if self._layer_ref is not None else None

    def _zero_projector_grad(self, layer, args, output):
        if not torch.is_grad_enabled() or not self.training:
            return output
        hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        zero = sum(p.sum() for p in self.projector.parameters()) * 0.0
        hidden = make_viewless_tensor(LETLossAutoScaler.apply(hidden, zero, torch.ones((), device=hidden.device)),
                                      requires_grad=True, keep_graph=True)
        return (hidden, *rest) if isinstance(output, tuple) else hidden

    def _after_target_layer(self, layer, args, output):
        let = self._let
        if not let.aligning or not self.training:
            return output
        if not torch.is_grad_enabled():
            if in_checkpointed_forward(self.config, self.training):  # full recompute's no-grad first run
                self.recompute_stash.push(self._local_targets())
            return output
        hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        targets = self.recompute_stash.pop()  # not None: this is full recompute's re-run, in backward
        teacher_local, mask_local, teacher_finite = targets if targets is not None else self._local_targets()
        if teacher_local is None:  # standardize's first iteration only measures the teacher
            return output
        group = self._token_group()
        loss_sum, cos_sum = cosine_alignment_terms(hidden, teacher_local, self.projector, mask_local)
        tokens_in_batch = mask_local.sum().to(torch.float32)
        if group is not None:
            totals = torch.stack([loss_sum.detach(), cos_sum, tokens_in_batch])
            dist.all_reduce(totals, group=group)
            global_loss_sum, cos_sum, tokens_in_batch = totals.unbind()
        else:
            global_loss_sum = loss_sum.detach()
        lambda_ = let.current_lambda
        if self.config.calculate_per_token_loss:
            aux_loss = lambda_ * loss_sum  # finalize_model_grads divides by the global token count
        else:
            aux_loss = lambda_ * loss_sum / tokens_in_batch.clamp(min=1)
        if teacher_finite is not None:
            global_loss_sum = torch.where(teacher_finite, global_loss_sum, torch.full_like(global_loss_sum,
                                                                                           float("nan")))
        let.metrics.add(lambda_ * global_loss_sum, cos_sum, tokens_in_batch)
        let.record_loss(global_loss_sum)
        scale = aux_loss_scale(self.config, let.num_microbatches,
                               parallel_state.get_context_parallel_world_size(), hidden.device)
        if let.probe is None:
            injected = LETLossAutoScaler.apply(hidden, aux_loss, scale)
        else:  # --let-lambda auto / --let-stop auto: measure both gradients at this output (megatron_let/loss/probe.py)
            injected = self._measured(hidden, loss_sum, tokens_in_batch, aux_loss, scale, let.probe)
        # viewless, as megatron-core keeps layer outputs: pipeline stages free them after sending
        hidden = make_viewless_tensor(injected, requires_grad=True, keep_graph=True)
        return (hidden, *rest) if isinstance(output, tuple) else hidden

    def _measured(self, hidden, loss_sum, tokens_in_batch, aux_loss, scale, probe: GradientProbe):
        """The autoscaler, plus the probe's two measurements on this rank's part of h_k: the alignment loss's
        gradient at unit weight now (autograd over the projector + cosine graph only; the graph is kept for the
        real backward), and the LM's gradient (and, for --let-stop auto, its dot product with the first) when
        the backward reaches h_k."""
        unit = loss_sum if self.config.calculate_per_token_loss else loss_sum / tokens_in_batch.clamp(min=1)
        (align_grad,) = torch.autograd.grad(unit, hidden, retain_graph=True)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        weight = GradientProbe.contribution(self.config.sequence_parallel, tp_size,
                                            parallel_state.get_tensor_model_parallel_rank())
        # the schedule's factors on g_A, as the LM gradient carries them
        on_lm_grad = probe.measure(align_grad * scale, weight)
        return MeasuredLETLossAutoScaler.apply(hidden, aux_loss, scale, on_lm_grad)

    def _report_features(self, teacher: torch.Tensor, mask: torch.Tensor) -> None:
        """Once, at the start: how much of the teacher's energy sits in its top dimensions."""
        self._reported_features = True
        if (parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_context_parallel_rank() == 0):
            norm = self._let.config.teacher_norm
            print(f" LET teacher features (first micro-batch): {feature_energy_report(teacher, mask)}; "
                  f"--let-teacher-norm {norm}", flush=True)

    def _local_targets(self):
        """This micro-batch's teacher states, loss mask and finiteness flag for this rank, computed once per
        micro-batch (consumes set_microbatch's data); states None: standardize's first iteration only measures."""
        let = self._let
        tokens, loss_mask = let.take_microbatch()
        alignment = let.take_alignment()  # None: exact, or computed in the hook
        teacher_local, mask_local = self._teacher_for_local_hidden(tokens, loss_mask, alignment)
        teacher_finite = None
        if let.config.on_nonfinite == "skip":
            # the step will be skipped: keep NaN/Inf out of the gradients (Megatron-LM's DDP checks them
            # before any optimizer step), and remember the fault for record_loss
            teacher_finite = torch.isfinite(teacher_local).all()
            teacher_local = torch.where(teacher_finite, teacher_local, torch.zeros_like(teacher_local))
        if not self._reported_features:
            self._report_features(teacher_local, mask_local)
        teacher_local = self.teacher_norm(teacher_local, mask_local,
                                          (self._token_group(), parallel_state.get_data_parallel_group()))
        return teacher_local, mask_local, teacher_finite

    def _token_group(self) -> Optional[dist.ProcessGroup]:
        """Ranks holding different tokens of one micro-batch: CP, and TP under sequence parallel."""
        sp = self.config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
        cp = parallel_state.get_context_parallel_world_size() > 1
        if sp and cp:
            return parallel_state.get_tensor_and_context_parallel_group()
        if sp:
            return parallel_state.get_tensor_model_parallel_group()
        if cp:
            return parallel_state.get_context_parallel_group()
        return None

    def _teacher_for_local_hidden(self, tokens: torch.Tensor, loss_mask: torch.Tensor, alignment=None):
        """Teacher states and loss mask ([s_local, b]) matching this rank's target hidden states."""
        cp_size = parallel_state.get_context_parallel_world_size()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        sp = self.config.sequence_parallel and tp_size > 1
        spread = self._let.take_spread()
        if spread is not None:  # spread placement: states computed at the iteration start, already cut
            teacher, valid = spread
            mask = loss_mask.transpose(0, 1)  # CP-local
            if sp:
                mask = sp_shard(mask, tp_size, parallel_state.get_tensor_model_parallel_rank())
            if valid is not None:
                mask = mask * valid.to(device=mask.device, dtype=mask.dtype)
            return teacher, mask
        if cp_size > 1:  # the teacher needs the whole sequence
            parts = [torch.empty_like(tokens) for _ in range(cp_size)]
            dist.all_gather(parts, tokens.contiguous(), group=parallel_state.get_context_parallel_group())
            tokens = cp_unshard(parts, seq_dim=1)
        # [s, b, h_T]; valid [b, s]: positions a causal-span teacher token is aligned to (None: all)
        teacher, valid = self._let.aligned_teacher_hidden_states(tokens, alignment)
        teacher = cp_shard(teacher, cp_size, parallel_state.get_context_parallel_rank(), seq_dim=0)
        mask = loss_mask.transpose(0, 1)
        if valid is not None:  # unaligned positions leave the loss
            valid = cp_shard(valid.transpose(0, 1), cp_size, parallel_state.get_context_parallel_rank(), seq_dim=0)
            mask = mask * valid.to(device=mask.device, dtype=mask.dtype)
        if sp:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            teacher, mask = sp_shard(teacher, tp_size, tp_rank), sp_shard(mask, tp_size, tp_rank)
        return teacher, mask
