"""All-to-all (Ulysses) context-parallel attention: scatter heads, gather the sequence.

Each rank starts with its local tokens for all heads; one all-to-all gives every rank all tokens
(concatenated in CP-rank order) for hq / CP query heads and hk / CP key/value heads; attention runs
locally with the document + causal mask built from the tokens' metadata (the concatenation of every
rank's ``TokenMeta``, so the zigzag order needs no reordering); a second all-to-all returns each
token's output to its rank. ProLong's choice. Needs hq and hk both divisible by CP.

Shape legend (THD): local q ``[t, hq, d]`` -> gathered ``[CP * t, hq / CP, d]`` -> local out
``[t, hq, d]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longctx.model.attention.kernel_torch import TokenMeta
from megatron_longctx.model.attention.ring import ring_attention

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
    """Ulysses needs the local query heads and key/value heads both divisible by CP."""
    if num_heads % cp_size or num_kv_heads % cp_size:
        raise ValueError(
            f"all-to-all context parallelism needs query heads and key/value heads divisible by "
            f"CP {cp_size}: got {num_heads} query heads ({num_heads} % {cp_size} = "
            f"{num_heads % cp_size}) and {num_kv_heads} key/value heads ({num_kv_heads} % "
            f"{cp_size} = {num_kv_heads % cp_size}) per TP rank; use the ring mode instead"
        )


def a2a_attention(
    q, k, v, metas: list[TokenMeta], scale: float, group=None, local_attention=None
) -> torch.Tensor:
    """Ulysses attention for this rank's local THD tokens.

    Args:
        q: ``[t, hq, d]``; k, v: ``[t, hk, d]``.
        metas: ``TokenMeta`` of every CP rank's local tokens (index = CP rank).
        scale: softmax scale. group: CP process group (None or size 1: local attention).
        local_attention: optional ``fn(q, k, v, meta, scale)`` for the gathered sequence (e.g. a
            GPU kernel); default: the pure-torch kernel.
    """
    cp = dist.get_world_size(group) if group is not None else 1
    check_a2a_heads(q.shape[1], k.shape[1], cp)
    meta = TokenMeta.cat(metas)
    if local_attention is None:

        def local_attention(q_, k_, v_, meta_, scale_):
            empty = torch.zeros(0, dtype=torch.long, device=q_.device)
            return ring_attention(q_, k_, v_, [meta_], empty, empty, scale_, None)

    if cp == 1:
        return local_attention(q, k, v, meta, scale)
    q_h, k_h, v_h = (_SeqToHead.apply(x, group) for x in (q, k, v))
    out_h = local_attention(q_h, k_h, v_h, meta, scale)
    return _HeadToSeq.apply(out_h, group)
