"""The one zigzag rule (parallel/zigzag.py) against a hand enumeration, and its callers agreeing."""

import numpy as np
import pytest
import torch

from megatron_longctx.parallel.cp_split import rank_token_index, rank_token_layout
from megatron_longctx.parallel.zigzag import chunk_owner, padding_to_zigzag, rank_chunks


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
