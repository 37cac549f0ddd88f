"""Defect 9 (issue 20): the sync-free THD RoPE equals megatron-core's own, bit for bit.

Reference: megatron's ``rope_utils._apply_rotary_pos_emb_thd`` (kept aside before ``install``),
on packed documents in the per-document zigzag layout at CP 1 / 2 / 4, every rank, both of its
frequency layouts. What it cannot prove: that no sync remains on a GPU (the code reads no device
value on the host; untested on GPU).
"""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_longctx.model import rope_thd
from megatron_longctx.parallel.cp_split import rank_token_index
from megatron_longctx.testing.distributed import FakeGroup

MEGATRON_THD = rope_thd.ORIGINAL or rope_utils._apply_rotary_pos_emb_thd
assert MEGATRON_THD.__module__ == "megatron.core.models.common.embeddings.rope_utils"


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("whole_batch_freqs", [False, True])
def test_matches_megatron(cp, whole_batch_freqs):
    g = torch.Generator().manual_seed(cp)
    lengths = [8 * cp * int(n) for n in torch.randint(1, 6, (7,), generator=g)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, d = int(cu[-1]), 16
    n_freqs = total if whole_batch_freqs else max(lengths)
    freqs = torch.randn(n_freqs, 1, 1, d, generator=g)
    for rank in range(cp):
        t = torch.randn(total // cp, 3, d, generator=g)
        want = MEGATRON_THD(t, cu, freqs, cp_group=FakeGroup(cp, rank))
        got = rope_thd.apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=FakeGroup(cp, rank))
        assert torch.equal(got, want)


def test_positions_follow_cp_split():
    """The positions are those of parallel/cp_split.py's zigzag within documents."""
    cu = torch.tensor([0, 16, 48, 56])
    for rank in range(4):
        doc, pos = rope_thd.local_positions(cu, 14, 4, rank)
        index = rank_token_index(cu.tolist(), 4, rank)
        assert torch.equal(cu[doc] + pos, index)


def test_install_routes_megatron(monkeypatch):
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_thd", MEGATRON_THD)
    monkeypatch.setattr(rope_thd, "_INSTALLED", False)
    rope_thd.install()
    assert rope_utils._apply_rotary_pos_emb_thd is rope_thd.apply_rotary_pos_emb_thd
