"""Ring (p2p) context-parallel attention over the zigzag-within-documents layout.

Every rank holds chunks r and 2 CP - 1 - r of every document (parallel/cp_split.py). K/V blocks
travel around the CP group; at step t rank r holds the K/V of rank s = (r - t) mod CP, and because
every document is cut the same way, chunk-level causality decides which segments interact
(``CPLayout.ring_block``):

* s == r: the local block, causal per document segment;
* s <  r: all local queries vs the *early* chunk of each of s's documents, full attention;
* s >  r: only the local *late* queries vs all of s's K/V, full attention.

So every step after the first costs half a local block, on every rank (balanced), and each step is
a varlen problem handed to a block kernel (model/attention/kernels.py). The next K/V block is
exchanged with ``dist.batch_isend_irecv`` (send to next and receive from previous posted together:
no NCCL deadlock from unpaired isend/irecv, no cycle of waits at CP > 2) while the current one is
computed; partial results are merged by log-sum-exp. Backward replays the ring: K/V travel again,
and the dK/dV accumulator of each block travels with it (CP - 1 hops, ending at its owner), so each
rank sends (CP - 1) K/V blocks forward and (CP - 1) K/V + (CP - 1) dK/dV backward.

Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]`` (t local tokens), out ``[t, hq, d]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.model.attention.kernels import BlockKernel, merge

_TAG_KV, _TAG_DKV = 101, 102

#: bytes sent by this process's ring attention, by kind; benchmarks read and reset it.
COMM_BYTES: dict[str, int] = {"kv_fwd": 0, "kv_bwd": 0, "dkv_bwd": 0}


class _Ring:
    """Send to the next rank and receive from the previous one, as one batched p2p call."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, tag: int, kind: str):
        """Starts send -> next and recv <- prev together; returns (recv buffer, requests)."""
        recv = torch.empty_like(send)
        COMM_BYTES[kind] = COMM_BYTES.get(kind, 0) + send.numel() * send.element_size()
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


class RingAttention(torch.autograd.Function):
    """Document-masked causal attention over a CP ring (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: CPLayout, scale: float, group, kernel: BlockKernel):
        ring = _Ring(group) if group is not None and dist.get_world_size(group) > 1 else None
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        out = lse = None
        kv = torch.stack([k, v]) if size > 1 else (k, v)
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                next_kv, reqs = ring.exchange(kv, _TAG_KV, "kv_fwd")
            b_out, b_lse = kernel.forward(q, kv[0], kv[1], layout.ring_block(rank, src), scale)
            out, lse = (b_out, b_lse) if out is None else merge(out, lse, b_out, b_lse)
            if step < size - 1:
                _wait(reqs)
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.ring, ctx.kernel = layout, scale, ring, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, layout, scale, kernel = ctx.ring, ctx.layout, ctx.scale, ctx.kernel
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        dout = dout.contiguous()
        dq = dkv_own = None
        kv = torch.stack([k, v]) if size > 1 else (k, v)
        dkv_recv, dkv_reqs = None, []
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                next_kv, kv_reqs = ring.exchange(kv, _TAG_KV, "kv_bwd")
            block = layout.ring_block(rank, src)
            b_dq, b_dk, b_dv = kernel.backward(q, kv[0], kv[1], dout, out, lse, block, scale)
            dq = b_dq if dq is None else dq.add_(b_dq)
            if step == 0:
                dkv_own = torch.stack([b_dk, b_dv])
            else:
                if step == 1:
                    acc = torch.stack([b_dk, b_dv])
                else:  # the accumulator of src's K/V, from the rank that held it last step
                    _wait(dkv_reqs)
                    acc = dkv_recv
                    acc[0] += b_dk
                    acc[1] += b_dv
                # hand the accumulator on; after CP - 1 hops it reaches its owner
                dkv_recv, dkv_reqs = ring.exchange(acc, _TAG_DKV, "dkv_bwd")
            if step < size - 1:
                _wait(kv_reqs)
                kv = next_kv
        if size > 1:
            _wait(dkv_reqs)
            dkv_own += dkv_recv
        dk, dv = dkv_own.unbind(0)
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            None,
            None,
            None,
            None,
        )


def ring_attention(
    q, k, v, layout: CPLayout, scale: float, group=None, kernel: BlockKernel | None = None
) -> torch.Tensor:
    """Ring attention for this rank's local THD tokens.

    Args:
        q: ``[t, hq, d]``; k, v: ``[t, hk, d]`` (hq divisible by hk), t = layout.local_tokens.
        layout: the batch's ``CPLayout`` (CP size = the group's size).
        scale: softmax scale. group: the CP process group (None or size 1: local attention).
        kernel: the block kernel (default: ``auto`` for q's device and dtype).
    """
    from megatron_longctx.model.attention.kernels import resolve_kernel

    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} are not divisible by key/value heads {k.shape[1]}"
        )
    size = dist.get_world_size(group) if group is not None else 1
    layout.check_local(q.shape[0], size)
    kernel = kernel or resolve_kernel("auto", q.device, q.dtype)
    return RingAttention.apply(q, k, v, layout, scale, group, kernel)
