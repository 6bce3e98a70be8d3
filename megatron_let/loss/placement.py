"""Spread placement: the teacher's work for one iteration divided over the replica's model-parallel group.

Under ``--let-teacher-placement owner`` only the ranks that own ``--let-target-layer`` run the teacher, so
its cost on them grows with PP (and with TP when the micro-batch does not divide by TP, and with CP).
``spread`` (the default) instead, at the start of each iteration and outside the pipeline schedule:

1. every rank of the data-parallel replica's model-parallel group (TP x CP x PP ranks) holds the
   iteration's full-sequence tokens (all micro-batches, ``rows = micro-batches x micro-batch size``);
2. rank ``r`` of the group runs the teacher on its contiguous block of whole sequences,
   ``row_partition(rows, group)[r]`` (the teacher is causal: it needs whole sequences);
3. one ``all_to_all`` over the group sends each owner of layer k exactly the positions it holds (its CP
   chunks in megatron's load-balanced layout, then its SP slice) of every row; ranks that do not own
   layer k receive nothing;
4. the hook on layer k reads micro-batch i's states from the result instead of running the teacher.

Collectives stay out of the schedule's forward step (inside it they deadlock a pipeline: stage 1 waits
to receive while stage 0 waits in the collective). Everything here is a pure function of the tokens, so
losses and gradients equal the single-process ones.
"""

from __future__ import annotations

import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_REPLICA_GROUP = None  # built once with CP > 1


def row_partition(num_rows: int, group_size: int) -> List[Tuple[int, int]]:
    """Contiguous [start, stop) row blocks, one per rank: sizes differ by at most one (no rank does double
    work), the first ``num_rows % group_size`` ranks take the one extra row."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    base, extra = divmod(num_rows, group_size)
    blocks, start = [], 0
    for rank in range(group_size):
        stop = start + base + (1 if rank < extra else 0)
        blocks.append((start, stop))
        start = stop
    return blocks


def local_positions(seq_length: int, cp_size: int, cp_rank: int, tp_size: int, tp_rank: int,
                    sequence_parallel: bool) -> torch.Tensor:
    """Sequence positions one rank's layer-k activations hold: its CP chunks, then its SP slice."""
    from megatron_let.loss.parallel import cp_shard, sp_shard

    positions = cp_shard(torch.arange(seq_length), cp_size, cp_rank, seq_dim=0)
    if sequence_parallel and tp_size > 1:
        positions = sp_shard(positions, tp_size, tp_rank)
    return positions


class RankRole(NamedTuple):
    """What the other ranks of the group must know about one rank (exchanged once)."""

    owns_target_layer: bool
    cp_rank: int
    tp_rank: int


class SpreadStates:
    """This rank's teacher states for the iteration's micro-batches, already cut to its positions."""

    def __init__(self, states: List[torch.Tensor], valid: List[Optional[torch.Tensor]]):
        self._states, self._valid, self._next = states, valid, 0

    def take(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Micro-batch i's ([s_local, b, h_T] states, [s_local, b] valid or None), in forward order."""
        if self._next >= len(self._states):
            raise RuntimeError(f"LET spread placement: the target layer ran more than the {len(self._states)} "
                               "micro-batches whose teacher states were computed at the iteration start.")
        i, self._next = self._next, self._next + 1
        return self._states[i], self._valid[i]


def replica_group(cp_size: int):
    """The data-parallel replica's model-parallel group: TP x CP x PP ranks (megatron-core's model-parallel
    group is TP x PP; with CP the group of ranks sharing a data-parallel rank is built here, on every rank)."""
    from megatron.core import parallel_state

    global _REPLICA_GROUP
    if cp_size == 1:
        return parallel_state.get_model_parallel_group()
    if _REPLICA_GROUP is not None:
        return _REPLICA_GROUP
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=False)
    ranks_dp = [None] * dist.get_world_size()
    dist.all_gather_object(ranks_dp, dp_rank)
    mine = None
    for value in sorted(set(ranks_dp)):  # every rank creates every group, in the same order
        group = dist.new_group([r for r, v in enumerate(ranks_dp) if v == value])
        if value == dp_rank:
            mine = group
    _REPLICA_GROUP = mine
    return mine


class SpreadPlacement:
    """Per-process spread logic: who computes which rows, who receives what (one instance per run)."""

    def __init__(self, owns_target_layer: bool, sequence_parallel: bool):
        from megatron.core import parallel_state as ps

        self.tp_size, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.cp_size, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.sequence_parallel = sequence_parallel
        self.group = replica_group(self.cp_size) if dist.is_initialized() else None
        self.size = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        mine = RankRole(owns_target_layer, self.cp_rank, self.tp_rank)
        roles = [mine]
        if self.size > 1:
            roles = [None] * self.size
            dist.all_gather_object(roles, tuple(mine), group=self.group)
            roles = [RankRole(*role) for role in roles]
        self.roles = roles

    def positions(self, role: RankRole, seq_length: int) -> Optional[torch.Tensor]:
        if not role.owns_target_layer:
            return None
        return local_positions(seq_length, self.cp_size, role.cp_rank, self.tp_size, role.tp_rank,
                               self.sequence_parallel)

    def compute(self, tokens: torch.Tensor, micro_batch_size: int,
                teacher_rows: Callable[[torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]
                ) -> SpreadStates:
        """``tokens`` [rows, s]: the iteration's full-sequence tokens, micro-batch after micro-batch (the
        same on every rank of the group). ``teacher_rows(tokens [n, s])`` -> (states [n, s, h] at the
        target's positions, valid [n, s] bool or None). Returns this rank's states per micro-batch."""
        rows, seq = tokens.shape
        start, stop = row_partition(rows, self.size)[self.rank]
        states, valid = teacher_rows(tokens[start:stop])  # [n, s, h], [n, s] | None
        payload = states if valid is None else torch.cat([states, valid.unsqueeze(-1).to(states.device, states.dtype)], -1)
        features = payload.shape[-1]
        blocks = row_partition(rows, self.size)
        my_positions = self.positions(self.roles[self.rank], seq)
        if self.size == 1:
            received = payload[:, my_positions.to(payload.device)] if my_positions is not None else None
        else:
            sends, send_sizes = [], []
            for role in self.roles:
                positions = self.positions(role, seq)
                part = payload[:, positions.to(payload.device)] if positions is not None \
                    else payload.new_empty(0, 0, features)
                sends.append(part.reshape(-1, features))
                send_sizes.append(sends[-1].shape[0])
            length = 0 if my_positions is None else len(my_positions)
            recv_sizes = [(b - a) * length for a, b in blocks]
            out = payload.new_empty(sum(recv_sizes), features)
            dist.all_to_all_single(out, torch.cat(sends).contiguous(), recv_sizes, send_sizes, group=self.group)
            received = out.view(rows, length, features) if length else None
        if received is None:  # this rank does not own layer k: nothing to keep
            return SpreadStates([], [])
        per_mb_states, per_mb_valid = [], []
        for first in range(0, rows, micro_batch_size):
            part = received[first:first + micro_batch_size].transpose(0, 1)  # [s_local, b, F]
            if valid is None:
                per_mb_states.append(part.contiguous())
                per_mb_valid.append(None)
            else:
                per_mb_states.append(part[..., :-1].contiguous())
                per_mb_valid.append(part[..., -1] > 0.5)
        return SpreadStates(per_mb_states, per_mb_valid)


class TeacherWork:
    """Rows (sequences) and seconds of teacher forward this rank ran, per iteration (tests, benchmark).
    Seconds are exact on GPU only with ``synchronize`` (a device sync per teacher call: benchmarks only)."""

    def __init__(self, synchronize: bool = False):
        self.rows, self.seconds, self.synchronize = 0, 0.0, synchronize

    def reset(self) -> None:
        self.rows, self.seconds = 0, 0.0

    def timed(self, rows: int):
        work = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                if work.synchronize and torch.cuda.is_available():
                    torch.cuda.synchronize()
                work.rows += rows
                work.seconds += time.perf_counter() - self.start

        return _Timer()


def expected_share(placement: str, tp: int, cp: int, pp: int, micro_batch_size: int) -> float:
    """Teacher work on the busiest rank of a replica, in units of an even share (1 = the floor)."""
    if placement == "spread":
        return 1.0
    per_owner = 1.0 if micro_batch_size % tp == 0 else float(tp)  # today: TP splits only divisible batches
    return pp * per_owner * cp


def describe(placement: str, tp: int, cp: int, pp: int, micro_batch_size: int,
             teacher_bytes: Optional[int]) -> str:
    """The startup log line: the choice, teacher memory per rank, expected share of work per rank."""
    group = tp * cp * pp
    memory = "? (not a safetensors teacher)" if teacher_bytes is None else \
        f"{teacher_bytes / 2**30:.2f} GiB" if teacher_bytes >= 2**30 else f"{teacher_bytes / 2**20:.1f} MiB"
    share = expected_share(placement, tp, cp, pp, micro_batch_size)
    if placement == "spread":
        where = f"teacher weights {memory} on each of the {group} ranks of a replica's model-parallel group"
        work = f"each rank runs 1/{group} of the iteration's sequences"
    else:
        where = f"teacher weights {memory} on the {tp * cp} ranks of --let-target-layer's stage only"
        work = "the other stages run none"
    return (f" LET teacher placement {placement}: {where}; {work}; busiest rank {share:g}x an even share "
            f"(TP{tp} x CP{cp} x PP{pp}, micro-batch {micro_batch_size})")


def gather_counts(value: float, group=None, device=None) -> Sequence[float]:
    """``value`` from every rank of ``group`` (a small all-gather for reporting)."""
    if not dist.is_initialized():
        return [value]
    size = dist.get_world_size(group)
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device), group=group)
    return [t.item() for t in out]


def teacher_weight_bytes(directory: str, dtype: torch.dtype) -> Optional[int]:
    """The teacher's weights in ``dtype`` as loaded (base model, no LM head), from safetensors headers
    (no tensor is read); None when unknown (GGUF, *.bin)."""
    import os

    from safetensors import safe_open

    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    if not files:
        return None
    count = 0
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as handle:
            for key in handle.keys():
                if not key.startswith("lm_head"):
                    shape = handle.get_slice(key).get_shape()
                    count += int(torch.Size(shape).numel())
    return count * torch.empty((), dtype=dtype).element_size()
