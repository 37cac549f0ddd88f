"""Balanced DP / micro-batch assignment (parallel/dp_assign.py) and the balance telemetry.

* the assignment is a permutation of the global batch, deterministic, and as good as the best
  assignment found by brute force on small cases (within LPT's bound); with variable counts
  (``assign_variable``) ranks take different numbers of micro-batches when that lowers the
  maximum, every rank keeps >= ``min_micro_batches``, and ``dp_lower_bound`` never exceeds the
  brute-force optimum;
* the balanced loader: the global batch's set of samples is megatron's; resume after 40 steps
  yields the same next batches on every DP rank; DP 2 -> DP 1 keeps each step's samples;
* ``step_balance`` equals a hand computation on a small example.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.parallel.dp_assign import (
    WorkModel,
    assign_global_batch,
    assign_variable,
    dp_lower_bound,
    megatron_order,
    step_balance,
)
from tests.unit.test_loader import GB, MBS, build, corpus  # noqa: F401  (fixture)


@pytest.mark.parametrize("dp,b", [(4, 1), (2, 2), (2, 1), (1, 4)])
def test_assignment_is_a_deterministic_permutation(dp, b):
    rng = np.random.default_rng(dp * 10 + b)
    cost = rng.lognormal(0, 0.5, size=8 * dp * b)
    order = assign_global_batch(cost, dp, b)
    assert order.shape == (dp, 8, b)
    assert sorted(order.ravel().tolist()) == list(range(cost.size))
    assert np.array_equal(order, assign_global_batch(cost.copy(), dp, b))
    loads = cost[order.reshape(dp, -1)].sum(1)
    default = cost[megatron_order(cost.size, dp, b).reshape(dp, -1)].sum(1)
    assert loads.max() <= default.max() + 1e-12


def test_assignment_near_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    for _ in range(5):
        cost = rng.integers(1, 50, size=8).astype(float)
        best = min(
            max(cost[list(a)].sum(), cost[[i for i in range(8) if i not in a]].sum())
            for a in itertools.combinations(range(8), 4)
        )
        got = cost[assign_global_batch(cost, 2, 1).reshape(2, -1)].sum(1).max()
        assert got <= best * (4 / 3), (got, best)  # LPT's bound; swaps usually reach best
    with pytest.raises(ValueError, match="not divisible by DP 3"):
        assign_global_batch(np.ones(8), 3, 1)


def _brute_force(cost, dp, min_count=1):
    """Smallest possible heaviest-rank load over every assignment of items to ranks."""
    best = np.inf
    for a in itertools.product(range(dp), repeat=cost.size):
        counts = np.bincount(a, minlength=dp)
        if counts.min() >= min_count:
            best = min(best, np.bincount(a, weights=cost, minlength=dp).max())
    return best


@pytest.mark.parametrize("dp,b,min_count", [(2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_variable_assignment_permutation_optimum_and_bound(dp, b, min_count):
    rng = np.random.default_rng(dp * 7 + b + min_count)
    for _ in range(4):
        cost = np.round(rng.lognormal(0, 1.0, size=4 * dp * b if dp < 3 else 6), 3)
        order = assign_variable(cost, dp, b, min_count)
        assert len(order) == dp and all(o.shape[1] == b for o in order)
        assert all(o.shape[0] >= min_count for o in order)
        flat = np.concatenate([o.ravel() for o in order])
        assert sorted(flat.tolist()) == list(range(cost.size))
        again = assign_variable(cost.copy(), dp, b, min_count)
        assert all(np.array_equal(x, y) for x, y in zip(order, again))
        got = max(cost[o.ravel()].sum() for o in order)
        equal = cost[assign_global_batch(cost, dp, b).reshape(dp, -1)].sum(1).max()
        assert got <= equal + 1e-12
        best = _brute_force(cost, dp, min_count * b) if b == 1 else None
        if best is not None:
            assert got <= best * 1.05 + 1e-12, (got, best)  # LPT + moves + exhaustive re-splits
            bound = dp_lower_bound(cost, dp) * cost.sum() / dp
            assert bound <= best + 1e-9, (bound, best)
    # a heavy sample alone, the light ones together: counts differ and the max is the heavy one
    order = assign_variable(np.array([10.0, 1, 1, 1, 1, 1, 1, 1]), 2, 1)
    assert sorted(len(o) for o in order) == [1, 7]
    assert dp_lower_bound(np.array([10.0, 1, 1, 1, 1, 1, 1, 1]), 2) == pytest.approx(10 / 8.5)
    # four 5s on three ranks: two share one (10 / mean 8), which no subset-sum argument sees
    assert dp_lower_bound(np.array([5.0, 5, 5, 5, 4]), 3) == pytest.approx(10 / 8, rel=1e-4)
    with pytest.raises(ValueError, match="DP 3 x 3 micro-batches"):
        assign_variable(np.ones(8), 3, 1, 3)


def test_two_class_bound_is_valid_and_sees_what_subset_sums_miss():
    """Long samples in a cluster and short ones in another (the 64K DP 16 shape): the bound
    never exceeds the brute-force optimum, and it is tight where the subset-sum bound is not."""
    from megatron_longctx.parallel.dp_assign import _two_class_bound

    rng = np.random.default_rng(5)
    raised = 0
    for _ in range(30):
        dp = int(rng.integers(2, 4))
        cost = np.concatenate(
            [rng.uniform(0.30, 0.32, int(rng.integers(3, 6))), rng.uniform(0.14, 0.16, 4)]
        )
        best = _brute_force(cost, dp)
        mean = cost.sum() / dp
        got = dp_lower_bound(cost, dp) * mean
        assert got <= best + 1e-9, (cost, got, best)
        raised += _two_class_bound(cost, dp, mean) > max(cost.max(), mean) * (1 + 1e-6)
    assert raised > 0


def _loader(index, dp_rank, dp, consumed=0, linear=28_600.0, mbs=MBS):
    work = WorkModel(2, "balanced", linear)
    return MixtureLoader(index, GB, mbs, dp_rank, dp, consumed, work=work)


def _step(loader):
    return [next(loader) for _ in range(loader.num_micro_batches)]


@pytest.mark.parametrize("linear", [28_600.0, 0.0])
def test_balanced_loader_variable_counts_keep_steps_and_resume(corpus, linear):  # noqa: F811
    """Attention-only work (linear 0) makes samples' costs differ enough for ranks to take
    different numbers of micro-batches; each step still holds megatron's samples once, and a
    resume after 40 steps continues identically on every rank."""
    index = build(corpus)
    dp = 2
    plain = MixtureLoader(index, GB, MBS, 0, 1)
    counts = set()
    loaders = [_loader(index, r, dp, linear=linear, mbs=1) for r in range(dp)]
    for step in range(12):
        want = sorted(s for _ in range(GB // MBS) for s in next(plain)["sample_index"].tolist())
        got, per = [], []
        for loader in loaders:
            mbs = _step(loader)
            per.append(len(mbs))
            got += [s for m in mbs for s in m["sample_index"].tolist()]
        assert sorted(got) == want
        counts.add(tuple(per))
        assert {loader.consumed_samples for loader in loaders} == {(step + 1) * GB}
    if linear == 0.0:
        assert any(len(set(c)) > 1 for c in counts), counts  # ranks ran different counts
    for rank in range(dp):
        through = _loader(index, rank, dp, linear=linear, mbs=1)
        for _ in range(40):
            _step(through)
        consumed = through.consumed_samples
        resumed = _loader(index, rank, dp, consumed=consumed, linear=linear, mbs=1)
        assert through.consumed_samples == 40 * GB
        for _ in range(3):
            a, b = _step(through), _step(resumed)
            assert len(a) == len(b)
            for x, y in zip(a, b):
                for key in ("tokens", "labels", "loss_mask", "cu_seqlens", "sample_index"):
                    assert (x[key] == y[key]).all(), key
            assert through.step_balance() == resumed.step_balance()


def test_balanced_loader_keeps_each_step_and_resumes_exactly(corpus):  # noqa: F811
    index = build(corpus)
    dp = 2
    steps_per_gb = GB // (MBS * dp)
    plain = MixtureLoader(index, GB, MBS, 0, 1)
    for step in range(3):  # every global batch holds megatron's samples, each exactly once
        want = sorted(s for _ in range(GB // MBS) for s in next(plain)["sample_index"].tolist())
        got = []
        for rank in range(dp):
            loader = _loader(index, rank, dp, consumed=step * GB)
            for _ in range(steps_per_gb):
                got += next(loader)["sample_index"].tolist()
        assert sorted(got) == want
    one = _loader(index, 0, 1)
    assert sorted(
        one.__next__()["sample_index"].tolist()
        + [s for _ in range(GB // MBS - 1) for s in next(one)["sample_index"].tolist()]
    ) == list(range(GB))  # DP 1: the same set
    for rank in range(dp):  # resume after 40 steps == running through
        through = _loader(index, rank, dp)
        for _ in range(40 * steps_per_gb):
            next(through)
        resumed = _loader(index, rank, dp, consumed=through.consumed_samples)
        for _ in range(2 * steps_per_gb):
            a, b = next(through), next(resumed)
            for key in ("tokens", "labels", "loss_mask", "cu_seqlens", "sample_index"):
                assert (a[key] == b[key]).all(), key
        assert through.step_balance() == resumed.step_balance()
        assert set(through.step_balance()) == {
            "cp_work_max_over_mean",
            "cp_work_max_over_min",
            "dp_work_max_over_mean",
            "padding_share",
        }


def test_step_balance_equals_hand_computation():
    # 4 samples, CP 2, DP 2, b 1; rank 0 runs samples 0, 3 and rank 1 runs 1, 2
    cp_work = np.array([[10.0, 6.0], [4.0, 4.0], [3.0, 5.0], [8.0, 8.0]])
    order = np.array([[[0], [3]], [[1], [2]]])
    got = step_balance(cp_work, padding=[2, 0, 1, 1], tokens=[30, 30, 30, 30], order=order)
    # rank 0: slowest CP ranks 10 + 8 = 18, mean CP work 8 + 8 = 16; totals (18, 14)
    # rank 1: 4 + 5 = 9, mean 4 + 4 = 8; totals (7, 9)
    assert got["cp_work_max_over_mean"] == pytest.approx(18 / 16)
    assert got["cp_work_max_over_min"] == pytest.approx(max(18 / 14, 9 / 7))
    assert got["dp_work_max_over_mean"] == pytest.approx(18 / 13.5)
    assert got["padding_share"] == pytest.approx(4 / 124)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_work_model_is_the_layout_the_batch_is_split_with(cp):
    """The telemetry's per-rank work (``WorkModel.sample``) counted by brute force over the
    tokens each rank really holds after ``to_model_batch``'s padding (same linear weight)."""
    rng = np.random.default_rng(cp)
    linear = 7.0
    for sharding in ("balanced", "document", "sequence"):
        _brute_force_work(rng, cp, linear, sharding)


def _brute_force_work(rng, cp, linear, sharding):
    import torch

    from megatron_longctx.parallel.cp_split import pad_documents_for_cp, rank_token_index

    for _ in range(5):
        lengths = rng.integers(1, 60, size=int(rng.integers(2, 9))).tolist()
        lengths[-1] += (-sum(lengths)) % (2 * cp)  # the packer's sequence: a multiple of 2 CP
        s = sum(lengths)
        cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
        ones = torch.ones(1, s, dtype=torch.long)
        batch = dict(
            tokens=ones, labels=ones, loss_mask=ones.float(), position_ids=ones, cu_seqlens=cu
        )
        padded = pad_documents_for_cp(batch, cp, sharding=sharding)
        pos = torch.full((padded["tokens"].shape[1],), -1)  # position in document, -1 = padding
        for a, b in padded["doc_spans"].tolist():
            pos[a:b] = torch.arange(b - a)
        want = []
        for r in range(cp):
            p = pos[rank_token_index(padded["cu_seqlens"], cp, r, padded.get("cp_chunks"))]
            p = p[p >= 0].double()
            want.append(float((p + 1).sum() + linear * p.numel()))
        got, pads = WorkModel(cp, sharding, linear).sample(lengths)
        assert got.tolist() == pytest.approx(want)
        assert pads == padded["tokens"].shape[1] - s
