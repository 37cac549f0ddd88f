"""Zigzag units (parallel/units.py) through padding, split, merge, ring blocks and the work model.

* pad + split with grouped units covers every token once and ``cp_merge`` reassembles the batch
  (CP 1, 2, 4, 8), each document's tokens sit unchanged in its ``doc_spans`` interval;
* the ring's blocks over all (rank, step) pairs compute exactly the allowed (query, key) pairs of
  the definition (same document, key <= query, both real), each once, when units hold many
  documents;
* ``work_per_rank`` equals a brute-force count over the tokens each rank holds;
* the adaptive rule beats per-document zigzag on short-only samples, with padding <= 0.5%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.parallel.cp_split import (
    cp_merge,
    cp_split,
    pad_documents_for_cp,
    rank_token_index,
)
from megatron_longctx.parallel.units import (
    PAD_FIRST,
    imbalance,
    padding_tokens,
    plan_units,
    work_per_rank,
)
from megatron_longctx.testing.attention_cases import ring_pairs

LENGTHS = [5, 1, 17, 8, 2, 40, 3]


def _batch(lengths) -> dict:
    s = sum(lengths)
    tokens = torch.arange(1, s + 1).unsqueeze(0)  # token identity
    return dict(
        tokens=tokens,
        labels=tokens + 1000,
        loss_mask=torch.ones(1, s),
        position_ids=torch.arange(s).unsqueeze(0),
        cu_seqlens=torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32),
    )


@pytest.mark.parametrize("sharding", ["adaptive", "sequence"])
@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_units_cover_every_token_once_and_merge_inverts(cp, sharding):
    batch = _batch(LENGTHS)
    padded = pad_documents_for_cp(batch, cp, sharding=sharding)
    cu = padded["cu_seqlens"].tolist()
    assert all((b - a) % (2 * cp) == 0 for a, b in zip(cu, cu[1:]))
    spans = padded["doc_spans"].tolist()
    order = padded["doc_order"].tolist()
    assert sorted(order) == list(range(len(LENGTHS)))
    if sharding == "adaptive":  # shortest first inside every unit (a long one last)
        unit_of = np.searchsorted(padded["cu_seqlens"].numpy(), [a for a, _ in spans], "right")
        for u in set(unit_of.tolist()):
            docs = [LENGTHS[d] for d, w in zip(order, unit_of) if w == u]
            assert docs == sorted(docs)
    starts = np.cumsum([0] + LENGTHS)
    for (a, b), d in zip(spans, order):  # every document whole and unchanged, with its labels
        s0, n = starts[d], LENGTHS[d]
        assert b - a == n
        assert padded["tokens"][0, a:b].tolist() == list(range(s0 + 1, s0 + n + 1))
        assert padded["labels"][0, a:b].tolist() == list(range(s0 + 1001, s0 + n + 1001))
    assert padded["loss_mask"].sum() == sum(LENGTHS)
    ends = {b for _, b in spans}
    starts_ = {a for a, _ in spans}
    for a, b in zip(cu, cu[1:]):  # adaptive pads each unit at its start, the others at its end
        assert (b in ends) if sharding == "adaptive" else (a in starts_)
    if sharding == "sequence":
        assert len(cu) == 2 and cu[1] - sum(LENGTHS) < 2 * cp
    shards = [cp_split(padded, cp, r) for r in range(cp)]
    seen = torch.cat([sh["tokens"].flatten() for sh in shards])
    assert sorted(t for t in seen.tolist() if t) == list(range(1, sum(LENGTHS) + 1))
    merged = cp_merge(shards)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "doc_spans"):
        assert torch.equal(merged[key], padded[key]), key


def _layout_by_hand(groups, cp, pad_first=False):
    """Units of real lengths grouped by hand; documents back to back, padding at unit ends (or
    starts)."""
    cu_p, cu_r, starts, ends = [0], [0], [], []
    for group in groups:
        pos = cu_p[-1] + ((-sum(group)) % (2 * cp) if pad_first else 0)
        for n in group:
            starts.append(pos)
            ends.append(pos + n)
            pos += n
        cu_p.append(cu_p[-1] + sum(group) + (-sum(group)) % (2 * cp))
        cu_r.append(cu_r[-1] + sum(group))
    return cu_p, cu_r, (starts, ends)


@pytest.mark.parametrize("pad_first", [False, True])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ring_blocks_with_grouped_units_cover_exactly_the_allowed_pairs(cp, pad_first):
    groups = [[3, 1, 2 * cp + 3, 4], [12 * cp], [1], [7, 5 * cp + 1, 2]]
    cu_p, cu_r, (starts, ends) = _layout_by_hand(groups, cp, pad_first)
    want = {
        (a + i, a + j) for a, b in zip(starts, ends) for i in range(b - a) for j in range(i + 1)
    }
    layout = CPLayout(cu_p, cu_r, cp, (starts, ends))
    got = ring_pairs(layout, cu_p, cp)
    assert len(got) == len(set(got)), "a pair is computed twice"
    assert set(got) == want
    doc_block = layout.document_block()
    assert doc_block.allowed_pairs() == len(want)


def test_layout_refuses_documents_outside_their_unit():
    with pytest.raises(ValueError, match="inside one unit"):
        CPLayout([0, 8, 16], [0, 6, 14], 2, ([0, 6], [6, 14]))  # second document crosses 8


@pytest.mark.parametrize("pad_first", [False, True])
@pytest.mark.parametrize("cp", [2, 4])
def test_work_per_rank_matches_brute_force(cp, pad_first):
    rng = np.random.default_rng(cp)
    lengths = rng.integers(1, 30, size=12)
    linear = 5.0
    for scheme in ("adaptive", "document", "sequence"):
        order, unit = plan_units(lengths, cp, scheme, linear=linear)
        assert sorted(order.tolist()) == list(range(lengths.size))
        lengths = lengths[order]
        groups = [lengths[unit == u].tolist() for u in range(unit.max() + 1)]
        cu_p, _, (starts, ends) = _layout_by_hand(groups, cp, pad_first)
        pos_of = {}  # global padded position -> position inside its document
        for a, b in zip(starts, ends):
            pos_of.update({a + i: i for i in range(b - a)})
        want = [
            sum(
                pos_of[t] + 1 + linear
                for t in rank_token_index(cu_p, cp, r).tolist()
                if t in pos_of
            )
            for r in range(cp)
        ]
        np.testing.assert_allclose(work_per_rank(lengths, unit, cp, linear, pad_first), want)
        assert padding_tokens(lengths, unit, cp) == cu_p[-1] - lengths.sum()


def test_adaptive_beats_per_document_on_short_documents():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.7, 1.0, size=400), 16, 4096).astype(int)
    cp = 16
    results = {}
    for scheme in ("document", "sequence", "adaptive"):
        order, unit = plan_units(lengths, cp, scheme)
        pad_first = PAD_FIRST[scheme]
        results[scheme] = imbalance(work_per_rank(lengths[order], unit, cp, pad_first=pad_first))
    assert results["adaptive"] < min(results["document"], results["sequence"])
    assert results["adaptive"] < 1.02, results
    assert padding_tokens(lengths[order], unit, cp) <= 0.005 * lengths.sum()


def test_residue_subset_finds_a_fitting_subset_whenever_one_exists():
    import itertools

    from megatron_longctx.parallel.units import _residue_subset

    rng = np.random.default_rng(11)
    for _ in range(100):
        lengths = rng.integers(1, 120, size=7)
        m, need = 16, int(rng.integers(1, 16))
        got = _residue_subset(lengths, list(range(7)), need, m)
        exists = any(
            lengths[list(c)].sum() % m == need
            for k in range(1, 8)
            for c in itertools.combinations(range(7), k)
        )
        assert (got != []) == exists
        if got:
            assert len(set(got)) == len(got) and lengths[got].sum() % m == need


@pytest.mark.parametrize("cp", [4, 8])
def test_long_units_filled_by_short_documents_need_no_padding(cp):
    """A long document led by the short ones that make its unit a multiple of 2 x CP: no padding
    anywhere, every token covered once, and the brute-force work count agrees."""
    m = 2 * cp
    lengths = [7 * m + 3, 2 * m - 3, 5, 3 * m - 5, 9 * m + 1, 2 * m - 1]  # short ones fill
    order, unit = plan_units(lengths, cp, "adaptive", linear=0.0)
    ordered = np.asarray(lengths)[order]
    assert padding_tokens(ordered, unit, cp) == 0
    assert unit.max() >= 1 and sorted(order.tolist()) == list(range(len(lengths)))
    padded = pad_documents_for_cp(_batch(lengths), cp, sharding="adaptive")
    assert padded["tokens"].shape[1] == sum(lengths)
    shards = [cp_split(padded, cp, r) for r in range(cp)]
    seen = torch.cat([sh["tokens"].flatten() for sh in shards]).tolist()
    assert sorted(seen) == list(range(1, sum(lengths) + 1))
    merged = cp_merge(shards)
    assert torch.equal(merged["tokens"], padded["tokens"])
