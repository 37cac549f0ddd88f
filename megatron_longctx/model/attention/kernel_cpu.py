"""CPU block kernel: torch's own flash-attention kernel, one call per group of equal-shape segments.

``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) is the kernel behind
``F.scaled_dot_product_attention`` on CPU: tiled online softmax (memory O(tile) beyond inputs and
outputs, never a ``t x t`` tensor), skips tiles above the diagonal when causal (work = allowed
pairs), handles GQA natively (hk < hq without repeating K/V), and returns / takes the logsumexp,
which is what ring merging and the split backward need. Segments of identical (q_len, k_len) are
batched into calls of at most ``BATCH_ROWS`` rows (e.g. 8 documents of 1K); a lone segment is
passed as a strided view, no copy. Empty segments never reach it (the kernel crashes on length 0).

Shape legend: THD q ``[t, hq, d]``; the kernel's layout is ``[B, h, L, d]`` (a transposed view of
``[B, L, h, d]``), lse ``[B, h, L]``.
"""

from __future__ import annotations

import torch

from megatron_longctx.model.attention.kernels import BlockKernel, stat_dtype

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _Group:
    """Rows of one group of equal-shape segments: a slice when alone, an index when batched."""

    def __init__(self, block, lq: int, lk: int, segments):
        self.lq, self.lk, self.n = lq, lk, len(segments)
        if self.n == 1:
            s = segments[0]
            self.q_slice = slice(int(block.q_start[s]), int(block.q_start[s]) + lq)
            self.k_slice = slice(int(block.k_start[s]), int(block.k_start[s]) + lk)
        else:
            self.q_rows = torch.from_numpy(block.rows("q", segments))
            self.k_rows = torch.from_numpy(block.rows("k", segments))

    def take(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """``[B, h, L, d]`` view / gather of x's rows (``[B, h, L]`` for a 2-D lse)."""
        length = self.lq if which == "q" else self.lk
        if self.n == 1:
            part = x[self.q_slice if which == "q" else self.k_slice].unsqueeze(0)
        else:
            rows = self.q_rows if which == "q" else self.k_rows
            part = x.index_select(0, rows).view(self.n, length, *x.shape[1:])
        return part.transpose(1, 2)

    def put(self, dst: torch.Tensor, src: torch.Tensor, which: str) -> None:
        """Writes ``src`` (``[B, h, L, d]`` / ``[B, h, L]``) into dst's rows (never overlapping)."""
        src = src.transpose(1, 2)
        if self.n == 1:
            dst[self.q_slice if which == "q" else self.k_slice] = src[0]
        else:
            rows = self.q_rows if which == "q" else self.k_rows
            dst.index_copy_(0, rows, src.reshape(-1, *src.shape[2:]).to(dst.dtype))


#: rows per batched call: bounds the gathered copies (q, k, v, out, grads) to a tile, not t.
BATCH_ROWS = 8192


def _groups(block) -> list[_Group]:
    cached = block._device_cache.get("cpu_groups")
    if cached is None:
        cached = []
        for lq, lk, segs in block.shape_groups:
            per_call = max(1, BATCH_ROWS // max(lq, lk))
            for i in range(0, len(segs), per_call):
                cached.append(_Group(block, lq, lk, segs[i : i + per_call]))
        block._device_cache["cpu_groups"] = cached
    return cached


class CPUFlashKernel(BlockKernel):
    """torch's CPU flash kernel per group of equal-shape segments (see the module docstring)."""

    name = "cpu_flash"

    def forward(self, q, k, v, block, scale: float):
        acc = stat_dtype(q)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=acc, device=q.device)
        for grp in _groups(block):
            o, m = _fwd(
                grp.take(q, "q"),
                grp.take(k, "k"),
                grp.take(v, "k"),
                0.0,
                block.causal,
                scale=scale,
            )
            grp.put(out, o, "q")
            grp.put(lse, m, "q")
        return out, lse

    def backward(self, q, k, v, dout, out, lse, block, scale: float):
        acc = stat_dtype(q)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        out = out.to(q.dtype)
        dout = dout.to(q.dtype)
        lse = lse.to(acc)
        for grp in _groups(block):
            gq, gk, gv = _bwd(
                grp.take(dout, "q"),
                grp.take(q, "q"),
                grp.take(k, "k"),
                grp.take(v, "k"),
                grp.take(out, "q"),
                grp.take(lse, "q"),
                0.0,
                block.causal,
                scale=scale,
            )
            grp.put(dq, gq, "q")
            grp.put(dk, gk, "k")
            grp.put(dv, gv, "k")
        return dq, dk, dv
