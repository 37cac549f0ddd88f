"""CUDA block kernels: flash-attention varlen, from torch itself or from the flash-attn package.

Untested on GPU (this repository's CI has none); written against torch 2.13's op schemas
(``aten._flash_attention_forward/_backward``, present in every CUDA build, sm80+) and flash-attn
2.x's ``_flash_attn_varlen_forward/_backward`` (keyword arguments matched to the installed
version's signature). Both take packed rows with ``cu_seqlens_q / cu_seqlens_k``, so a block's
segments are gathered into packed tensors (one index_select per tensor, O(t x h x d)), the kernel
runs, and results are scattered back; both handle GQA natively and return the logsumexp. fp16 /
bf16 only (flash-attention has no fp32 path). Causal segments have q_len == k_len, so the kernels'
bottom-right causal alignment equals the top-left one.

Shape legend (THD): packed q ``[nq, hq, d]``, lse ``[hq, nq]`` (flash-attn 2 varlen layout).
"""

from __future__ import annotations

import inspect

import torch

from megatron_longctx.model.attention.kernels import BlockKernel


def _lse_rows(lse: torch.Tensor, cu_q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[nq, hq]`` from the kernel's lse (``[hq, nq]``, or ``[B, hq, max_q]`` in old versions)."""
    if lse.dim() == 2:
        return lse.transpose(0, 1)
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    return torch.cat([lse[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])[:num_rows]


class _PackedKernel(BlockKernel):
    """Gather -> varlen kernel -> scatter (see the module docstring)."""

    def forward(self, q, k, v, block, scale: float):
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if not block.num_segments:
            return out, lse
        t = block.device_tensors(q.device)
        qp, kp, vp = q[t["q_rows"]], k[t["k_rows"]], v[t["k_rows"]]
        o, m = self._fwd(qp, kp, vp, t, block, scale)
        out.index_copy_(0, t["q_rows"], o.float())
        lse.index_copy_(0, t["q_rows"], _lse_rows(m, t["cu_q"], qp.shape[0]).float())
        return out, lse

    def backward(self, q, k, v, dout, out, lse, block, scale: float):
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        if not block.num_segments:
            return dq, dk, dv
        t = block.device_tensors(q.device)
        rows_q, rows_k = t["q_rows"], t["k_rows"]
        lse_p = lse[rows_q].transpose(0, 1).contiguous()  # [hq, nq]
        gq, gk, gv = self._bwd(
            dout[rows_q].to(q.dtype).contiguous(),
            q[rows_q],
            k[rows_k],
            v[rows_k],
            out[rows_q].to(q.dtype).contiguous(),
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


def _call(fn, **kwargs):
    """Calls ``fn`` with the keyword arguments its signature accepts (flash-attn versions differ
    in ``window_size`` vs ``window_size_left/right`` and in optional extras)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (-1, -1)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


class FlashAttnKernel(_PackedKernel):
    """flash-attn's varlen forward/backward (``pip install '.[gpu]'``). Untested on GPU."""

    name = "flash_attn"

    def _fwd(self, q, k, v, t, block, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        common = self._common(t, block, scale)
        res = _call(_flash_attn_varlen_forward, q=q, k=k, v=v, return_softmax=False, **common)
        return res[0], res[1]

    def _bwd(self, dout, q, k, v, out, lse, t, block, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(
            _flash_attn_varlen_backward,
            dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
            deterministic=False, rng_state=None, **self._common(t, block, scale),
        )  # fmt: skip
        return dq, dk, dv

    @staticmethod
    def _common(t, block, scale) -> dict:
        return dict(
            cu_seqlens_q=t["cu_q"], cu_seqlens_k=t["cu_k"], max_seqlen_q=block.max_q,
            max_seqlen_k=block.max_k, dropout_p=0.0, softmax_scale=scale, causal=block.causal,
            window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
        )  # fmt: skip
