"""Ring and all-to-all CP attention on gloo vs the dense fp64 oracle (causal per document).

Each case packs documents into zigzag units (one per document, padded per document to a multiple
of 2 x CP, or short documents grouped into one unit padded at its end), splits q/k/v with the
zigzag-within-units rule, runs the CP attention on every rank, and reassembles outputs and
q/k/v gradients in the parent process. The oracle (model/attention/reference.py) loops over the
documents of the whole padded sequence: it shares no code with the kernels or the block layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longctx.model.attention.reference import document_causal_attention
from megatron_longctx.parallel.cp_split import rank_token_index
from megatron_longctx.parallel.units import plan_units
from megatron_longctx.testing.attention_cases import padded_cu
from megatron_longctx.testing.distributed import run_distributed

HQ, D = 8, 8
SCALE = D**-0.5


def _units_case(groups: list[list[int]], cp: int, pad_first: bool = False):
    """Documents grouped into zigzag units by hand (lists of real lengths), padded per unit.

    Returns (cu_padded, cu_real, docs, ref_cu_padded, ref_cu_real): the unit layout, the document
    intervals in it, and the same sequence described per document for the oracle (each unit's
    padding belongs to its last document's padded span, or with ``pad_first`` is a padding-only
    span before its first document).
    """
    multiple = 2 * cp
    cu_p, cu_r, starts, ends, ref_p, ref_r = [0], [0], [], [], [0], [0]
    for group in groups:
        pos = cu_p[-1]
        if pad_first and (-sum(group)) % multiple:
            pos += (-sum(group)) % multiple
            ref_p.append(pos)
            ref_r.append(ref_r[-1])
        for n in group:
            starts.append(pos)
            ends.append(pos + n)
            pos += n
            ref_p.append(pos)
            ref_r.append(ref_r[-1] + n)
        real = sum(group)
        cu_p.append(cu_p[-1] + real + (-real) % multiple)
        cu_r.append(cu_r[-1] + real)
        ref_p[-1] = cu_p[-1]
    return cu_p, cu_r, (starts, ends), ref_p, ref_r


def _cases(cp: int) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(cp)
    random_lengths = torch.randint(1, 40, (6,), generator=g).tolist()
    per_doc = {
        "random": padded_cu(random_lengths, cp),
        "equal_lengths": padded_cu([4 * cp] * 3 + [9], cp),  # batched same-shape segments
        "shorter_than_chunk": padded_cu([1, 2, 3, 1, 2 * cp + 1], cp, pad_doc=1),
        "one_doc_all_ranks": padded_cu([16 * cp - 3], cp),
        # every document's real tokens fit in chunk 0 (held by rank 0): ranks 1.. hold only padding
        "fully_padded_rank": ([0, 8 * cp, 16 * cp, 20 * cp], [0, 4, 7, 7]),
    }
    cases = {name: (cu_p, cu_r, None, cu_p, cu_r) for name, (cu_p, cu_r) in per_doc.items()}
    cases = {name: case + (None,) for name, case in cases.items()}
    # grouped units: short documents zigzagged together, documents straddling chunk boundaries
    # and both of a rank's chunks, a long document alone, one-token documents
    cases["units_mixed"] = _units_case([random_lengths, [16 * cp - 3], [1, 2 * cp + 1, 3]], cp)
    cases["units_one_sequence"] = _units_case([[5, 3 * cp, 1, 7, 2 * cp - 1]], cp)
    cases["units_pad_first"] = _units_case([[2, 9], [16 * cp - 3], [1, 3 * cp + 1]], cp, True)
    for name in ("units_mixed", "units_one_sequence", "units_pad_first"):
        cases[name] += (None,)
    # "balanced": unequal chunks, no padding but the tail unit that evens the ranks' counts
    for name, lengths in (
        ("balanced", random_lengths + [16 * cp - 3, 1, 2 * cp + 1]),
        ("balanced_short", [1, 2, 3, 1, cp + 1]),
    ):
        plan = plan_units(lengths, cp, "balanced")
        cu_p = [0] + plan.bounds[:, -1].tolist()
        cu_r = [0] + np.cumsum(plan.real).tolist()
        cases[name] = (cu_p, cu_r, None, cu_p, cu_r, plan.bounds)
    return cases


def _global_inputs(total: int, hk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(total, hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(total, hk, D, generator=g, dtype=torch.float64)
    w = torch.randn(total, HQ, D, generator=g, dtype=torch.float64)
    return q, k, v, w


def _worker(rank, world, cases, modes, kv_heads):
    import torch.distributed as dist

    from megatron_longctx.model.attention.a2a import a2a_attention
    from megatron_longctx.model.attention.blocks import CPLayout
    from megatron_longctx.model.attention.ring import ring_attention

    group = dist.group.WORLD
    results = {}
    for hk in kv_heads:
        for name, (cu_p, cu_r, docs, _, _, chunks) in cases.items():
            q, k, v, w = (x.float() for x in _global_inputs(cu_p[-1], hk, seed=len(name)))
            idx = rank_token_index(cu_p, world, rank, chunks)
            layout = CPLayout(cu_p, cu_r, world, docs, chunks)
            for mode in modes:
                ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
                fn = ring_attention if mode == "ring" else a2a_attention
                out = fn(ql, kl, vl, layout, SCALE, group)
                (out * w[idx]).sum().backward()
                results[(hk, name, mode)] = [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def _check(world: int, modes: tuple[str, ...], kv_heads: tuple[int, ...]):
    cases = _cases(world)
    per_rank = run_distributed(_worker, world, args=(cases, modes, kv_heads), timeout=90)
    for hk in kv_heads:
        for name, (cu_p, _, _, ref_p, ref_r, chunks) in cases.items():
            q, k, v, w = (x.requires_grad_() for x in _global_inputs(cu_p[-1], hk, len(name)))
            ref = document_causal_attention(q, k, v, ref_p, ref_r, SCALE)
            (ref * w).sum().backward()
            refs = [ref.detach(), q.grad, k.grad, v.grad]
            for mode in modes:
                got = [torch.zeros_like(r) for r in refs]
                for rank in range(world):
                    idx = rank_token_index(cu_p, world, rank, chunks)
                    for full, part in zip(got, per_rank[rank][(hk, name, mode)]):
                        full[idx] = part.double()
                for label, g_, r_ in zip(("out", "dq", "dk", "dv"), got, refs):
                    where = f"CP {world} {mode} hk {hk} {name}: {label}"
                    assert torch.isfinite(g_).all(), f"{where} has NaN/inf"
                    err = _rel(g_, r_)
                    assert err <= 1e-5, f"{where} rel err {err:.2e}"


@pytest.mark.timeout(120)
def test_cp2_ring_and_a2a_match_dense_reference():
    _check(2, ("ring", "a2a"), kv_heads=(4, 1))


@pytest.mark.timeout(150)
def test_cp4_ring_and_a2a_match_dense_reference_including_kv_heads_below_cp():
    _check(4, ("ring", "a2a"), kv_heads=(4, 2))


def test_a2a_rejects_query_heads_indivisible_by_cp():
    from megatron_longctx.model.attention.a2a import check_a2a_heads, kv_replication

    with pytest.raises(ValueError, match=r"query heads per TP rank divisible by CP 4.*6 query"):
        check_a2a_heads(6, 2, 4)
    check_a2a_heads(16, 4, 8)  # Llama-3-8B at TP 2, CP 8: K/V heads replicated
    assert kv_replication(4, 8) == 2 and kv_replication(4, 2) == 1 and kv_replication(2, 3) == 3
