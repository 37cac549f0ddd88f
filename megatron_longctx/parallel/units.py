"""CP sharding units: how the documents of a packed sequence are cut into zigzag chunks.

A *unit* (one document, or a run of consecutive documents) is cut into 2 x CP contiguous chunks;
rank r keeps chunks r and 2 CP - 1 - r (parallel/zigzag.py), in unit order. ``cu_seqlens`` of the
laid-out batch are the unit boundaries, ``cp_chunks`` ``[units, 2 CP + 1]`` the chunk boundaries
inside them (what cp_split, the attention blocks and THD RoPE follow), and the document
boundaries inside units travel as ``doc_spans`` so that attention never crosses a document
(model/attention/blocks.py).

Schemes (``SHARDINGS``):

* ``"balanced"`` (default): every document is its own unit, cut *without padding*: each chunk
  gets floor(L / 2 CP) tokens and the leftover tokens of all documents are dealt round-robin over
  the ranks (``zigzag.balanced_chunk_sizes``). Every rank holds its zigzag pair of every document
  up to one token per chunk (attention even per document) and within one token of total / CP
  (linear work even); a padding-only unit at the end tops every rank up to the same count (at
  most CP - 1 tokens, more only for sequence parallelism's multiple). Our core attentions only.
* ``"document"``: every document its own unit padded to a multiple of 2 x CP, equal chunks
  (per-document zigzag; the only layout Transformer Engine's THD CP attention accepts). Every
  short document's padding lands in its last chunk (rank 0), so short-only samples are uneven at
  large CP (benchmarks/bench_balance.py).
* ``"sequence"``: the whole sample is one unit (megatron's whole-sequence zigzag): almost no
  padding, but the rank holding a long document's late chunk does most of its attention.

Everything is numpy over (document, chunk) pieces: a 512K-token sample plans in about a
millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_longctx.parallel.zigzag import (
    balanced_chunk_sizes,
    chunk_owner,
    equal_chunk_bounds,
    num_chunks,
    padding_to_zigzag,
    rank_totals,
)

SHARDINGS = ("balanced", "document", "sequence")

#: matmul work of one token in attention score pairs at Llama-3-8B's shape (N_matmul / (2 L d_q));
#: the perf model's ratio (perf/flops.py), used to weigh linear against attention work.
LINEAR_PAIRS_PER_TOKEN = 28_600.0


@dataclass(frozen=True)
class UnitPlan:
    """The CP layout of one packed sequence (documents stay in order).

    Attributes:
        unit: ``[docs]`` the unit of every document (non-decreasing from 0).
        real: ``[units]`` real tokens of every unit (a trailing padding-only unit has 0).
        bounds: ``[units, 2 CP + 1]`` global chunk boundaries in the laid-out sequence (each
            unit's real tokens first, then its padding).
        doc_start: ``[docs]`` where every document starts in the laid-out sequence.
    """

    unit: np.ndarray
    real: np.ndarray
    bounds: np.ndarray
    doc_start: np.ndarray

    @property
    def total(self) -> int:
        """Tokens of the laid-out sequence, padding included."""
        return int(self.bounds[-1, -1]) if self.bounds.size else 0

    @property
    def padding(self) -> int:
        return self.total - int(self.real.sum())


def plan_units(doc_lengths, cp_size: int, scheme: str = "balanced", pad_to: int = 0) -> UnitPlan:
    """The layout of one packed sequence under ``scheme`` (see the module docstring).

    Args:
        doc_lengths: real lengths of the documents, in order.
        cp_size: context-parallel size.
        scheme: one of SHARDINGS.
        pad_to: the laid-out sequence is padded (a padding-only unit at its end) to at least
            this many tokens; it must then be a multiple of 2 x CP ("document", "sequence") or of
            CP ("balanced").
    """
    if scheme not in SHARDINGS:
        raise ValueError(f"CP sharding must be one of {SHARDINGS}, got {scheme!r}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    m = num_chunks(cp_size)
    first = np.cumsum(lengths) - lengths  # every document's start in the sample
    unit = np.zeros(lengths.size, dtype=np.int64)
    if scheme != "sequence":
        unit = np.arange(lengths.size, dtype=np.int64)
    real = np.bincount(unit, weights=lengths, minlength=int(lengths.size > 0)).astype(np.int64)
    if scheme == "balanced":
        sizes = balanced_chunk_sizes(real, cp_size)
        have = rank_totals(sizes, cp_size)
        local = max(int(have.max(initial=0)), -(-pad_to // cp_size))
        if local * cp_size > int(real.sum()):  # top every rank up: its early chunk of a pad unit
            tail = np.zeros((1, m), dtype=np.int64)
            tail[0, :cp_size] = local - have
            sizes, real = np.concatenate([sizes, tail]), np.append(real, 0)
        flat = np.concatenate([[0], np.cumsum(sizes)])  # row-major: unit by unit, chunk by chunk
        bounds = flat[np.arange(real.size)[:, None] * m + np.arange(m + 1)]
    else:
        padded = real + padding_to_zigzag(real, cp_size)
        if pad_to > int(padded.sum()):
            padded, real = np.append(padded, pad_to - int(padded.sum())), np.append(real, 0)
        bounds = equal_chunk_bounds(np.concatenate([[0], np.cumsum(padded)]), cp_size)
    # a document starts where its unit does, after the unit's earlier documents (real tokens first)
    unit_first = (np.cumsum(real) - real)[unit]
    return UnitPlan(unit, real, bounds, bounds[unit, 0] + first - unit_first)


def work_per_rank(
    doc_lengths,
    cp_size: int,
    scheme: str = "balanced",
    linear: float = LINEAR_PAIRS_PER_TOKEN,
) -> tuple[np.ndarray, int]:
    """(work of each CP rank, padding tokens) of one packed sequence under ``scheme``.

    Work = allowed (query, key) pairs + ``linear`` per real token: a real token at position p of
    its document sees p + 1 keys; padding does no work (the kernels skip it; its linear work is
    the padding count). Vectorised over (document, chunk) pieces.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    plan = plan_units(lengths, cp_size, scheme)
    if lengths.size == 0:
        return np.zeros(cp_size), plan.padding
    start = plan.doc_start
    lo = np.maximum(start[:, None], plan.bounds[plan.unit, :-1])  # [docs, 2 CP] pieces
    hi = np.minimum((start + lengths)[:, None], plan.bounds[plan.unit, 1:])
    num = np.maximum(hi - lo, 0).astype(np.float64)
    work = num * (lo - start[:, None] + 1) + num * (num - 1) / 2 + num * linear
    owner = np.broadcast_to(chunk_owner(np.arange(num_chunks(cp_size)), cp_size), work.shape)
    return np.bincount(owner.ravel(), weights=work.ravel(), minlength=cp_size), plan.padding


def imbalance(work: np.ndarray) -> float:
    """max / min across ranks (inf if a rank has no work)."""
    low = float(np.min(work))
    return float(np.max(work)) / low if low > 0 else float("inf")
