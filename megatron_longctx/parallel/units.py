"""CP sharding units: which consecutive documents of a packed sequence are zigzagged together.

A *unit* is a run of consecutive documents that the CP layout treats as one zigzag sequence: it is
padded at its end to a multiple of 2 x CP, cut into 2 x CP chunks, and rank r keeps chunks r and
2 CP - 1 - r (parallel/cp_split.py). ``cu_seqlens`` of the padded batch are the unit boundaries
(what megatron's THD RoPE and ``cp_split`` see); the document boundaries inside units travel as
``cu_docs`` so that attention never crosses a document (model/attention/blocks.py).

Schemes (``SHARDINGS``):

* ``"document"``: every document is its own unit (per-document zigzag; the only layout Transformer
  Engine's THD CP attention accepts). Exact balance for long documents, but every short
  document's padding lands in its last chunk (rank 0's late chunk) and short-only samples are
  unbalanced at large CP (benchmarks/bench_balance.py).
* ``"sequence"``: the whole sample is one unit (megatron's whole-sequence zigzag): almost no
  padding, but the rank holding a long document's late chunk does most of its attention.
* ``"adaptive"`` (default): per sample, the most even of a few candidate layouts (total work =
  attention pairs + linear work per token, the perf model's ratio, across CP ranks), subject to
  padding <= ``max_padding`` (WLB-LLM's per-document vs per-sequence rule, made per sample and
  exact). For each threshold T among (0, 2 CP x 2^k, infinity): (i) documents of at least T
  tokens are their own unit and all shorter ones form one unit, shortest first; (ii) the same,
  but every long document is led by the fewest tokens of short documents that make its unit a
  multiple of 2 x CP (``_filled_units``): its unit then needs no padding, which otherwise always
  lands on rank 0 (it holds both ends of every unit), and a prefix of ell tokens moves only
  ~ell^2/2 attention pairs to the ranks holding the unit's first chunks. Units are padded at
  their start (``PAD_FIRST``). Plans are cached per document-length vector.

Everything is numpy, per (document, chunk) piece: a 512K-token sample costs well under 1 ms/plan.
"""

from __future__ import annotations

import functools

import numpy as np

from megatron_longctx.parallel.zigzag import chunk_owner, num_chunks, padding_to_zigzag

SHARDINGS = ("adaptive", "document", "sequence")

#: where each scheme pads a unit: "adaptive" pads at the unit's start. Rank 0 holds both ends of
#: every unit (chunks 0 and 2 CP - 1), so padding always costs rank 0 tokens; at the start it costs
#: only their linear work (every later token moves by the same offset, which shifts work evenly),
#: at the end also the attention of the unit's last, most expensive, tokens. "document" keeps
#: the real tokens first (Transformer Engine's THD convention) and "sequence" megatron's layout.
PAD_FIRST = {"adaptive": True, "document": False, "sequence": False}

#: matmul work of one token in attention score pairs at Llama-3-8B's shape (N_matmul / (2 L d_q));
#: the perf model's ratio (perf/flops.py), used to weigh linear against attention work.
LINEAR_PAIRS_PER_TOKEN = 28_600.0

#: padding budget of the adaptive rule, as a fraction of a sample's real tokens.
MAX_PADDING = 0.005

#: the adaptive rule tries filling long units with short documents (``_filled_units``) only
#: when at most this many documents are long (each costs a small knapsack).
MAX_FILLED = 64


def plan_units(
    doc_lengths,
    cp_size: int,
    scheme: str = "adaptive",
    *,
    linear: float = LINEAR_PAIRS_PER_TOKEN,
    max_padding: float = MAX_PADDING,
) -> tuple[np.ndarray, np.ndarray]:
    """The layout of one packed sequence: document order and the unit of each position.

    Args:
        doc_lengths: real lengths of the documents of one packed sequence, in order.
        cp_size: context-parallel size.
        scheme: one of SHARDINGS.
        linear: linear work of one token in attention pairs (adaptive rule only).
        max_padding: padding budget as a fraction of real tokens (adaptive rule only).

    Returns:
        ``(order, unit)``: ``order[k]`` is the document placed k-th (a permutation; identity for
        "document" and "sequence"), ``unit[k]`` its unit (non-decreasing from 0). Reordering
        documents inside a sample is exact: attention never crosses a document, and each
        document moves with its labels and loss mask.
    """
    if scheme not in SHARDINGS:
        raise ValueError(f"CP sharding must be one of {SHARDINGS}, got {scheme!r}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    n = lengths.size
    identity = np.arange(n, dtype=np.int64)
    if scheme == "document" or n <= 1:
        return identity, identity.copy()
    if scheme == "sequence":
        return identity, np.zeros(n, dtype=np.int64)
    # shortest first: the grouped unit's work per chunk then grows along the unit, close to the
    # linear ramp of one document that the zigzag pairing (chunk j with 2 CP - 1 - j) balances
    order, unit = _cached_plan(lengths.tobytes(), cp_size, float(linear), float(max_padding))
    return order.copy(), unit.copy()


@functools.lru_cache(maxsize=8192)
def _cached_plan(key: bytes, cp_size: int, linear: float, max_padding: float):
    """The adaptive plan of one document-length vector (cached: the loader's work model and the
    batch's CP split plan the same samples; callers must not modify the returned arrays)."""
    lengths = np.frombuffer(key, dtype=np.int64)
    sort = np.argsort(lengths, kind="stable")
    best, best_key = None, None
    total = max(int(lengths.sum()), 1)
    seen = set()
    for threshold in _thresholds(lengths[sort], cp_size):
        num_long = int(np.count_nonzero(lengths >= threshold))
        if num_long in seen:  # the same documents are long: the same candidates
            continue
        seen.add(num_long)
        candidates = [(sort, _threshold_units(lengths[sort], threshold))]
        if 0 < num_long <= MAX_FILLED:
            candidates.append(_filled_units(lengths, sort, threshold, num_chunks(cp_size)))
        for order, unit in candidates:
            ordered = lengths[order]
            work = work_per_rank(ordered, unit, cp_size, linear, pad_first=True)
            pad = padding_tokens(ordered, unit, cp_size) / total
            ratio = float(work.max() / work.min()) if work.min() > 0 else np.inf
            key = (pad > max_padding, round(ratio, 5), pad)
            if best_key is None or key < best_key:
                best, best_key = (order, unit), key
    return best


def _thresholds(lengths: np.ndarray, cp_size: int) -> list[float]:
    m = num_chunks(cp_size)
    top = int(lengths.max())
    out, t = [0.0], float(m)
    while t <= top:
        out.append(t)
        t *= 2
    return out + [np.inf]


def _threshold_units(lengths: np.ndarray, threshold: float) -> np.ndarray:
    """Documents >= threshold alone; each maximal run of shorter ones together."""
    long = lengths >= threshold
    # a new unit starts at every long document and at the first short document after a long one
    starts = long.copy()
    starts[1:] |= long[:-1]
    starts[0] = True
    return np.cumsum(starts) - 1


def _filled_units(lengths, sort, threshold: float, m: int, pool_size: int = 24):
    """Documents >= threshold alone, each led by the fewest tokens of short documents that make
    its unit a multiple of ``m`` = 2 x CP (no padding; a short prefix of ell tokens shifts the
    document's zigzag by ~ell^2/2 pairs on rank 0's side only); the other short documents form
    one unit, shortest first. ``(order, unit)`` like ``plan_units``."""
    is_long = lengths[sort] >= threshold
    pool = [int(d) for d in sort[~is_long]]  # short documents, shortest first
    units = []
    for d in sort[is_long][::-1]:  # longest first
        need = int(-lengths[d] % m)
        prefix = _residue_subset(lengths, pool[:pool_size], need, m) if need else []
        taken = set(prefix)
        pool = [x for x in pool if x not in taken]
        units.append(sorted(prefix, key=lambda x: (lengths[x], x)) + [int(d)])
    units = ([pool] if pool else []) + units
    order = np.array([d for u in units for d in u], dtype=np.int64)
    unit = np.repeat(np.arange(len(units)), [len(u) for u in units]).astype(np.int64)
    return order, unit


def _residue_subset(lengths, pool: list[int], need: int, m: int) -> list[int]:
    """The fewest-token subset of ``pool`` (ascending lengths) whose length is ``need`` mod m ([]
    if none): the shortest fitting single document or pair when no larger subset can be shorter,
    else a 0/1 knapsack over residues."""
    n = lengths[pool] if pool else np.zeros(0, dtype=np.int64)
    r = n % m
    big = np.iinfo(np.int64).max
    single = np.where(r == need, n, big)
    pair = np.where(((r[:, None] + r[None, :]) % m == need) & _upper(n.size), n[:, None] + n, big)
    if n.size and min(single.min(), pair.min()) <= n[: min(3, n.size)].sum():
        # no subset of three or more can be shorter than the three shortest documents
        if single.min() <= pair.min():
            return [pool[int(np.argmin(single))]]
        i, j = np.unravel_index(int(np.argmin(pair)), pair.shape)
        return [pool[int(i)], pool[int(j)]]
    best = np.full(m, np.inf)
    best[0] = 0.0
    took = np.zeros((len(pool), m), dtype=bool)
    for k, d in enumerate(pool):
        n = int(lengths[d])
        cand = np.roll(best, n % m) + n  # residue (r + n) % m from residue r
        better = cand < best
        took[k] = better
        best = np.where(better, cand, best)
    if not np.isfinite(best[need]):
        return []
    out, r = [], need
    for k in range(len(pool) - 1, -1, -1):  # walk back: item k was taken at residue r
        if took[k, r]:
            out.append(pool[k])
            r = (r - int(lengths[pool[k]])) % m
    return out


@functools.lru_cache(maxsize=64)
def _upper(n: int) -> np.ndarray:
    return np.triu(np.ones((n, n), dtype=bool), 1)


def padding_tokens(doc_lengths, unit: np.ndarray, cp_size: int) -> int:
    """Tokens added by padding every unit to a multiple of 2 x CP."""
    real = np.bincount(unit, weights=doc_lengths).astype(np.int64)
    return int(padding_to_zigzag(real, cp_size).sum())


def work_per_rank(
    doc_lengths,
    unit: np.ndarray,
    cp_size: int,
    linear: float = LINEAR_PAIRS_PER_TOKEN,
    pad_first: bool = False,
) -> np.ndarray:
    """Work of each CP rank: allowed (query, key) pairs + ``linear`` per real token.

    A real token at position p of its document sees p + 1 keys; padding does no work (the
    kernels skip it; its linear work is counted by ``padding_tokens``). ``pad_first``: each
    unit's padding precedes its documents instead of following them. Vectorised over (document,
    chunk) pieces.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    m = num_chunks(cp_size)
    if lengths.size == 0:
        return np.zeros(cp_size)
    real = np.bincount(unit, weights=lengths).astype(np.int64)
    chunk = (real + (-real) % m) // m
    ends = np.cumsum(lengths)
    unit_start = np.concatenate([[0], np.cumsum(real)[:-1]])
    a = ends - lengths - unit_start[unit]  # in-unit start of each document
    if pad_first:  # the unit's padding precedes its documents
        a = a + ((-real) % m)[unit]
    b = a + lengths
    c = chunk[unit]
    keep = lengths > 0
    a, b, c, lengths = a[keep], b[keep], c[keep], lengths[keep]
    first, last = a // c, (b - 1) // c
    count = last - first + 1
    doc = np.repeat(np.arange(a.size), count)
    j = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + first[doc]
    lo = np.maximum(a[doc], j * c[doc])
    hi = np.minimum(b[doc], (j + 1) * c[doc])
    num = hi - lo
    work = num * (lo - a[doc] + 1) + num * (num - 1) / 2 + num * linear
    rank = chunk_owner(j, cp_size)
    return np.bincount(rank, weights=work, minlength=cp_size)


def imbalance(work: np.ndarray) -> float:
    """max / min across ranks (inf if a rank has no work)."""
    low = float(np.min(work))
    return float(np.max(work)) / low if low > 0 else float("inf")
