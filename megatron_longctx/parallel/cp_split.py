"""Splitting a packed batch across context-parallel (CP) ranks: zigzag *within each unit*.

Layout (the THD convention that megatron-core's RoPE (``_get_thd_freqs_on_this_cp_rank``) and
Transformer Engine's CP attention assume, with cu_seqlens entries = *units*, parallel/units.py):

* documents are grouped into units (one document per unit for ``sharding="document"``, the only
  layout TE accepts); every unit is padded to a multiple of 2 x CP (``pad_documents_for_cp``;
  padded tokens have ``loss_mask`` 0 and are masked out of attention);
* ``cu_seqlens`` are the unit boundaries of that padded layout, ``cu_seqlens_unpadded`` the
  cumulative *real* lengths (TE's ``cu_seqlens_q``), ``doc_spans`` the documents inside the units;
  all describe the whole (pre-CP) sequence;
* each unit of padded length P is cut into 2 x CP chunks of c = P / (2 CP) tokens; rank r keeps
  chunks r and 2 CP - 1 - r of every unit, in unit order. The rank's local sequence is
  therefore ``sum(P_i) / CP`` tokens and its local boundaries are ``cu_seqlens // CP``.

Trade-off: zigzag over the whole packed sequence balances causal work for one document but not for
many (the rank holding the last chunk of a long document does most of its work). Zigzag within every
document gives every rank an equal share of every document, at the price of padding each document to
a multiple of 2 x CP, which lands on rank 0 and unbalances short documents at large CP. Adaptive
units (long documents alone, short ones grouped) keep both small: benchmarks/bench_balance.py.

Batch legend: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` are ``[b, s]`` (b = 1 when
``cu_seqlens`` is given); without ``cu_seqlens`` each row is one document (megatron's
``get_batch_on_this_cp_rank`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longctx.parallel.zigzag import num_chunks, rank_chunks

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


def _check_padded(cu_padded: list[int], cu_real: list[int], cp_size: int) -> None:
    _check_cu(cu_padded, "cu_seqlens")
    _check_cu(cu_real, "cu_seqlens_unpadded")
    if len(cu_real) != len(cu_padded):
        raise CPSplitError(
            f"cu_seqlens has {len(cu_padded) - 1} documents but cu_seqlens_unpadded "
            f"has {len(cu_real) - 1}"
        )
    for i in range(len(cu_padded) - 1):
        padded, real = cu_padded[i + 1] - cu_padded[i], cu_real[i + 1] - cu_real[i]
        if padded % num_chunks(cp_size):
            raise CPSplitError(
                f"document {i}: padded length {padded} is not divisible by 2 x CP = "
                f"{num_chunks(cp_size)}; call pad_documents_for_cp first"
            )
        if real > padded:
            raise CPSplitError(f"document {i}: real length {real} > padded length {padded}")


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
    linear: float | None = None,
) -> dict:
    """Groups documents into CP units (parallel/units.py) and pads every unit to a multiple of
    2 x ``cp_size`` (at its end; at its start for ``"adaptive"``, units.PAD_FIRST).

    Args:
        batch: ``tokens``/``labels``/``loss_mask``/``position_ids`` of shape [1, s] and
            ``cu_seqlens`` (real document boundaries, ending at s).
        cp_size: context-parallel size.
        pad_to: if given, a padding-only unit (real length 0) is appended to reach this length.
        pad_token_id: token and label id written into padding.
        sharding: ``"document"`` (one unit per document, Transformer Engine's layout),
            ``"adaptive"`` or ``"sequence"`` (parallel/units.py SHARDINGS).
        linear: linear work per token in attention pairs for the adaptive rule (the loader's
            work model passes the stage's, so the layout is the one its telemetry planned);
            None: units.LINEAR_PAIRS_PER_TOKEN.

    Returns:
        A new batch in the padded layout: ``cu_seqlens`` (int32, padded unit boundaries),
        ``cu_seqlens_unpadded`` (int32, cumulative real lengths of the units), ``doc_spans``
        (int32 [num_docs, 2], every document's [start, end) in the padded layout, in layout
        order: "adaptive" puts the shortest documents first), ``doc_order`` (int64 [num_docs],
        the original index of each of them), ``max_seqlen``
        (longest padded unit). Padded tokens have loss_mask 0; their position ids continue the
        unit's documents (megatron's THD RoPE ignores them: positions restart per unit).
    """
    from megatron_longctx.parallel.units import LINEAR_PAIRS_PER_TOKEN, PAD_FIRST, plan_units

    cu = _as_list(batch["cu_seqlens"])
    _check_cu(cu, "cu_seqlens")
    s = batch["tokens"].shape[1]
    if batch["tokens"].shape[0] != 1 or cu[-1] != s:
        raise CPSplitError(
            f"pad_documents_for_cp needs a [1, s] batch whose cu_seqlens end at "
            f"s; got shape {tuple(batch['tokens'].shape)} and cu_seqlens[-1] = "
            f"{cu[-1]}"
        )
    multiple = num_chunks(cp_size)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    linear = LINEAR_PAIRS_PER_TOKEN if linear is None else linear
    order, unit = plan_units(lengths, cp_size, sharding, linear=linear)
    pad_first = PAD_FIRST[sharding]
    unit_docs: list[list[int]] = []  # original document indices of each unit, in layout order
    for d, u in zip(order.tolist(), unit.tolist()):
        if u == len(unit_docs):
            unit_docs.append([])
        unit_docs[u].append(d)
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in PER_TOKEN_KEYS if k in batch}
    cu_padded, cu_real, spans = [0], [0], []
    for docs in unit_docs:
        real = sum(lengths[d] for d in docs)
        pad = (-real) % multiple
        at = cu_padded[-1] + (pad if pad_first else 0)
        for d in docs:
            spans.append([at, at + lengths[d]])
            at += lengths[d]
        for key, out in pieces.items():
            part = torch.cat([batch[key][:, cu[d] : cu[d + 1]] for d in docs], dim=1)
            if key == "position_ids" and pad_first:
                first = part[:, :1] if real else torch.zeros_like(batch[key][:, :1])
                fill = first - torch.arange(pad, 0, -1, dtype=part.dtype)
            elif key == "position_ids":
                last = part[:, -1:] if real else torch.full_like(batch[key][:, :1], -1)
                fill = last + torch.arange(1, pad + 1, dtype=part.dtype)
            else:
                value = 0 if key == "loss_mask" else pad_token_id
                fill = torch.full((1, pad), value, dtype=part.dtype)
            out.extend([fill, part] if pad_first else [part, fill])
        cu_padded.append(cu_padded[-1] + real + pad)
        cu_real.append(cu_real[-1] + real)
    if pad_to is not None:
        extra = pad_to - cu_padded[-1]
        if extra < 0 or extra % multiple:
            raise CPSplitError(
                f"pad_to {pad_to}: padded documents take {cu_padded[-1]} tokens; "
                f"the rest ({extra}) must be >= 0 and divisible by 2 x CP = "
                f"{multiple}"
            )
        if extra:
            for key, out in pieces.items():
                value = 0 if key == "loss_mask" else pad_token_id
                fill = (
                    torch.arange(extra).unsqueeze(0).to(batch[key].dtype)
                    if key == "position_ids"
                    else torch.full((1, extra), value, dtype=batch[key].dtype)
                )
                out.append(fill)
            cu_padded.append(cu_padded[-1] + extra)
            cu_real.append(cu_real[-1])
    result = {k: v for k, v in batch.items() if k not in pieces}
    result.update({k: torch.cat(v, dim=1) for k, v in pieces.items()})
    result["cu_seqlens"] = torch.tensor(cu_padded, dtype=torch.int32)
    result["cu_seqlens_unpadded"] = torch.tensor(cu_real, dtype=torch.int32)
    result["doc_spans"] = torch.tensor(spans, dtype=torch.int32).reshape(-1, 2)
    result["doc_order"] = torch.from_numpy(order)
    result["max_seqlen"] = max(b - a for a, b in zip(cu_padded, cu_padded[1:]))
    return result


def rank_token_index(cu_padded, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global (padded-layout) indices of the tokens rank ``cp_rank`` keeps, in local order."""
    cu = _as_list(cu_padded)
    idx = []
    early, late = rank_chunks(cp_size, cp_rank)
    for start, end in zip(cu, cu[1:]):
        c = (end - start) // num_chunks(cp_size)
        idx.append(torch.arange(start + early * c, start + (early + 1) * c))
        idx.append(torch.arange(start + late * c, start + (late + 1) * c))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def cp_split(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's share of a batch (chunks r and 2 CP - 1 - r of every document).

    Args:
        batch: per-token tensors [b, s] and (for THD, b = 1) ``cu_seqlens`` in the padded layout,
            optionally ``cu_seqlens_unpadded``; without ``cu_seqlens`` every row is one document.
        cp_size: context-parallel size; cp_rank: this rank in the CP group.

    Returns:
        The same keys with per-token tensors [b, s / cp_size]; ``cu_seqlens`` and
        ``cu_seqlens_unpadded`` stay global (what PackedSeqParams wants), plus ``cu_seqlens_local``
        (this rank's document boundaries), ``max_seqlen``, ``cp_size`` and ``cp_rank``.
    """
    if not 0 <= cp_rank < cp_size:
        raise CPSplitError(f"cp_rank {cp_rank} is not in [0, CP = {cp_size})")
    cu_padded, cu_real = _cu_of(batch)
    _check_padded(cu_padded, cu_real, cp_size)
    if batch.get("cu_seqlens") is None:  # rows are documents: split each row the same way
        s = batch["tokens"].shape[1]
        index = rank_token_index([0, s], cp_size, cp_rank)
    else:
        index = rank_token_index(cu_padded, cp_size, cp_rank)
    out = {k: v for k, v in batch.items() if k not in PER_TOKEN_KEYS}
    for key in PER_TOKEN_KEYS:
        if key in batch:
            out[key] = batch[key][:, index]
    if batch.get("cu_seqlens") is not None:
        out["cu_seqlens_unpadded"] = torch.tensor(cu_real, dtype=torch.int32)
        out["cu_seqlens_local"] = torch.tensor([c // cp_size for c in cu_padded], dtype=torch.int32)
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
            full[:, rank_token_index(cu, cp_size, rank)] = shard[key]
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
    return params


@dataclass
class RankTokenLayout:
    """Per-token description of one CP rank's local sequence, derived from the boundaries.

    Attributes:
        doc: [t] document index of each local token.
        pos: [t] position of the token inside its (padded) document.
        valid: [t] token is real (pos < the document's real length), not padding.
        early: [t/2] local indices of the rank's early chunks (chunk r of every document).
        late: [t/2] local indices of its late chunks (chunk 2 CP - 1 - r).
    """

    doc: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    early: torch.Tensor
    late: torch.Tensor


def rank_token_layout(
    cu_padded, cu_real, cp_size: int, cp_rank: int, device: torch.device | str = "cpu"
) -> RankTokenLayout:
    """The ``RankTokenLayout`` of rank ``cp_rank`` (vectorised; no S x S structure anywhere)."""
    cu_p, cu_r = _as_list(cu_padded), _as_list(cu_real)
    _check_padded(cu_p, cu_r, cp_size)
    padded = torch.tensor(cu_p[1:]) - torch.tensor(cu_p[:-1])
    real = torch.tensor(cu_r[1:]) - torch.tensor(cu_r[:-1])
    chunk = padded // num_chunks(cp_size)
    local_len = 2 * chunk
    doc = torch.repeat_interleave(torch.arange(len(padded)), local_len)
    local_start = torch.cumsum(local_len, 0) - local_len
    j = torch.arange(int(local_len.sum())) - local_start[doc]
    c = chunk[doc]
    is_late = j >= c
    early_chunk, late_chunk = rank_chunks(cp_size, cp_rank)
    pos = torch.where(is_late, late_chunk * c + j - c, early_chunk * c + j)
    valid = pos < real[doc]
    index = torch.arange(doc.numel())
    return RankTokenLayout(
        doc=doc.to(device),
        pos=pos.to(device),
        valid=valid.to(device),
        early=index[~is_late].to(device),
        late=index[is_late].to(device),
    )
