"""Spread placement's pure parts: the row partition, the positions each owner receives, the flag and the
startup line. (The distributed behaviour is in test_parallel_equivalence.py.)"""

import argparse
import math

import pytest
import torch

from megatron_let import LETConfig, LETConfigError, add_let_args, let_config_from_args
from megatron_let.loss.parallel import cp_shard, sp_shard
from megatron_let.loss.placement import describe, expected_share, local_positions, row_partition


@pytest.mark.parametrize("rows,ranks", [(8, 2), (8, 4), (6, 4), (2, 4), (128, 8), (7, 3), (0, 2)])
def test_row_partition_is_contiguous_complete_and_even(rows, ranks):
    blocks = row_partition(rows, ranks)
    assert len(blocks) == ranks and blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, each row exactly once
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1  # no rank does double work
    assert max(sizes) == math.ceil(rows / ranks)


@pytest.mark.parametrize("cp,tp,sp", [(1, 1, False), (1, 2, True), (2, 1, False), (2, 2, True), (2, 4, False)])
def test_local_positions_match_the_hooks_slicing(cp, tp, sp):
    """What the all-to-all delivers is what the owner-placement hook cuts: cp_shard, then sp_shard."""
    seq = 32
    full = torch.arange(seq)
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            expect = cp_shard(full, cp, cp_rank, seq_dim=0)
            if sp and tp > 1:
                expect = sp_shard(expect, tp, tp_rank)
            assert torch.equal(local_positions(seq, cp, cp_rank, tp, tp_rank, sp), expect)


def test_expected_share_matches_the_issue_table():
    assert expected_share("spread", 4, 1, 2, 1) == 1
    assert expected_share("owner", 1, 1, 4, 2) == 4  # PP = P: P x
    assert expected_share("owner", 4, 1, 1, 1) == 4  # TP = T, micro-batch 1: T x
    assert expected_share("owner", 4, 1, 1, 4) == 1  # divisible micro-batch: TP already splits it
    assert expected_share("owner", 4, 1, 2, 1) == 8  # the 7B template
    line = describe("spread", 4, 1, 2, 1, 2 * 2**30)
    assert "spread" in line and "2.00 GiB" in line and "1/8" in line


def test_flag_default_and_bad_value():
    parser = add_let_args(argparse.ArgumentParser())
    args = parser.parse_args(["--let-teacher", "t", "--let-target-layer", "1", "--let-stop-iter", "5"])
    assert let_config_from_args(args).teacher_placement == "spread"
    args = parser.parse_args(["--let-teacher", "t", "--let-target-layer", "1", "--let-stop-iter", "5",
                              "--let-teacher-placement", "owner"])
    assert let_config_from_args(args).teacher_placement == "owner"
    with pytest.raises(LETConfigError, match="--let-teacher-placement"):
        LETConfig(teacher="t", target_layer=1, stop_iter=5, teacher_placement="everywhere").validate()
