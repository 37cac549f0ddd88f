"""Which DP rank and micro-batch runs which sample of a global batch: balanced by work, exact.

The global batch's set of samples is fixed by the mixture index (blending is exact at every
prefix, data/index.py); only *where* each sample runs is chosen here, so the token-averaged loss
and the mixture are unchanged by construction. The assignment is a pure, deterministic function
of the global batch's sample costs (ties broken by position), so a resume replays it bit for bit
and a DP-size change at fixed global batch still trains on the same samples per step.

Cost of a sample on a CP group = its slowest CP rank's work (``WorkModel``: attention pairs +
linear work per token under the stage's CP sharding, parallel/units.py); a DP rank's step cost is
the sum over its micro-batches. Samples are first dealt to micro-batches of ``b`` samples
(capacity-constrained LPT: longest processing time first, then swaps of one item of the heaviest
bin with one of a lighter bin while that lowers the maximum). ``assign_global_batch`` then gives
every DP rank the same number of micro-batches (megatron's sampler layout); ``assign_variable``
lets ranks take different numbers (one heavy micro-batch alone vs several light ones: LPT, then
moves and swaps), which is what balances a step when a rank gets only a few samples whose work
varies ~10x. The loss stays exact either way: gradients are summed over a rank's micro-batches
and divided by the global token count (``calculate_per_token_loss``), whatever the counts. With
fewer micro-batches than DP ranks nothing can be balanced; the bound is the heaviest micro-batch
over the mean (benchmarks/bench_balance.py prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_longctx.parallel.layout import num_micro_batches
from megatron_longctx.parallel.units import LINEAR_PAIRS_PER_TOKEN, work_per_rank


@dataclass(frozen=True)
class WorkModel:
    """Per-sample work under a CP sharding (see module docstring).

    Attributes:
        cp_size: context-parallel size.
        sharding: parallel/units.py SHARDINGS.
        linear: linear work of one token in attention pairs.
    """

    cp_size: int
    sharding: str = "balanced"
    linear: float = LINEAR_PAIRS_PER_TOKEN

    def sample(self, doc_lengths) -> tuple[np.ndarray, int]:
        """(work of each CP rank ``[cp]``, padding tokens) of one packed sample."""
        return work_per_rank(doc_lengths, self.cp_size, self.sharding, self.linear)


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


def _spread(cost: np.ndarray, num_bins: int, min_count: int, rounds: int = 256) -> np.ndarray:
    """Bin of every item, bins of any size >= ``min_count``: LPT, then the best single move or
    swap out of the heaviest bin while it lowers the maximum (deterministic)."""
    n = cost.size
    order = np.lexsort((np.arange(n), -cost))
    load = np.zeros(num_bins)
    count = np.zeros(num_bins, dtype=np.int64)
    bins = np.empty(n, dtype=np.int64)
    for left, i in zip(range(n, 0, -1), order):
        short = np.flatnonzero(count < min_count)
        cand = short if short.size >= left else np.arange(num_bins)  # fill every bin first
        b = cand[np.argmin(load[cand])]
        bins[i], load[b], count[b] = b, load[b] + cost[i], count[b] + 1
    for _ in range(rounds):
        hi = int(np.argmax(load))
        a = np.flatnonzero(bins == hi)
        best = (load[hi] * (1 - 1e-12), None)
        for lo in range(num_bins):
            if lo == hi:
                continue
            b = np.flatnonzero(bins == lo)
            if a.size > min_count:  # move one item hi -> lo
                new = np.maximum(load[hi] - cost[a], load[lo] + cost[a])
                k = int(np.argmin(new))
                if new[k] < best[0]:
                    best = (new[k], (lo, a[k], None))
            delta = cost[a][:, None] - cost[b][None, :]
            new = np.maximum(load[hi] - delta, load[lo] + delta)
            k = np.unravel_index(np.argmin(new), new.shape)
            if new[k] < best[0]:
                best = (new[k], (lo, a[k[0]], b[k[1]]))
        if best[1] is None:
            if not _repartition_pair(cost, bins, load, hi, min_count):
                break
            continue
        lo, i, j = best[1]
        moved = cost[i] - (cost[j] if j is not None else 0.0)
        bins[i] = lo
        if j is not None:
            bins[j] = hi
        load[hi] -= moved
        load[lo] += moved
    return bins


def _repartition_pair(cost, bins, load, hi: int, min_count: int, max_items: int = 14) -> bool:
    """Best split of the heaviest bin's and one lighter bin's items together (exhaustive over
    subsets, lightest partner first); True when it lowered the heavier of the two."""
    for lo in np.argsort(load, kind="stable"):
        if lo == hi:
            continue
        items = np.flatnonzero((bins == hi) | (bins == lo))
        if items.size > max_items:
            continue
        masks = np.arange(1 << items.size)
        member = (masks[:, None] >> np.arange(items.size)) & 1  # [2^n, n]: item in bin hi
        size = member.sum(1)
        ok = (size >= min_count) & (items.size - size >= min_count)
        a = member @ cost[items]
        worst = np.where(ok, np.maximum(a, load[hi] + load[lo] - a), np.inf)
        k = int(np.argmin(worst))  # ties: the smallest mask, deterministic
        if worst[k] < load[hi] * (1 - 1e-12):
            bins[items] = np.where(member[k] == 1, hi, lo)
            load[hi], load[lo] = a[k], load[hi] + load[lo] - a[k]
            return True
    return False


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


def assign_variable(
    cost, dp_size: int, micro_batch_size: int, min_micro_batches: int = 1
) -> list[np.ndarray]:
    """Like ``assign_global_batch``, but DP ranks may run different numbers of micro-batches.

    Args:
        cost: ``[G]`` cost of each sample of the global batch, in index order.
        dp_size: data-parallel size D. micro_batch_size: samples per micro-batch b.
        min_micro_batches: fewest micro-batches a rank may run (1; PP with interleaving needs
            >= PP, megatron's ``microbatch_group_size_per_vp_stage``).

    Returns:
        D int64 arrays ``[M_r, b]`` (sum of M_r = G / b, each M_r >= ``min_micro_batches``): a
        permutation of ``range(G)``; micro-batches in decreasing cost, samples in index order.
    """
    cost = np.asarray(cost, dtype=np.float64)
    g = cost.size
    num_mb = g // micro_batch_size if g % micro_batch_size == 0 else -1
    if num_mb < dp_size * min_micro_batches:
        raise ValueError(
            f"global batch {g} does not give DP {dp_size} x {min_micro_batches} micro-batches "
            f"of {micro_batch_size} samples"
        )
    mb_of = _lpt(cost, num_mb, micro_batch_size)
    mb_cost = np.bincount(mb_of, weights=cost, minlength=num_mb)
    rank_of = _spread(mb_cost, dp_size, min_micro_batches)
    out = []
    for r in range(dp_size):
        mbs = np.flatnonzero(rank_of == r)
        mbs = mbs[np.lexsort((mbs, -mb_cost[mbs]))]
        out.append(np.stack([np.flatnonzero(mb_of == mb) for mb in mbs]).astype(np.int64))
    return out


def dp_lower_bound(cost, dp_size: int, resolution: float = 1e-5) -> float:
    """A lower bound on (heaviest DP rank) / (mean DP rank) over every assignment of whole samples.

    The largest of three valid bounds: the heaviest sample; the smallest subset sum that reaches
    the mean (some rank carries at least the mean; subset sums enumerated exactly on a grid of
    ``resolution`` x mean, costs floored, which only lowers the bound, by at most
    ``G x resolution``); and ``_two_class_bound`` (how many samples of each size class fit on a
    rank, which catches "three long samples fill a rank, and nothing else fits beside them").
    """
    cost = np.asarray(cost, dtype=np.float64)
    mean = cost.sum() / dp_size
    if mean <= 0:
        return 1.0
    unit = mean * resolution
    k = np.floor(cost / unit).astype(np.int64)
    need = int(np.ceil(mean / unit)) - cost.size  # a subset reaching the mean has >= this
    top = need + int(k.max()) + 1
    reach = np.zeros(top + 1, dtype=bool)
    reach[0] = True
    for x in k[k > 0]:  # bitset subset-sum, capped just above the first sum >= need
        reach[x:] |= reach[: top + 1 - x].copy()
    first = need + int(np.argmax(reach[max(need, 0) :])) if reach[max(need, 0) :].any() else top
    bound = max(1.0, float(cost.max()) / mean, first * unit / mean)
    return max(bound, _two_class_bound(cost, dp_size, bound * mean) / mean)


def _two_class_bound(cost: np.ndarray, dp_size: int, low: float, rounds: int = 16) -> float:
    """A makespan no assignment beats, from rounding the costs down into two classes.

    Split the samples (sorted, heaviest first) after the k-th: the first k count as the k-th's
    cost, the rest as the lightest's. Rounding down only makes packing easier, so if the rounded
    samples cannot be packed into ``dp_size`` ranks of capacity T, neither can the real ones
    and the makespan exceeds T. Packing two classes is exact and small: a rank with p heavy
    samples holds at most floor((T - p s1) / s2) light ones (``_two_class_fits``). Bisection on
    T above ``low`` (a known bound), for the split points between cost clusters.
    """
    c = np.sort(cost)[::-1]
    n = c.size
    splits = [k for k in range(1, n) if c[k - 1] > c[k] * (1 + 1e-3)] or [n]
    best = low
    for k in splits[:64]:
        s1, n1, s2, n2 = c[k - 1], k, c[-1], n - k
        if _two_class_fits(s1, n1, s2, n2, dp_size, best):
            continue  # this split cannot raise the bound
        lo, hi = best, max(1.5 * best, float(c[0]))
        while not _two_class_fits(s1, n1, s2, n2, dp_size, hi):
            lo, hi = hi, 2 * hi
        for _ in range(rounds):  # largest T where the rounded samples do not fit
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if not _two_class_fits(s1, n1, s2, n2, dp_size, mid) else (lo, mid)
        best = max(best, lo)
    return best


def _two_class_fits(s1: float, n1: int, s2: float, n2: int, ranks: int, cap: float) -> bool:
    """Whether n1 items of size s1 and n2 of size s2 pack into ``ranks`` bins of size ``cap``:
    a DP over ranks of the most light items coverable for each count of heavy ones covered."""
    if s1 > cap or (n2 and s2 > cap):
        return n1 == 0 and n2 == 0
    per = np.arange(int(cap / s1 + 1e-9) + 1)  # heavy items a rank may hold (never too few)
    light = np.floor((cap - per * s1) / s2 + 1e-9) if s2 > 0 else np.full(per.size, n2)
    best = np.full(n1 + 1, -np.inf)
    best[0] = 0.0
    for _ in range(ranks):
        new = np.full(n1 + 1, -np.inf)
        for p, q in zip(per, light):
            np.maximum.at(new, np.minimum(np.arange(n1 + 1) + p, n1), best + q)
        best = new
    return bool(best[n1] >= n2)


def megatron_order(global_batch: int, dp_size: int, micro_batch_size: int) -> np.ndarray:
    """megatron's MegatronPretrainingSampler layout as ``[D, M, b]`` positions (no balancing)."""
    m = num_micro_batches(global_batch, micro_batch_size, dp_size)
    return np.arange(global_batch).reshape(m, dp_size, micro_batch_size).transpose(1, 0, 2)


def step_balance(cp_work: np.ndarray, padding, tokens, order: np.ndarray) -> dict[str, float]:
    """Balance figures of one step (the telemetry; module docstring defines the costs).

    Args:
        cp_work: ``[G, CP]`` work of every CP rank on every sample of the global batch.
        padding: ``[G]`` padding tokens of each sample; tokens: ``[G]`` real tokens.
        order: ``[D, M, b]`` assignment (``assign_global_batch`` or ``megatron_order``), or
            D arrays ``[M_r, b]`` (``assign_variable``).

    Returns:
        ``cp_work_max_over_mean``: worst DP rank's sum over micro-batches of max CP work over the
        sum of mean CP work; ``cp_work_max_over_min``: its most over its least loaded CP rank
        (totals over the step); ``dp_work_max_over_mean``: the heaviest DP rank's step cost
        over the mean; ``padding_share``: padding / (real + padding) tokens.
    """
    cp_work = np.asarray(cp_work, dtype=np.float64)
    per_rank = [cp_work[np.asarray(o).reshape(-1)] for o in order]  # D x [M_r*b, CP]
    slow = np.array([w.max(axis=1).sum() for w in per_rank])  # step cost of each DP rank
    mean = np.array([w.mean(axis=1).sum() for w in per_rank])
    totals = np.stack([w.sum(axis=0) for w in per_rank])  # [D, CP]
    pad, real = float(np.sum(padding)), float(np.sum(tokens))
    return {
        "cp_work_max_over_mean": float((slow / np.maximum(mean, 1e-30)).max()),
        "cp_work_max_over_min": float((totals.max(1) / np.maximum(totals.min(1), 1e-30)).max()),
        "dp_work_max_over_mean": float(slow.max() / max(slow.mean(), 1e-30)),
        "padding_share": pad / max(pad + real, 1.0),
    }
