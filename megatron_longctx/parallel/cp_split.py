"""Splitting a packed batch across context-parallel (CP) ranks: zigzag *within each unit*.

Layout (cu_seqlens entries = *units*, parallel/units.py):

* documents are grouped into units (one document per unit for ``"document"`` and ``"balanced"``,
  the whole sample for ``"sequence"``) and laid out in order, each unit's real tokens then its
  padding (``pad_documents_for_cp``; padded tokens have ``loss_mask`` 0 and are masked out of
  attention);
* ``cu_seqlens`` are the unit boundaries of that layout, ``cu_seqlens_unpadded`` the cumulative
  *real* lengths (TE's ``cu_seqlens_q``), ``doc_spans`` the documents inside the units and
  ``cp_chunks`` ``[units, 2 CP + 1]`` the chunk boundaries; all describe the whole (pre-CP)
  sequence;
* each unit is cut into 2 x CP ordered chunks and rank r keeps chunks r and 2 CP - 1 - r of every
  unit, in unit order. With "document" and "sequence" every unit is padded to a multiple of
  2 x CP and the chunks are equal (the convention megatron-core's THD RoPE and Transformer
  Engine's CP attention assume: local boundaries ``cu_seqlens // CP``); with "balanced" no unit
  is padded and chunk sizes differ by at most one token (zigzag.balanced_chunk_sizes), every rank
  holding the same count after a padding-only last unit.

Trade-off: zigzag over the whole packed sequence balances causal work for one document but not for
many (the rank holding the last chunk of a long document does most of its work). Zigzag within every
document gives every rank an equal share of every document; with equal chunks each document is
padded to a multiple of 2 x CP, which lands on rank 0 and unbalances short documents at large CP;
unequal chunks need no padding: benchmarks/bench_balance.py.

Batch legend: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` are ``[b, s]`` (b = 1 when
``cu_seqlens`` is given); without ``cu_seqlens`` each row is one document (megatron's
``get_batch_on_this_cp_rank`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_longctx.parallel.zigzag import (
    equal_chunk_bounds,
    held_per_unit,
    num_chunks,
    rank_chunks,
    rank_totals,
)

PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class CPSplitError(ValueError):
    """A batch that cannot be split across CP ranks; the message names the rule and the numbers."""


def _as_list(cu) -> list[int]:
    return [int(x) for x in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)]


def _check_cu(cu: list[int], name: str) -> None:
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise CPSplitError(
            f"{name} must start at 0 and be non-decreasing with >= 2 entries, got {cu}"
        )


def layout_bounds(cu_padded, cu_real, cp_size: int, chunks=None) -> np.ndarray:
    """The checked ``[units, 2 CP + 1]`` chunk boundaries of a laid-out batch.

    ``chunks`` (the batch's ``cp_chunks``) must cut every unit of ``cu_padded`` into 2 x CP
    ordered chunks that give every rank the same token count; without it every padded unit must
    be a multiple of 2 x CP (equal chunks). Either way no unit may hold more real tokens than
    its length.
    """
    cu_p, cu_r = _as_list(cu_padded), _as_list(cu_real)
    _check_cu(cu_p, "cu_seqlens")
    _check_cu(cu_r, "cu_seqlens_unpadded")
    if len(cu_r) != len(cu_p):
        raise CPSplitError(
            f"cu_seqlens has {len(cu_p) - 1} units but cu_seqlens_unpadded has {len(cu_r) - 1}"
        )
    padded, real = np.diff(cu_p), np.diff(cu_r)
    if (real > padded).any():
        i = int(np.argmax(real > padded))
        raise CPSplitError(f"unit {i}: real length {real[i]} > padded length {padded[i]}")
    m = num_chunks(cp_size)
    if chunks is None:
        if (padded % m).any():
            i = int(np.flatnonzero(padded % m)[0])
            raise CPSplitError(
                f"unit {i}: padded length {padded[i]} is not divisible by 2 x CP = {m}; call "
                "pad_documents_for_cp first (or pass its cp_chunks)"
            )
        return equal_chunk_bounds(cu_p, cp_size)
    bounds = np.asarray(_as_list(torch.as_tensor(chunks).reshape(-1)), dtype=np.int64)
    if bounds.size != padded.size * (m + 1):
        raise CPSplitError(
            f"cp_chunks has {bounds.size} entries; {padded.size} units at CP {cp_size} need "
            f"{padded.size} x {m + 1} (chunks made for another CP size or batch?)"
        )
    bounds = bounds.reshape(-1, m + 1)
    totals = rank_totals(np.diff(bounds, axis=1), cp_size)
    if (
        not np.array_equal(bounds[:, 0], cu_p[:-1])
        or not np.array_equal(bounds[:, -1], cu_p[1:])
        or (np.diff(bounds, axis=1) < 0).any()
        or (totals != totals[0]).any()
    ):
        raise CPSplitError(
            "cp_chunks must cut every unit of cu_seqlens into ordered chunks giving every CP "
            f"rank the same token count; got rank totals {totals.tolist()}"
        )
    return bounds


def _cu_of(batch: dict) -> tuple[list[int], list[int]]:
    """(padded, real) boundaries of a batch; rows are documents when cu_seqlens is absent."""
    b, s = batch["tokens"].shape
    if batch.get("cu_seqlens") is None:
        cu = [i * s for i in range(b + 1)]
        return cu, cu
    if b != 1:
        raise CPSplitError(f"a batch with cu_seqlens must have batch size 1 (THD), got {b}")
    cu_padded = _as_list(batch["cu_seqlens"])
    cu_real = _as_list(batch.get("cu_seqlens_unpadded", cu_padded))
    if cu_padded[-1] != s:
        raise CPSplitError(f"cu_seqlens ends at {cu_padded[-1]} but the sequence has {s} tokens")
    return cu_padded, cu_real


def pad_documents_for_cp(
    batch: dict,
    cp_size: int,
    *,
    pad_to: int | None = None,
    pad_token_id: int = 0,
    sharding: str = "document",
) -> dict:
    """Lays the documents out in CP units (parallel/units.py ``plan_units``): each unit's real
    tokens, then its padding ("document", "sequence": to a multiple of 2 x ``cp_size``;
    "balanced": none), then an optional padding-only unit.

    Args:
        batch: ``tokens``/``labels``/``loss_mask``/``position_ids`` of shape [1, s] and
            ``cu_seqlens`` (real document boundaries, ending at s).
        cp_size: context-parallel size.
        pad_to: if given, a padding-only unit (real length 0) is appended to reach this length
            (a multiple of 2 x CP, or of CP for "balanced").
        pad_token_id: token and label id written into padding.
        sharding: ``"document"`` (one unit per document, Transformer Engine's layout),
            ``"balanced"`` or ``"sequence"`` (parallel/units.py SHARDINGS).

    Returns:
        A new batch in the laid-out order: ``cu_seqlens`` (int32, unit boundaries),
        ``cu_seqlens_unpadded`` (int32, cumulative real lengths of the units), for "balanced"
        ``cp_chunks`` (int64 [units, 2 CP + 1], the chunk boundaries of every unit; the equal
        chunks of the other shardings follow from ``cu_seqlens``), ``doc_spans`` (int32
        [num_docs, 2], every document's [start, end), in order) and ``max_seqlen`` (longest
        unit). Padded tokens have loss_mask 0; their position ids continue the unit's documents
        (positions restart per unit in THD RoPE).
    """
    from megatron_longctx.parallel.units import plan_units

    cu = _as_list(batch["cu_seqlens"])
    _check_cu(cu, "cu_seqlens")
    s = batch["tokens"].shape[1]
    if batch["tokens"].shape[0] != 1 or cu[-1] != s:
        raise CPSplitError(
            f"pad_documents_for_cp needs a [1, s] batch whose cu_seqlens end at "
            f"s; got shape {tuple(batch['tokens'].shape)} and cu_seqlens[-1] = "
            f"{cu[-1]}"
        )
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if pad_to is not None:
        multiple = cp_size if sharding == "balanced" else num_chunks(cp_size)
        least = plan_units(lengths, cp_size, sharding).total
        if pad_to < least or pad_to % multiple:
            raise CPSplitError(
                f"pad_to {pad_to}: padded documents take {least} tokens; pad_to must be "
                f">= that and divisible by {multiple} ({sharding!r} sharding at CP {cp_size})"
            )
    plan = plan_units(lengths, cp_size, sharding, pad_to or 0)
    unit_cu = np.concatenate([[0], plan.bounds[:, -1]])
    real_cu = np.concatenate([[0], np.cumsum(plan.real)])
    # every laid-out position's unit and offset in it; real tokens are a unit's first ones
    unit = np.repeat(np.arange(plan.real.size), np.diff(unit_cu))
    offset = np.arange(plan.total) - unit_cu[unit]
    is_real = offset < plan.real[unit]
    source = torch.from_numpy(np.where(is_real, real_cu[unit] + offset, 0))
    beyond = torch.from_numpy(offset - plan.real[unit] + 1)  # padding: 1, 2, .. after the unit
    last = torch.from_numpy(np.maximum(real_cu[unit + 1] - 1, 0))  # the unit's last real token
    has_real = torch.from_numpy(plan.real[unit] > 0)
    real_mask = torch.from_numpy(is_real).unsqueeze(0)
    pieces = {}
    for key in (k for k in PER_TOKEN_KEYS if k in batch):
        x = batch[key]
        if key == "position_ids":  # padding continues its unit's positions (0.. alone)
            pad = torch.where(has_real, x[0, last] + beyond, beyond - 1).to(x.dtype).unsqueeze(0)
        else:
            pad = torch.full((1, plan.total), 0 if key == "loss_mask" else pad_token_id)
        pieces[key] = torch.where(real_mask, x[:, source], pad.to(x.dtype))
    spans = np.stack([plan.doc_start, plan.doc_start + np.asarray(lengths, dtype=np.int64)], 1)
    result = {k: v for k, v in batch.items() if k not in pieces}
    result.update(pieces)
    result["cu_seqlens"] = torch.from_numpy(unit_cu.astype(np.int32))
    result["cu_seqlens_unpadded"] = torch.from_numpy(real_cu.astype(np.int32))
    if sharding == "balanced":  # unequal chunks (equal ones follow from cu_seqlens at any CP)
        result["cp_chunks"] = torch.from_numpy(plan.bounds.astype(np.int64))
    result["doc_spans"] = torch.tensor(spans.reshape(-1, 2), dtype=torch.int32)
    result["max_seqlen"] = int(np.diff(unit_cu).max())
    return result


def rank_token_index(cu_padded, cp_size: int, cp_rank: int, chunks=None) -> torch.Tensor:
    """Global (laid-out) indices of the tokens rank ``cp_rank`` keeps, in local order: its early
    then its late chunk of every unit (``chunks``: the batch's ``cp_chunks``; None: equal
    chunks of the padded units)."""
    if chunks is None:
        bounds = equal_chunk_bounds(_as_list(cu_padded), cp_size)
    else:
        bounds = np.asarray(chunks, dtype=np.int64).reshape(-1, num_chunks(cp_size) + 1)
    early, late = rank_chunks(cp_size, cp_rank)
    start = bounds[:, [early, late]].reshape(-1)
    length = (bounds[:, [early + 1, late + 1]] - bounds[:, [early, late]]).reshape(-1)
    return torch.from_numpy(_ranges(start, length))


def _ranges(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start_j, start_j + length_j)`` (vectorised)."""
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(length) - length
    return np.repeat(start - offsets, length) + np.arange(total)


def cp_split(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's share of a batch (chunks r and 2 CP - 1 - r of every unit).

    Args:
        batch: per-token tensors [b, s] and (for THD, b = 1) ``cu_seqlens`` in the laid-out
            order, optionally ``cu_seqlens_unpadded`` and ``cp_chunks`` (pad_documents_for_cp);
            without ``cu_seqlens`` every row is one document.
        cp_size: context-parallel size; cp_rank: this rank in the CP group.

    Returns:
        The same keys with per-token tensors [b, s / cp_size]; ``cu_seqlens``,
        ``cu_seqlens_unpadded`` and ``cp_chunks`` stay global (what PackedSeqParams wants), plus
        ``cu_seqlens_local`` (this rank's unit boundaries), ``max_seqlen``, ``cp_size`` and
        ``cp_rank``.
    """
    if not 0 <= cp_rank < cp_size:
        raise CPSplitError(f"cp_rank {cp_rank} is not in [0, CP = {cp_size})")
    cu_padded, cu_real = _cu_of(batch)
    chunks = batch.get("cp_chunks")
    bounds = layout_bounds(cu_padded, cu_real, cp_size, chunks)
    if batch.get("cu_seqlens") is None:  # rows are documents: split each row the same way
        s = batch["tokens"].shape[1]
        index = rank_token_index([0, s], cp_size, cp_rank)
    else:
        index = rank_token_index(cu_padded, cp_size, cp_rank, bounds)
    out = {k: v for k, v in batch.items() if k not in PER_TOKEN_KEYS}
    for key in PER_TOKEN_KEYS:
        if key in batch:
            out[key] = batch[key][:, index]
    if batch.get("cu_seqlens") is not None:
        out["cu_seqlens_unpadded"] = torch.tensor(cu_real, dtype=torch.int32)
        held = held_per_unit(np.diff(bounds, axis=1), cp_size)[:, cp_rank]  # tokens per unit
        out["cu_seqlens_local"] = torch.tensor([0] + np.cumsum(held).tolist(), dtype=torch.int32)
        out["max_seqlen"] = max(b - a for a, b in zip(cu_padded, cu_padded[1:]))
    out.update(cp_size=cp_size, cp_rank=cp_rank)
    return out


def cp_merge(shards: list[dict]) -> dict:
    """Inverse of ``cp_split``: the full batch from every rank's shard (ordered by CP rank)."""
    cp_size = len(shards)
    first = shards[0]
    thd = first.get("cu_seqlens") is not None
    s = first["tokens"].shape[1] * cp_size
    cu = _as_list(first["cu_seqlens"]) if thd else [0, s]
    out = {
        k: v
        for k, v in first.items()
        if k not in PER_TOKEN_KEYS + ("cu_seqlens_local", "cp_size", "cp_rank")
    }
    if not thd:
        out.pop("cu_seqlens_unpadded", None)
        out.pop("max_seqlen", None)
    for key in PER_TOKEN_KEYS:
        if key not in first:
            continue
        full = torch.empty(first[key].shape[0], s, dtype=first[key].dtype)
        for rank, shard in enumerate(shards):
            full[:, rank_token_index(cu, cp_size, rank, first.get("cp_chunks"))] = shard[key]
        out[key] = full
    return out


def packed_seq_params_for_rank(local_batch: dict, cp_group=None):
    """megatron's ``PackedSeqParams`` (THD) for a batch returned by ``cp_split``.

    cu_seqlens_q/kv are the cumulative real lengths and the ``*_padded`` ones the padded layout,
    both for the whole sequence (TE's convention; megatron's THD RoPE divides them by CP itself).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if local_batch.get("cu_seqlens") is None:
        raise CPSplitError("packed_seq_params_for_rank needs a THD batch (with cu_seqlens)")
    padded = local_batch["cu_seqlens"].to(torch.int32)
    real = local_batch.get("cu_seqlens_unpadded", padded).to(torch.int32)
    device = local_batch["tokens"].device
    max_seqlen = int(local_batch.get("max_seqlen") or int((padded[1:] - padded[:-1]).max()))
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=real.to(device),
        cu_seqlens_kv=real.to(device),
        cu_seqlens_q_padded=padded.to(device),
        cu_seqlens_kv_padded=padded.to(device),
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
        cp_group=cp_group,
    )
    # document intervals inside the units, for the project's core attention (model/attention/
    # core.py); megatron ignores the attribute, RoPE restarts per unit (relative: exact)
    params.doc_spans = local_batch.get("doc_spans")
    params.cp_chunks = local_batch.get("cp_chunks")  # the chunks inside the units
    if params.cp_chunks is not None:  # THD RoPE's positions (cp_split gives the rank)
        lay = rank_token_layout(
            padded, real, local_batch["cp_size"], local_batch["cp_rank"], chunks=params.cp_chunks
        )
        params.rope_positions = (lay.doc, lay.pos)
    bind_rope_positions(params)
    return params


#: host-side attributes the project adds to megatron's PackedSeqParams (copied with it)
HOST_ATTRIBUTES = ("doc_spans", "cp_chunks", "rope_positions")


def bind_rope_positions(params) -> None:
    """Hands THD RoPE (model/rope_thd.py) this rank's (unit, position in unit) of every token.

    megatron calls RoPE with ``cu_seqlens_*_padded`` only, and unequal chunks ("balanced"
    sharding) cannot be read off unit boundaries; so the positions ride on those tensors as the
    attribute ``longctx_positions``, on their device. Call again after moving the tensors.
    """
    pos = getattr(params, "rope_positions", None)
    for cu in (params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
        if cu is not None:
            cu.longctx_positions = None if pos is None else tuple(p.to(cu.device) for p in pos)


@dataclass
class RankTokenLayout:
    """Per-token description of one CP rank's local sequence, derived from the boundaries.

    Attributes:
        doc: [t] unit index of each local token.
        pos: [t] position of the token inside its (padded) unit.
        valid: [t] token is real (pos < the unit's real length), not padding.
        early: local indices of the rank's early chunks (chunk r of every unit).
        late: local indices of its late chunks (chunk 2 CP - 1 - r).
    """

    doc: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    early: torch.Tensor
    late: torch.Tensor


def rank_token_layout(
    cu_padded,
    cu_real,
    cp_size: int,
    cp_rank: int,
    device: torch.device | str = "cpu",
    chunks=None,
) -> RankTokenLayout:
    """The ``RankTokenLayout`` of rank ``cp_rank`` (vectorised; no S x S structure anywhere);
    ``chunks``: the batch's ``cp_chunks`` (None: equal chunks)."""
    bounds = layout_bounds(cu_padded, cu_real, cp_size, chunks)
    real = np.diff(_as_list(cu_real))
    early_chunk, late_chunk = rank_chunks(cp_size, cp_rank)
    sizes = np.diff(bounds, axis=1)[:, [early_chunk, late_chunk]]  # [units, 2]
    doc = np.repeat(np.arange(bounds.shape[0]), sizes.sum(1))
    start = bounds[:, [early_chunk, late_chunk]] - bounds[:, :1]  # chunk starts inside units
    pos = _ranges(start.reshape(-1), sizes.reshape(-1))
    is_late = np.repeat(np.tile([False, True], bounds.shape[0]), sizes.reshape(-1))
    index = np.arange(doc.size)
    as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    return RankTokenLayout(
        doc=as_t(doc),
        pos=as_t(pos),
        valid=as_t(pos < real[doc]),
        early=as_t(index[~is_late]),
        late=as_t(index[is_late]),
    )
