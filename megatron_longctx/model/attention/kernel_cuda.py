"""CUDA block kernels: flash-attention varlen, from torch itself or from the flash-attn package.

Untested on GPU (this repository's CI has none); written against torch 2.13's op schemas
(``aten._flash_attention_forward/_backward``, present in every CUDA build, sm80+) and flash-attn
2.6-2.8's ``_flash_attn_varlen_forward/_backward`` (called per version, flash_attn_api.py). Both
take packed rows with ``cu_seqlens_q / cu_seqlens_k``, so a block's segments are gathered into
packed tensors (one index_select per tensor, O(t x h x d)), the kernel runs, and results are
scattered back (``index_select`` / ``index_copy_``: no host sync); both handle GQA natively and
return the logsumexp. fp16 / bf16 only (flash-attention has no fp32 path). Causal segments have
q_len == k_len, so the kernels' bottom-right causal alignment equals the top-left one.

Shape legend (THD): packed q ``[nq, hq, d]``, lse ``[hq, nq]`` (flash-attn 2 varlen layout).
"""

from __future__ import annotations

import torch

from megatron_longctx.model.attention import flash_attn_api
from megatron_longctx.model.attention.kernels import BlockKernel


class _PackedKernel(BlockKernel):
    """Gather -> varlen kernel -> scatter (see the module docstring)."""

    def forward(self, q, k, v, block, scale: float):
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if not block.num_segments:
            return out, lse
        t = block.device_tensors(q.device)
        rows_q, rows_k = t["q_rows"], t["k_rows"]
        qp, kp, vp = (x.index_select(0, r) for x, r in ((q, rows_q), (k, rows_k), (v, rows_k)))
        o, m = self._fwd(qp, kp, vp, t, block, scale)  # m: [hq, nq]
        out.index_copy_(0, rows_q, o.float())
        lse.index_copy_(0, rows_q, m.transpose(0, 1).float())
        return out, lse

    def backward(self, q, k, v, dout, out, lse, block, scale: float):
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        if not block.num_segments:
            return dq, dk, dv
        t = block.device_tensors(q.device)
        rows_q, rows_k = t["q_rows"], t["k_rows"]
        lse_p = lse.transpose(0, 1).index_select(1, rows_q)  # [hq, nq], contiguous
        gq, gk, gv = self._bwd(
            dout.index_select(0, rows_q).to(q.dtype),
            q.index_select(0, rows_q),
            k.index_select(0, rows_k),
            v.index_select(0, rows_k),
            out.index_select(0, rows_q).to(q.dtype),
            lse_p,
            t,
            block,
            scale,
        )
        dq.index_copy_(0, rows_q, gq.float())
        dk.index_copy_(0, rows_k, gk.float())
        dv.index_copy_(0, rows_k, gv.float())
        return dq, dk, dv


class TorchFlashKernel(_PackedKernel):
    """torch's built-in flash-attention varlen ops (no extra package). Untested on GPU."""

    name = "torch_flash"

    def _fwd(self, q, k, v, t, block, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, t["cu_q"], t["cu_k"], block.max_q, block.max_k, 0.0, block.causal, False,
            scale=scale,
        )  # fmt: skip
        return out, lse

    def _bwd(self, dout, q, k, v, out, lse, t, block, scale):
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused without dropout
        unused = torch.empty(0, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, t["cu_q"], t["cu_k"], block.max_q, block.max_k, 0.0,
            block.causal, rng, unused, scale=scale,
        )  # fmt: skip


class FlashAttnKernel(_PackedKernel):
    """flash-attn's varlen forward/backward, 2.6-2.8 (flash_attn_api.py). Untested on GPU."""

    name = "flash_attn"

    def _fwd(self, q, k, v, t, block, scale):
        return flash_attn_api.varlen_forward(
            q, k, v, t["cu_q"], t["cu_k"], block.max_q, block.max_k, scale, block.causal
        )

    def _bwd(self, dout, q, k, v, out, lse, t, block, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flash_attn_api.varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, t["cu_q"], t["cu_k"], block.max_q, block.max_k,
            scale, block.causal,
        )  # fmt: skip
        return dq, dk, dv
