"""Device-agnostic block kernel: a tiled online-softmax loop in plain torch that skips empty tiles.

For what the flash kernels cannot do: fp32 on CUDA (flash-attention has no fp32 path), GPUs older
than sm80, and a second, independent CPU implementation for the tests. Per segment, query tiles of
``TILE`` rows meet only the key tiles they may see (causal: tiles at or below the diagonal; the
diagonal tile is masked by index), so memory is O(inputs + one ``[hk, g, TILE, TILE]`` tile) and
work is the allowed pairs rounded up to tiles. Python loops over tiles: a correctness path, not a
fast one on GPU.

Shape legend (THD): q ``[t, hq, d]`` viewed as ``[t, hk, g, d]`` (GQA without repeating K/V),
k / v ``[t, hk, d]``, tile scores ``[hk, g, tq, tk]``, lse ``[t, hq]``.
"""

from __future__ import annotations

import torch

from megatron_longctx.model.attention.kernels import BlockKernel, merge, stat_dtype

TILE = 1024


def _tiles(block):
    """(q rows, k rows, q offset in segment, k offset in segment, diagonal) per tile; rows are
    ``(start, length)`` for ``narrow`` (no Python indexing: the kernel runs on fake CUDA tensors
    too, benchmarks/gpu_rehearsal.py)."""
    for qs, lq, ks, lk in zip(block.q_start, block.q_len, block.k_start, block.k_len):
        qs, lq, ks, lk = int(qs), int(lq), int(ks), int(lk)
        for q0 in range(0, lq, TILE):
            q1 = min(q0 + TILE, lq)
            k_end = q1 if block.causal else lk
            for k0 in range(0, k_end, TILE):
                k1 = min(k0 + TILE, k_end)
                diagonal = block.causal and k1 - 1 > q0
                yield (qs + q0, q1 - q0), (ks + k0, k1 - k0), q0, k0, diagonal


def _rows(x, rows):
    return x.narrow(0, *rows)


def _scores(qt, kt, scale, q0, k0, diagonal):
    s = torch.einsum("qhgd,khd->hgqk", qt, kt) * scale
    if diagonal:
        qi = torch.arange(q0, q0 + qt.shape[0], device=s.device).unsqueeze(1)
        ki = torch.arange(k0, k0 + kt.shape[0], device=s.device).unsqueeze(0)
        s = s.masked_fill(ki > qi, float("-inf"))
    return s


class TiledKernel(BlockKernel):
    """Tiled online softmax in plain torch (see the module docstring)."""

    name = "tiled"

    def forward(self, q, k, v, block, scale: float):
        acc = stat_dtype(q)
        hk = k.shape[1]
        qg = q.reshape(q.shape[0], hk, -1, q.shape[2])
        g = qg.shape[2]
        out = torch.zeros(qg.shape, dtype=acc, device=q.device)
        lse = torch.full((q.shape[0], hk, g), float("-inf"), dtype=acc, device=q.device)
        for qsl, ksl, q0, k0, diagonal in _tiles(block):
            s = _scores(_rows(qg, qsl).to(acc), _rows(k, ksl).to(acc), scale, q0, k0, diagonal)
            tile_lse = torch.logsumexp(s, dim=-1).permute(2, 0, 1)  # [tq, hk, g]
            tile_out = torch.einsum(
                "hgqk,khd->qhgd",
                torch.exp(s - tile_lse.permute(1, 2, 0).unsqueeze(-1)),
                _rows(v, ksl).to(acc),
            )
            o, m = merge(_rows(out, qsl), _rows(lse, qsl), tile_out, tile_lse)
            _rows(out, qsl).zero_().add_(o)  # not copy_: fake CUDA tensors refuse it on CPU
            _rows(lse, qsl).zero_().add_(m)
        return out.reshape(q.shape), lse.reshape(q.shape[:2])

    def backward(self, q, k, v, dout, out, lse, block, scale: float):
        acc = stat_dtype(q)
        hk, d = k.shape[1], q.shape[2]
        shape = (q.shape[0], hk, -1, d)
        qg, dog = q.reshape(shape), dout.to(acc).reshape(shape)
        lse_g = lse.to(acc).reshape(q.shape[0], hk, -1)
        delta = (dog * out.to(acc).reshape(shape)).sum(-1)  # [t, hk, g]
        dq = torch.zeros(qg.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qsl, ksl, q0, k0, diagonal in _tiles(block):
            qt, kt, vt = (_rows(x, r).to(acc) for x, r in ((qg, qsl), (k, ksl), (v, ksl)))
            do_t = _rows(dog, qsl)
            s = _scores(qt, kt, scale, q0, k0, diagonal)
            p = torch.exp(s - _rows(lse_g, qsl).permute(1, 2, 0).unsqueeze(-1))  # [hk, g, tq, tk]
            _rows(dv, ksl).add_(torch.einsum("hgqk,qhgd->khd", p, do_t))
            dp = torch.einsum("qhgd,khd->hgqk", do_t, vt)
            ds = p * (dp - _rows(delta, qsl).permute(1, 2, 0).unsqueeze(-1)) * scale
            _rows(dq, qsl).add_(torch.einsum("hgqk,khd->qhgd", ds, kt))
            _rows(dk, ksl).add_(torch.einsum("hgqk,qhgd->khd", ds, qt))
        return dq.reshape(q.shape), dk, dv
