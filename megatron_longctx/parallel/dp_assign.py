"""Which DP rank and micro-batch runs which sample of a global batch: balanced by work, exact.

The global batch's set of samples is fixed by the mixture index (blending is exact at every
prefix, data/index.py); only *where* each sample runs is chosen here, so the token-averaged loss
and the mixture are unchanged by construction. The assignment is a pure, deterministic function
of the global batch's sample costs (ties broken by position), so a resume replays it bit for bit
and a DP-size change at fixed global batch still trains on the same samples per step.

Cost of a sample on a CP group = its slowest CP rank's work (``WorkModel``: attention pairs +
linear work per token under the stage's CP sharding, parallel/units.py); a DP rank's step cost is
the sum over its micro-batches. Two capacity-constrained LPT passes (longest processing time
first, then swaps of one item of the heaviest bin with one of a lighter bin while that lowers the
maximum): samples -> micro-batches of
``b`` samples, micro-batches -> DP ranks (each gets the same number, as megatron's schedules
need). With one sample per DP rank nothing can be balanced: the step is as slow as its heaviest
sample (benchmarks/bench_balance.py prints that bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_longctx.parallel.layout import num_micro_batches
from megatron_longctx.parallel.units import (
    LINEAR_PAIRS_PER_TOKEN,
    PAD_FIRST,
    padding_tokens,
    plan_units,
    work_per_rank,
)


@dataclass(frozen=True)
class WorkModel:
    """Per-sample work under a CP sharding (see module docstring).

    Attributes:
        cp_size: context-parallel size.
        sharding: parallel/units.py SHARDINGS.
        linear: linear work of one token in attention pairs.
    """

    cp_size: int
    sharding: str = "adaptive"
    linear: float = LINEAR_PAIRS_PER_TOKEN

    def sample(self, doc_lengths) -> tuple[np.ndarray, int]:
        """(work of each CP rank ``[cp]``, padding tokens) of one packed sample."""
        order, unit = plan_units(doc_lengths, self.cp_size, self.sharding, linear=self.linear)
        ordered = np.asarray(doc_lengths, dtype=np.int64)[order]
        return (
            work_per_rank(ordered, unit, self.cp_size, self.linear, PAD_FIRST[self.sharding]),
            padding_tokens(ordered, unit, self.cp_size),
        )


def _lpt(cost: np.ndarray, num_bins: int, capacity: int, swaps: int = 64) -> np.ndarray:
    """Bin of every item: capacity-constrained LPT, then improving swaps (deterministic)."""
    n = cost.size
    order = np.lexsort((np.arange(n), -cost))  # heaviest first, ties by position
    load = np.zeros(num_bins)
    count = np.zeros(num_bins, dtype=np.int64)
    bins = np.empty(n, dtype=np.int64)
    for i in order:
        open_ = np.flatnonzero(count < capacity)
        b = open_[np.argmin(load[open_])]
        bins[i] = b
        load[b] += cost[i]
        count[b] += 1
    for _ in range(swaps):  # swap one item of the heaviest bin with one of a lighter bin
        hi = int(np.argmax(load))
        a = np.flatnonzero(bins == hi)
        moved = False
        for lo in np.argsort(load, kind="stable"):
            if lo == hi:
                break
            b = np.flatnonzero(bins == lo)
            delta = cost[a][:, None] - cost[b][None, :]  # moving a -> lo and b -> hi
            new_max = np.maximum(load[hi] - delta, load[lo] + delta)
            best = np.unravel_index(np.argmin(new_max), new_max.shape)
            if new_max[best] < load[hi] - 1e-9 * max(load[hi], 1.0):
                i, j = a[best[0]], b[best[1]]
                bins[i], bins[j] = lo, hi
                load[hi] -= delta[best]
                load[lo] += delta[best]
                moved = True
                break
        if not moved:
            break
    return bins


def assign_global_batch(cost, dp_size: int, micro_batch_size: int) -> np.ndarray:
    """Positions (within the global batch) run by each DP rank and micro-batch.

    Args:
        cost: ``[G]`` cost of each sample of the global batch, in index order.
        dp_size: data-parallel size D. micro_batch_size: samples per micro-batch b.

    Returns:
        int64 ``[D, M, b]`` (M = G / (b D)): a permutation of ``range(G)``; micro-batches of a
        rank in decreasing cost, samples of a micro-batch in index order.
    """
    cost = np.asarray(cost, dtype=np.float64)
    g = cost.size
    per_rank = num_micro_batches(g, micro_batch_size, dp_size)
    num_mb = per_rank * dp_size
    mb_of = _lpt(cost, num_mb, micro_batch_size)
    mb_cost = np.bincount(mb_of, weights=cost, minlength=num_mb)
    rank_of = _lpt(mb_cost, dp_size, per_rank)
    out = np.empty((dp_size, per_rank, micro_batch_size), dtype=np.int64)
    for r in range(dp_size):
        mbs = np.flatnonzero(rank_of == r)
        mbs = mbs[np.lexsort((mbs, -mb_cost[mbs]))]
        for m, mb in enumerate(mbs):
            out[r, m] = np.flatnonzero(mb_of == mb)
    return out


def megatron_order(global_batch: int, dp_size: int, micro_batch_size: int) -> np.ndarray:
    """megatron's MegatronPretrainingSampler layout as ``[D, M, b]`` positions (no balancing)."""
    m = num_micro_batches(global_batch, micro_batch_size, dp_size)
    return np.arange(global_batch).reshape(m, dp_size, micro_batch_size).transpose(1, 0, 2)


def step_balance(cp_work: np.ndarray, padding, tokens, order: np.ndarray) -> dict[str, float]:
    """Balance figures of one step (the telemetry; module docstring defines the costs).

    Args:
        cp_work: ``[G, CP]`` work of every CP rank on every sample of the global batch.
        padding: ``[G]`` padding tokens of each sample; tokens: ``[G]`` real tokens.
        order: ``[D, M, b]`` assignment (``assign_global_batch`` or ``megatron_order``).

    Returns:
        ``cp_work_max_over_mean``: worst DP rank's sum over micro-batches of max CP work over the
        sum of mean CP work; ``cp_work_max_over_min``: its most over its least loaded CP rank
        (totals over the step); ``dp_work_max_over_mean``: the heaviest DP rank's step cost
        over the mean; ``padding_share``: padding / (real + padding) tokens.
    """
    cp_work = np.asarray(cp_work, dtype=np.float64)
    per_rank = cp_work[order.reshape(order.shape[0], -1)]  # [D, M*b, CP]
    slow = per_rank.max(axis=2).sum(axis=1)  # step cost of each DP rank
    mean = per_rank.mean(axis=2).sum(axis=1)
    totals = per_rank.sum(axis=1)  # [D, CP]
    pad, real = float(np.sum(padding)), float(np.sum(tokens))
    return {
        "cp_work_max_over_mean": float((slow / np.maximum(mean, 1e-30)).max()),
        "cp_work_max_over_min": float((totals.max(1) / np.maximum(totals.min(1), 1e-30)).max()),
        "dp_work_max_over_mean": float(slow.max() / max(slow.mean(), 1e-30)),
        "padding_share": pad / max(pad + real, 1.0),
    }
