"""The one zigzag rule (parallel/zigzag.py) against a hand enumeration, and its callers agreeing."""

import numpy as np
import pytest
import torch

from megatron_longctx.parallel.cp_split import rank_token_index, rank_token_layout
from megatron_longctx.parallel.zigzag import (
    balanced_chunk_sizes,
    chunk_owner,
    padding_to_zigzag,
    rank_chunks,
    rank_totals,
)


def test_rank_chunks_by_hand():
    assert [rank_chunks(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert rank_chunks(1, 0) == (0, 1)
    assert padding_to_zigzag([5, 8, 0, 9], 2).tolist() == [3, 0, 0, 3]


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_every_chunk_has_exactly_one_owner(cp):
    owners = chunk_owner(np.arange(2 * cp), cp)
    for r in range(cp):
        assert sorted(int(j) for j in np.flatnonzero(owners == r)) == sorted(rank_chunks(cp, r))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_and_layout_follow_the_rule(cp):
    cu = [0, 8 * cp, 12 * cp]  # two units, chunk sizes 4 and 2
    for r in range(cp):
        index = rank_token_index(cu, cp, r)
        layout = rank_token_layout(cu, cu, cp, r)
        expect = []
        for start, end in zip(cu, cu[1:]):
            c = (end - start) // (2 * cp)
            for j in rank_chunks(cp, r):
                expect += list(range(start + j * c, start + (j + 1) * c))
        assert index.tolist() == expect
        assert torch.equal(torch.tensor(cu)[layout.doc] + layout.pos, index)


def test_balanced_chunk_sizes_by_hand():
    # CP 2, 2 CP = 4 chunks. Unit 0 (9 tokens): 2 each + 1 leftover (g 0: rank 0, lap 0 -> its
    # early chunk 0). Unit 1 (7): 1 each + 3 leftovers g 1, 2, 3: rank 1 early (chunk 1), rank 0
    # late (lap 1: chunk 3), rank 1 late (chunk 2). Unit 2 (2): g 4, 5: lap 2 -> early chunks.
    sizes = balanced_chunk_sizes([9, 7, 2], 2)
    assert sizes.tolist() == [[3, 2, 2, 2], [1, 2, 2, 2], [1, 1, 0, 0]]
    assert rank_totals(sizes, 2).tolist() == [9, 9]  # rank 0: chunks 0 and 3, rank 1: 1 and 2


@pytest.mark.parametrize("cp", [2, 3, 8, 32])
def test_balanced_chunks_keep_every_rank_within_one_token(cp):
    lengths = np.random.default_rng(cp).integers(1, 300, size=50)
    sizes = balanced_chunk_sizes(lengths, cp)
    assert (sizes.sum(1) == lengths).all()
    assert (sizes.max(1) - sizes.min(1) <= 1).all()  # floor / ceil inside every unit
    totals = rank_totals(sizes, cp)
    assert totals.sum() == lengths.sum() and totals.max() - totals.min() <= 1
