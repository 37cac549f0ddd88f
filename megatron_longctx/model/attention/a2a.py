"""All-to-all (Ulysses) context-parallel attention: scatter heads, gather the sequence.

Each rank starts with its local tokens for all heads; one all-to-all gives every rank all tokens
(concatenated in CP-rank order) for hq / CP query heads and their key/value heads; the gathered
tokens are put in document order (``CPLayout.gathered_order``), the block kernel runs causal
attention per document (``CPLayout.document_block``), and a second all-to-all returns each token's
output to its rank. ProLong's choice.

Heads: hq must be divisible by CP. When hk is not (Llama-3-8B at TP 2 has 4 KV heads per rank,
and CP 8 is common), each K/V head is replicated ``lcm(hk, CP) / hk`` times before the exchange, so
every rank receives exactly the K/V heads its query heads use (query head i of rank j belongs to
group (j hq / CP + i) // (hq / hk) either way); autograd sums the replicas' gradients.

Shape legend (THD): local q ``[t, hq, d]`` -> gathered ``[CP * t, hq / CP, d]`` -> local out
``[t, hq, d]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.model.attention.kernels import BlockKernel, block_attention, resolve_kernel
from megatron_longctx.parallel.layout import check_heads

#: bytes sent by this process's all-to-alls (excluding the slice kept locally), for benchmarks.
COMM_BYTES: dict[str, int] = {"a2a_fwd": 0, "a2a_bwd": 0}


def _all_to_all(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    """x ``[cp, ...]``: slice j goes to rank j; returns ``[cp, ...]`` with slice j from rank j."""
    x = x.contiguous()  # empty_like keeps a transposed view's strides; the collective would not
    out = torch.empty_like(x)
    size = x.shape[0]
    COMM_BYTES[kind] = COMM_BYTES.get(kind, 0) + x.numel() * x.element_size() * (size - 1) // size
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    """``[t, h, d]`` -> ``[cp * t, h / cp, d]``."""
    cp = dist.get_world_size(group)
    t, h, d = x.shape
    parts = x.reshape(t, cp, h // cp, d).transpose(0, 1)
    return _all_to_all(parts, group, kind).reshape(cp * t, h // cp, d)


def _head_to_seq(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    """``[cp * t, h / cp, d]`` -> ``[t, h, d]``."""
    cp = dist.get_world_size(group)
    total, hp, d = x.shape
    parts = _all_to_all(x.reshape(cp, total // cp, hp, d), group, kind)
    return parts.transpose(0, 1).reshape(total // cp, cp * hp, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group, "a2a_fwd")

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group, "a2a_bwd"), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group, "a2a_fwd")

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group, "a2a_bwd"), None


def check_a2a_heads(num_heads: int, num_kv_heads: int, cp_size: int) -> None:
    """Ulysses needs the local query heads divisible by CP (K/V heads are replicated if needed)."""
    if num_heads % cp_size:
        raise ValueError(
            f"all-to-all context parallelism needs the query heads per TP rank divisible by CP "
            f"{cp_size}: got {num_heads} query heads ({num_heads} % {cp_size} = "
            f"{num_heads % cp_size}); use the ring mode, or a CP size that divides {num_heads}"
        )
    check_heads(num_heads, num_kv_heads)


def kv_replication(num_kv_heads: int, cp_size: int) -> int:
    """How many times each K/V head is repeated so that CP divides the K/V heads."""
    return math.lcm(num_kv_heads, cp_size) // num_kv_heads


def a2a_attention(
    q, k, v, layout: CPLayout, scale: float, group=None, kernel: BlockKernel | None = None
) -> torch.Tensor:
    """Ulysses attention for this rank's local THD tokens.

    Args:
        q: ``[t, hq, d]``; k, v: ``[t, hk, d]``; t = layout.local_tokens.
        layout: the batch's ``CPLayout`` (CP size = the group's size).
        scale: softmax scale. group: CP process group (None or size 1: local attention).
        kernel: the block kernel for the gathered sequence (default: ``auto``).
    """
    cp = dist.get_world_size(group) if group is not None else 1
    check_a2a_heads(q.shape[1], k.shape[1], cp)
    layout.check_local(q.shape[0], cp)
    kernel = kernel or resolve_kernel("auto", q.device, q.dtype)
    block = layout.document_block()
    if cp == 1:
        return block_attention(q, k, v, block, scale, kernel)
    rep = kv_replication(k.shape[1], cp)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    order, inverse = _order(layout, q.device)
    q_h, k_h, v_h = (_SeqToHead.apply(x, group).index_select(0, order) for x in (q, k, v))
    out_d = block_attention(q_h, k_h, v_h, block, scale, kernel)
    return _HeadToSeq.apply(out_d.index_select(0, inverse), group)


def _order(layout: CPLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gathered -> document order, its inverse), built once per layout and device."""
    cache = layout._blocks
    key = ("order", str(device))
    if key not in cache:
        order = torch.from_numpy(layout.gathered_order().astype(np.int64)).to(device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        cache[key] = (order, inverse)
    return cache[key]
