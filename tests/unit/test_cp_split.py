"""CP split: coverage, inverse, agreement with megatron's zigzag rules, padding, balance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longctx.parallel.balance import attention_work_per_rank, imbalance
from megatron_longctx.parallel.cp_split import (
    CPSplitError,
    cp_merge,
    cp_split,
    packed_seq_params_for_rank,
    pad_documents_for_cp,
    rank_token_layout,
)

LENGTHS = [5, 1, 17, 8, 2]


def _batch(lengths=LENGTHS, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    return dict(
        tokens=torch.randint(1, 100, (1, s), generator=g),
        labels=torch.randint(1, 100, (1, s), generator=g),
        loss_mask=torch.ones(1, s),
        position_ids=torch.arange(s).unsqueeze(0),
        cu_seqlens=torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32),
    )


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_covers_every_token_once_and_merge_inverts(cp):
    padded = pad_documents_for_cp(_batch(), cp, pad_to=None)
    s = padded["tokens"].shape[1]
    marked = dict(padded, position_ids=torch.arange(s).unsqueeze(0))  # token identity
    shards = [cp_split(marked, cp, r) for r in range(cp)]
    seen = torch.cat([sh["position_ids"].flatten() for sh in shards])
    assert sorted(seen.tolist()) == list(range(s))
    assert all(sh["tokens"].shape[1] == s // cp for sh in shards)
    merged = cp_merge(shards)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
        assert torch.equal(merged[key], marked[key]), key
    for rank, sh in enumerate(shards):
        assert torch.equal(sh["cu_seqlens_local"], padded["cu_seqlens"] // cp)
        lay = rank_token_layout(sh["cu_seqlens"], sh["cu_seqlens_unpadded"], cp, rank)
        assert torch.equal(lay.valid.float(), sh["loss_mask"].flatten())


@pytest.mark.parametrize("cp", [2, 4])
def test_pad_documents_for_cp(cp):
    batch = _batch()
    padded = pad_documents_for_cp(batch, cp, pad_to=96)
    cu, real = padded["cu_seqlens"].tolist(), padded["cu_seqlens_unpadded"].tolist()
    assert cu[-1] == 96 and real[-1] == sum(LENGTHS)
    assert all((b - a) % (2 * cp) == 0 for a, b in zip(cu, cu[1:]))
    assert padded["loss_mask"].sum() == sum(LENGTHS)
    for i, n in enumerate(LENGTHS):  # real tokens first in each document, unchanged
        start = cu[i]
        assert torch.equal(
            padded["tokens"][0, start : start + n], batch["tokens"][0, real[i] : real[i] + n]
        )
        assert padded["loss_mask"][0, start + n : cu[i + 1]].sum() == 0
    with pytest.raises(CPSplitError, match=r"pad_to 40: padded documents take \d+ tokens"):
        pad_documents_for_cp(batch, cp, pad_to=40)


def test_split_rejects_unpadded_documents_with_numbers():
    with pytest.raises(
        CPSplitError,
        match=r"unit 0: padded length 5 is not divisible by "
        r"2 x CP = 4",
    ):
        cp_split(_batch(), 2, 0)
    balanced = pad_documents_for_cp(_batch(), 2, sharding="balanced")
    wrong = dict(balanced, cp_chunks=balanced["cp_chunks"].flip(1))  # chunks out of order
    with pytest.raises(CPSplitError, match="cp_chunks must cut every unit"):
        cp_split(wrong, 2, 0)
    with pytest.raises(CPSplitError, match="chunks made for another CP size"):
        cp_split(balanced, 4, 0)
    with pytest.raises(CPSplitError, match=r"cp_rank 2 is not in \[0, CP = 2\)"):
        cp_split(pad_documents_for_cp(_batch(), 2), 2, 2)


@pytest.mark.parametrize("cp", [2, 4])
def test_positions_match_megatron_thd_rope_slices(cp):
    """Our per-rank positions are exactly the RoPE rows megatron's THD path picks for the rank."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    padded = pad_documents_for_cp(_batch(), cp, pad_to=96)
    cu = padded["cu_seqlens"].tolist()
    freqs = torch.arange(max(b - a for a, b in zip(cu, cu[1:])))
    for rank in range(cp):
        lay = rank_token_layout(padded["cu_seqlens"], padded["cu_seqlens_unpadded"], cp, rank)
        expected = torch.cat(
            [
                _get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty((b - a) // cp), freqs)
                for a, b in zip(cu, cu[1:])
            ]
        )
        assert torch.equal(lay.pos, expected)


@pytest.mark.parametrize("cp", [2, 4])
def test_rowwise_split_matches_megatron_get_batch_on_this_cp_rank(cp, monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    class _Group:  # only size()/rank() are read
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return cp

        def rank(self):
            return self._rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    g = torch.Generator().manual_seed(1)
    batch = dict(
        tokens=torch.randint(0, 9, (3, 8 * cp), generator=g),
        loss_mask=torch.rand(3, 8 * cp, generator=g),
    )
    for rank in range(cp):
        ours = cp_split(batch, cp, rank)
        theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=_Group(rank))
        assert torch.equal(ours["tokens"], theirs["tokens"])
        assert torch.equal(ours["loss_mask"], theirs["loss_mask"])


def test_packed_seq_params_for_rank():
    local = cp_split(pad_documents_for_cp(_batch(), 2), 2, 1)
    psp = packed_seq_params_for_rank(local)
    assert psp.qkv_format == "thd"
    assert torch.equal(psp.cu_seqlens_q_padded, local["cu_seqlens"])
    assert psp.cu_seqlens_q[-1] == sum(LENGTHS)
    assert psp.max_seqlen_q == 20 and psp.cu_seqlens_q.dtype == torch.int32


@pytest.mark.parametrize("scheme", ["document_zigzag", "sequence_zigzag"])
def test_attention_work_matches_brute_force_count(scheme):
    lengths, cp = [7, 3, 12, 1], 2
    work = attention_work_per_rank(lengths, cp, scheme)
    doc = np.repeat(np.arange(4), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    assert work.sum() == allowed.sum()
    if scheme == "document_zigzag":  # exact per rank, from the split itself
        padded = pad_documents_for_cp(_batch(lengths), cp)
        for rank in range(cp):
            lay = rank_token_layout(padded["cu_seqlens"], padded["cu_seqlens_unpadded"], cp, rank)
            assert work[rank] == float(((lay.pos + 1) * lay.valid).sum())


def test_document_zigzag_balances_many_documents():
    rng = np.random.default_rng(0)
    lengths = [16384] + rng.integers(100, 3000, 60).tolist()
    assert imbalance(attention_work_per_rank(lengths, 8, "document_zigzag")) < 1.05
    assert imbalance(attention_work_per_rank(lengths, 8, "sequence_zigzag")) > 1.5
