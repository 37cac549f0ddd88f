"""Pure-torch block attention with document + causal masks from per-token metadata.

The CPU path of every core attention in this package, and the numerical oracle for the GPU kernels.
One call handles one (query block, key/value block) pair; the ring and all-to-all schedulers decide
which pairs exist. The mask is built per block from the tokens' (document, position, valid)
vectors, never as an S x S mask over the whole sequence:

    allowed(q, k) = doc[q] == doc[k]  and  pos[k] <= pos[q]  and  valid[q]

(padding sits at the end of each document, so a real query never sees a padding key; padding
queries get output 0). Rows with nothing allowed have lse = -inf and output 0, never NaN.

Shape legend (THD): q ``[tq, hq, d]``, k / v ``[tk, hk, d]`` with hq = g x hk (GQA: the g query
heads of a group share one K/V head, handled by reshaping q to ``[tq, hk, g, d]``; K/V are never
repeated);
lse ``[tq, hq]``. Scores are ``[hk, g, tq, tk]`` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenMeta:
    """Per-token (document, position, valid) vectors of one block, each ``[t]``."""

    doc: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor

    def select(self, index: torch.Tensor | None) -> TokenMeta:
        if index is None:
            return self
        return TokenMeta(self.doc[index], self.pos[index], self.valid[index])

    @staticmethod
    def cat(metas: list[TokenMeta]) -> TokenMeta:
        return TokenMeta(
            torch.cat([m.doc for m in metas]),
            torch.cat([m.pos for m in metas]),
            torch.cat([m.valid for m in metas]),
        )


def block_mask(q_meta: TokenMeta, k_meta: TokenMeta) -> torch.Tensor:
    """``[tq, tk]`` bool: allowed (query, key) pairs of one block."""
    same_doc = q_meta.doc[:, None] == k_meta.doc[None, :]
    causal = k_meta.pos[None, :] <= q_meta.pos[:, None]
    return same_doc & causal & q_meta.valid[:, None]


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    tq, hq, d = q.shape
    hk = k.shape[1]
    qg = q.float().reshape(tq, hk, hq // hk, d)
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.float()) * scale
    return scores.masked_fill(~mask, float("-inf"))


def _safe(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def block_forward(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
    """One block: (out ``[tq, hq, d]`` fp32, normalised within the block; lse ``[tq, hq]`` fp32)."""
    tq, hq, d = q.shape
    scores = _scores(q, k, block_mask(q_meta, k_meta), scale)  # [hk, g, tq, tk]
    lse = torch.logsumexp(scores, dim=-1)  # -inf for empty rows
    probs = torch.exp(scores - _safe(lse)[..., None])
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float()).reshape(tq, hq, d)
    return out, lse.permute(2, 0, 1).reshape(tq, hq)


def block_backward(q, k, v, dout, lse, delta, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
    """Gradients of one block given the *final* (merged) lse and delta = rowsum(dout * out).

    Args:
        q, k, v: the block's inputs; dout: ``[tq, hq, d]``; lse, delta: ``[tq, hq]`` fp32.

    Returns:
        (dq ``[tq, hq, d]``, dk ``[tk, hk, d]``, dv ``[tk, hk, d]``), fp32.
    """
    tq, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    scores = _scores(q, k, block_mask(q_meta, k_meta), scale)
    lse_b = lse.reshape(tq, hk, g).permute(1, 2, 0)  # [hk, g, tq]
    probs = torch.exp(scores - _safe(lse_b)[..., None])
    dog = dout.float().reshape(tq, hk, g, d)
    dv = torch.einsum("hgqk,qhgd->khd", probs, dog)
    dprobs = torch.einsum("qhgd,khd->hgqk", dog, v.float())
    delta_b = delta.reshape(tq, hk, g).permute(1, 2, 0)
    dscores = probs * (dprobs - delta_b[..., None])
    dq = torch.einsum("hgqk,khd->qhgd", dscores, k.float()).reshape(tq, hq, d) * scale
    dk = torch.einsum("hgqk,qhgd->khd", dscores, q.float().reshape(tq, hk, g, d)) * scale
    return dq, dk, dv


def merge_blocks(out, lse, block_out, block_lse):
    """Online-softmax merge of a block into the running (out, lse); safe when both are empty."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _safe(new_lse)
    out = (
        out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
    )
    return out, new_lse


def dense_reference(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, scale: float):
    """Plain autograd attention with an explicit mask (tests' oracle; empty rows give 0)."""
    hq, hk = q.shape[1], k.shape[1]
    kr = k.repeat_interleave(hq // hk, dim=1)
    vr = v.repeat_interleave(hq // hk, dim=1)
    mask = block_mask(q_meta, k_meta)
    scores = torch.einsum("qhd,khd->hqk", q, kr) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask.any(-1)[None, :, None]
    return torch.einsum("hqk,khd->qhd", probs, vr)
