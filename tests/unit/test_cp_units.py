"""CP units and chunks (parallel/units.py) through layout, split, merge, ring blocks and RoPE.

* layout + split cover every token once and ``cp_merge`` reassembles the batch (CP 1, 2, 4, 8)
  for every sharding; each document's tokens sit unchanged in its ``doc_spans`` interval;
  "balanced" pads nothing but a tail of < CP tokens and gives every rank the same count;
* the ring's blocks over all (rank, step) pairs compute exactly the allowed (query, key) pairs of
  the definition (same document, key <= query, both real), each once, for grouped units with
  equal chunks and for unequal ("balanced") chunks;
* the THD RoPE positions of every rank's tokens are their positions in their documents;
* "balanced" beats per-document and whole-sequence zigzag on short documents at CP 16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.parallel.cp_split import (
    cp_merge,
    cp_split,
    packed_seq_params_for_rank,
    pad_documents_for_cp,
)
from megatron_longctx.parallel.units import imbalance, plan_units, work_per_rank
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


@pytest.mark.parametrize("sharding", ["balanced", "document", "sequence"])
@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_units_cover_every_token_once_and_merge_inverts(cp, sharding):
    batch = _batch(LENGTHS)
    padded = pad_documents_for_cp(batch, cp, sharding=sharding)
    cu = padded["cu_seqlens"].tolist()
    if sharding == "balanced":
        sizes = padded["cp_chunks"].diff(
            dim=1
        )  # no padding but a tail unit of < CP tokens; chunks +- 1 token
        assert cu[: len(LENGTHS) + 1] == [0] + np.cumsum(LENGTHS).tolist()  # units = documents
        assert cu[-1] - sum(LENGTHS) < cp
        real_units = sizes[: len(LENGTHS)]
        assert (real_units.max(1).values - real_units.min(1).values <= 1).all()
    else:
        assert all((b - a) % (2 * cp) == 0 for a, b in zip(cu, cu[1:]))  # equal chunks
        assert "cp_chunks" not in padded
    spans = padded["doc_spans"].tolist()
    starts = np.cumsum([0] + LENGTHS)
    for (a, b), d in zip(spans, range(len(LENGTHS))):  # every document whole, in order
        s0, n = starts[d], LENGTHS[d]
        assert b - a == n
        assert padded["tokens"][0, a:b].tolist() == list(range(s0 + 1, s0 + n + 1))
        assert padded["labels"][0, a:b].tolist() == list(range(s0 + 1001, s0 + n + 1001))
    assert padded["loss_mask"].sum() == sum(LENGTHS)
    if sharding == "sequence":
        assert len(cu) == 2 and cu[1] - sum(LENGTHS) < 2 * cp
    shards = [cp_split(padded, cp, r) for r in range(cp)]
    assert len({sh["tokens"].shape[1] for sh in shards}) == 1  # every rank the same count
    seen = torch.cat([sh["tokens"].flatten() for sh in shards])
    assert sorted(t for t in seen.tolist() if t) == list(range(1, sum(LENGTHS) + 1))
    merged = cp_merge(shards)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "doc_spans"):
        assert torch.equal(merged[key], padded[key]), key


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_rope_positions_of_unequal_chunks_are_document_positions(cp):
    """Every rank's (unit, position) for THD RoPE, as bound on the cu_seqlens tensor megatron
    hands RoPE, equals the token's position in its document (hand layout: the token ids)."""
    from megatron_longctx.model.rope_thd import local_positions

    batch = _batch(LENGTHS)
    padded = pad_documents_for_cp(batch, cp, sharding="balanced")
    doc_of = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    first = np.cumsum([0] + LENGTHS)
    for r in range(cp):
        local = cp_split(padded, cp, r)
        params = packed_seq_params_for_rank(local)
        n = local["tokens"].shape[1]
        unit, pos = local_positions(params.cu_seqlens_q_padded, n, cp, r)
        for t, u, p in zip(local["tokens"][0].tolist(), unit.tolist(), pos.tolist()):
            if t:  # real token t - 1 of the sequence: its document and position in it
                assert (u, p) == (doc_of[t - 1], t - 1 - first[doc_of[t - 1]])
            else:
                assert u == len(LENGTHS)  # the tail padding unit


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


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ring_blocks_with_unequal_chunks_cover_exactly_the_allowed_pairs(cp):
    lengths = [3, 1, 2 * cp + 3, 4, 12 * cp + 1, 1, 7, 5 * cp + 1, 2]
    plan = plan_units(lengths, cp, "balanced")
    cu_p = [0] + plan.bounds[:, -1].tolist()
    cu_r = [0] + np.cumsum(plan.real).tolist()
    starts = np.asarray(cu_p[: len(lengths)])
    want = {(a + i, a + j) for a, n in zip(starts, lengths) for i in range(n) for j in range(i + 1)}
    layout = CPLayout(cu_p, cu_r, cp, chunks=plan.bounds)
    got = ring_pairs(layout, cu_p, cp)
    assert len(got) == len(set(got)), "a pair is computed twice"
    assert set(got) == want


def test_layout_refuses_documents_outside_their_unit():
    with pytest.raises(ValueError, match="inside one unit"):
        CPLayout([0, 8, 16], [0, 6, 14], 2, ([0, 6], [6, 14]))  # second document crosses 8


def test_balanced_beats_per_document_and_sequence_on_short_documents():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.7, 1.0, size=400), 16, 4096).astype(int)
    cp = 16
    results = {s: imbalance(work_per_rank(lengths, cp, s)[0]) for s in ("document", "sequence")}
    work, padding = work_per_rank(lengths, cp, "balanced")
    assert imbalance(work) < min(results.values()), results
    assert imbalance(work) < 1.01 and padding < cp


def test_stage_config_defaults_to_balanced_and_names_the_old_scheme():
    from megatron_longctx.config.schema import ConfigError, StageConfig

    assert (
        StageConfig(name="s", seq_length=64, steps=1, global_batch_size=1).cp_sharding == "balanced"
    )
    with pytest.raises(ConfigError, match="'adaptive' became 'balanced'"):
        StageConfig(name="s", seq_length=64, steps=1, global_batch_size=1, cp_sharding="adaptive")
    with pytest.raises(ConfigError, match="core_attention 'te' needs cp_sharding 'document'"):
        StageConfig(
            name="s",
            seq_length=64,
            steps=1,
            global_batch_size=1,
            core_attention="te",
            cp_sharding="balanced",
        )
