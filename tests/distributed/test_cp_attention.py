"""Ring and all-to-all CP attention on gloo vs a single-process dense reference (fp64, mask).

Each case packs documents (padded per document to a multiple of 2 x CP), splits q/k/v with the
zigzag-within-documents rule, runs the CP attention on every rank, and reassembles outputs and
q/k/v gradients in the parent process for comparison.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.model.attention.kernel_torch import TokenMeta, dense_reference
from megatron_longctx.parallel.cp_split import rank_token_index, rank_token_layout
from tests.harness import run_distributed

HQ, HK, D = 8, 4, 8
SCALE = D**-0.5


def _padded_cu(real_lengths: list[int], cp: int, pad_doc: int = 0):
    """(cu_padded, cu_real) for documents of these real lengths (+ an optional padding-only doc)."""
    multiple = 2 * cp
    cu_p, cu_r = [0], [0]
    for n in real_lengths:
        cu_p.append(cu_p[-1] + n + (-n) % multiple)
        cu_r.append(cu_r[-1] + n)
    if pad_doc:
        cu_p.append(cu_p[-1] + pad_doc * multiple)
        cu_r.append(cu_r[-1])
    return cu_p, cu_r


def _cases(cp: int) -> dict[str, tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(cp)
    random_lengths = torch.randint(1, 40, (6,), generator=g).tolist()
    return {
        "random": _padded_cu(random_lengths, cp),
        "shorter_than_chunk": _padded_cu([1, 2, 3, 1, 2 * cp + 1], cp),
        "one_doc_all_ranks": _padded_cu([16 * cp - 3], cp),
        # every document's real tokens fit in chunk 0 (held by rank 0): ranks 1.. hold only padding
        "fully_padded_rank": ([0, 8 * cp, 16 * cp, 20 * cp], [0, 4, 7, 7]),
    }


def _global_inputs(total: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(total, HK, D, generator=g, dtype=torch.float64)
    v = torch.randn(total, HK, D, generator=g, dtype=torch.float64)
    w = torch.randn(total, HQ, D, generator=g, dtype=torch.float64)
    return q, k, v, w


def _global_meta(cu_p, cu_r) -> TokenMeta:
    lay = rank_token_layout(cu_p, cu_r, 1, 0)  # CP 1: the plain padded order
    return TokenMeta(lay.doc, lay.pos, lay.valid)


def _worker(rank, world, cases, modes):
    import torch.distributed as dist

    from megatron_longctx.model.attention.a2a import a2a_attention
    from megatron_longctx.model.attention.ring import ring_attention

    group = dist.group.WORLD
    results = {}
    for name, (cu_p, cu_r) in cases.items():
        q, k, v, w = (x.float() for x in _global_inputs(cu_p[-1], seed=len(name)))
        idx = rank_token_index(cu_p, world, rank)
        lays = [rank_token_layout(cu_p, cu_r, world, r) for r in range(world)]
        metas = [TokenMeta(lay.doc, lay.pos, lay.valid) for lay in lays]
        for mode in modes:
            ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
            if mode == "ring":
                out = ring_attention(
                    ql, kl, vl, metas, lays[rank].early, lays[rank].late, SCALE, group
                )
            else:
                out = a2a_attention(ql, kl, vl, metas, SCALE, group)
            (out * w[idx]).sum().backward()
            results[(name, mode)] = [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def _check(world: int, modes: tuple[str, ...]):
    cases = _cases(world)
    per_rank = run_distributed(_worker, world, args=(cases, modes), timeout=60)
    for name, (cu_p, cu_r) in cases.items():
        q, k, v, w = (x.requires_grad_() for x in _global_inputs(cu_p[-1], seed=len(name)))
        meta = _global_meta(cu_p, cu_r)
        ref = dense_reference(q, k, v, meta, meta, SCALE)
        (ref * w).sum().backward()
        refs = [ref.detach(), q.grad, k.grad, v.grad]
        for mode in modes:
            got = [torch.zeros_like(r) for r in refs]
            for rank in range(world):
                idx = rank_token_index(cu_p, world, rank)
                for full, part in zip(got, per_rank[rank][(name, mode)]):
                    full[idx] = part.double()
            for label, g_, r_ in zip(("out", "dq", "dk", "dv"), got, refs):
                assert torch.isfinite(g_).all(), f"{name}/{mode}: {label} has NaN/inf"
                err = _rel(g_, r_)
                assert err <= 1e-5, f"CP {world} {mode} {name}: {label} rel err {err:.2e}"


@pytest.mark.timeout(90)
def test_cp2_ring_and_a2a_match_dense_reference():
    _check(2, ("ring", "a2a"))


@pytest.mark.timeout(120)
def test_cp4_ring_and_a2a_match_dense_reference():
    _check(4, ("ring", "a2a"))


def test_a2a_rejects_indivisible_heads():
    from megatron_longctx.model.attention.a2a import check_a2a_heads

    with pytest.raises(ValueError, match=r"key/value heads divisible by CP 4.*2 key/value heads"):
        check_a2a_heads(8, 2, 4)


def test_single_process_kernel_matches_reference_with_empty_rows():
    from megatron_longctx.model.attention.ring import ring_attention

    cu_p, cu_r = _padded_cu([5, 1, 9], 1, pad_doc=3)
    q, k, v, w = (x.float().requires_grad_() for x in _global_inputs(cu_p[-1], seed=3))
    meta = _global_meta(cu_p, cu_r)
    empty = torch.zeros(0, dtype=torch.long)
    out = ring_attention(q, k, v, [meta], empty, empty, SCALE, None)
    (out * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(qd, kd, vd, meta, meta, SCALE)
    (ref * w.detach().double()).sum().backward()
    for got, want in ((out, ref), (q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert torch.isfinite(got).all()
        assert _rel(got.detach(), want.detach()) <= 1e-5
    assert (out[~meta.valid] == 0).all()
