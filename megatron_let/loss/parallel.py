"""Pure slicing helpers: where this rank's part of a full-sequence tensor lives.

The teacher always sees the whole sequence; these functions cut its output to
the part of the sequence the target holds on this rank (context parallel
load-balanced chunks, then the sequence-parallel slice).
"""

from typing import List, Sequence

import torch


def cp_chunk_ids(cp_size: int, cp_rank: int) -> List[int]:
    """megatron-core's load-balanced CP layout: 2*cp chunks, rank r holds r and 2*cp-1-r."""
    return [cp_rank, 2 * cp_size - 1 - cp_rank]


def cp_shard(full: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This CP rank's part of ``full`` (same layout as ``get_batch_on_this_cp_rank``)."""
    if cp_size == 1:
        return full
    chunks = full.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[i] for i in cp_chunk_ids(cp_size, cp_rank)], dim=seq_dim)


def cp_unshard(local_parts: Sequence[torch.Tensor], seq_dim: int) -> torch.Tensor:
    """Rebuild the full sequence from every CP rank's part (in CP-rank order)."""
    cp_size = len(local_parts)
    if cp_size == 1:
        return local_parts[0]
    chunks = [None] * (2 * cp_size)
    for rank, part in enumerate(local_parts):
        first, second = part.chunk(2, dim=seq_dim)
        low, high = cp_chunk_ids(cp_size, rank)
        chunks[low], chunks[high] = first, second
    return torch.cat(chunks, dim=seq_dim)


def sp_shard(full: torch.Tensor, tp_size: int, tp_rank: int, seq_dim: int = 0) -> torch.Tensor:
    """This TP rank's slice of a sequence-parallel activation ([s/tp, ...] along ``seq_dim``)."""
    if tp_size == 1:
        return full
    length = full.shape[seq_dim]
    if length % tp_size:
        raise ValueError(f"sequence length {length} is not divisible by tensor parallel size {tp_size}")
    return full.narrow(seq_dim, tp_rank * (length // tp_size), length // tp_size)
