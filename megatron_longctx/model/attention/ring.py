"""Ring (p2p) context-parallel attention over the zigzag-within-documents layout.

Every rank holds chunks r and 2 CP - 1 - r of every document (parallel/cp_split.py). K/V blocks
travel around the CP group; at step t rank r holds the K/V of rank s = (r - t) mod CP, and because
every document is cut the same way, chunk-level causality decides which half-blocks can interact:

* s == r: the local block, causal + document mask;
* s <  r: all local queries vs the *early* half of s's K/V (its late half is in the future);
* s >  r: only the local *late* queries vs all of s's K/V (the early queries are in its past).

So every step after the first costs half a local block, on every rank (balanced), and empty block
pairs are never computed. The next K/V block is sent/received asynchronously (isend/irecv) while the
current one is computed; partial results are merged by log-sum-exp. Backward replays the ring: K/V
travel again, and the dK/dV accumulator of each block travels with it (CP - 1 hops, ending at its
owner), so each rank sends (CP - 1) K/V blocks forward and (CP - 1) K/V + (CP - 1) dK/dV backward.

Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]`` (t local tokens), out ``[t, hq, d]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longctx.model.attention.kernel_torch import (
    TokenMeta,
    block_backward,
    block_forward,
    merge_blocks,
)

_TAG_KV, _TAG_DKV = 101, 102

#: bytes sent by this process's ring attention, by kind; benchmarks read and reset it.
COMM_BYTES: dict[str, int] = {"kv_fwd": 0, "kv_bwd": 0, "dkv_bwd": 0}


class _Ring:
    """Send to the next rank, receive from the previous one, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, tag: int, kind: str):
        """Posts isend(send -> next) and irecv(<- prev); returns (recv buffer, requests)."""
        recv = torch.empty_like(send)
        COMM_BYTES[kind] = COMM_BYTES.get(kind, 0) + send.numel() * send.element_size()
        reqs = [
            dist.isend(send, self.next, group=self.group, tag=tag),
            dist.irecv(recv, self.prev, group=self.group, tag=tag),
        ]
        return recv, reqs


def _block_plan(step: int, rank: int, src: int, early: torch.Tensor, late: torch.Tensor):
    """(query index, key index) of the half-blocks that can interact; None means 'all'."""
    if step == 0:
        return None, None
    if src < rank:
        return None, early
    return late, None


def _sel(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


class RingAttention(torch.autograd.Function):
    """Document-masked causal attention over a CP ring (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, metas: list[TokenMeta], early, late, scale: float, group):
        ring = _Ring(group) if group is not None and dist.get_world_size(group) > 1 else None
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        q_meta = metas[rank]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                next_kv, reqs = ring.exchange(kv, _TAG_KV, "kv_fwd")
            q_idx, k_idx = _block_plan(step, rank, src, early, late)
            b_out, b_lse = block_forward(
                _sel(q, q_idx),
                _sel(kv[0], k_idx),
                _sel(kv[1], k_idx),
                q_meta.select(q_idx),
                metas[src].select(k_idx),
                scale,
            )
            if q_idx is None:
                out, lse = merge_blocks(out, lse, b_out, b_lse)
            else:
                merged = merge_blocks(out[q_idx], lse[q_idx], b_out, b_lse)
                out[q_idx], lse[q_idx] = merged
            if step < size - 1:
                for req in reqs:
                    req.wait()
                kv = next_kv
        ctx.save_for_backward(q, k, v, out, lse, early, late)
        ctx.metas, ctx.scale, ctx.group, ctx.ring = metas, scale, group, ring
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, early, late = ctx.saved_tensors
        ring, metas, scale = ctx.ring, ctx.metas, ctx.scale
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        delta = (dout.float() * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_own = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=k.device)
        kv = torch.stack([k, v]).contiguous()
        dkv_recv, dkv_reqs = None, []
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                next_kv, kv_reqs = ring.exchange(kv, _TAG_KV, "kv_bwd")
            q_idx, k_idx = _block_plan(step, rank, src, early, late)
            b_dq, b_dk, b_dv = block_backward(
                _sel(q, q_idx),
                _sel(kv[0], k_idx),
                _sel(kv[1], k_idx),
                _sel(dout, q_idx),
                _sel(lse, q_idx),
                _sel(delta, q_idx),
                metas[rank].select(q_idx),
                metas[src].select(k_idx),
                scale,
            )
            if q_idx is None:
                dq += b_dq
            else:
                dq.index_add_(0, q_idx, b_dq)
            if step == 0:
                acc = dkv_own
            elif step == 1:
                acc = torch.zeros_like(dkv_own)
            else:
                for req in dkv_reqs:
                    req.wait()
                acc = dkv_recv
            if k_idx is None:
                acc[0] += b_dk
                acc[1] += b_dv
            else:
                acc[0].index_add_(0, k_idx, b_dk)
                acc[1].index_add_(0, k_idx, b_dv)
            if step >= 1:  # hand the accumulator on; after CP - 1 hops it reaches its owner
                dkv_recv, dkv_reqs = ring.exchange(acc, _TAG_DKV, "dkv_bwd")
            if step < size - 1:
                for req in kv_reqs:
                    req.wait()
                kv = next_kv
        if size > 1:
            for req in dkv_reqs:
                req.wait()
            dkv_own += dkv_recv
        return (
            dq.to(q.dtype),
            dkv_own[0].to(k.dtype),
            dkv_own[1].to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def ring_attention(
    q,
    k,
    v,
    metas: list[TokenMeta],
    early: torch.Tensor,
    late: torch.Tensor,
    scale: float,
    group=None,
) -> torch.Tensor:
    """Ring attention for this rank's local THD tokens.

    Args:
        q: ``[t, hq, d]``; k, v: ``[t, hk, d]`` (hq divisible by hk).
        metas: the ``TokenMeta`` of every CP rank's local tokens (index = CP rank).
        early, late: local indices of this rank's early / late chunks (the same on every rank).
        scale: softmax scale. group: the CP process group (None or size 1: local attention).
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} are not divisible by key/value heads {k.shape[1]}"
        )
    return RingAttention.apply(q, k, v, metas, early, late, scale, group)
