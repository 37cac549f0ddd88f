"""GPU-only kernels behind the same interfaces as the pure-torch path. Untested on GPU.

* ``flash_varlen_local_kernel``: a ``local_attention(q, k, v, meta, scale)`` for the all-to-all
  mode (and CP 1) using flash-attn's varlen kernel. Untested on GPU.
* ``te_core_attention()``: Transformer Engine's own CP attention (``TEDotProductAttention``), which
  consumes the same THD layout (per-document zigzag, ``cu_seqlens_*_padded``) with its own ring /
  a2a communication (``cp_comm_type``). Untested on GPU.

Both are import-guarded: importing this module never requires flash-attn or Transformer Engine.
Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]``.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_longctx.model.attention.kernel_torch import TokenMeta


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def flash_varlen_local_kernel(q, k, v, meta: TokenMeta, scale: float) -> torch.Tensor:
    """Document-masked causal attention of a gathered sequence with flash-attn varlen.

    Untested on GPU. Tokens are reordered into document order (the gathered sequence is in
    CP-rank order), each padded document is one varlen segment with a causal mask, and padding
    queries are zeroed afterwards (a real query never sees padding: it sits at the document end).
    """
    if not flash_attn_available():
        raise RuntimeError(
            "flash-attn varlen needs CUDA and the flash_attn package "
            "(pip install '.[gpu]'); use the pure-torch kernel on CPU"
        )
    from flash_attn import flash_attn_varlen_func

    order = torch.argsort(meta.doc * (meta.pos.max() + 1) + meta.pos)
    counts = torch.bincount(meta.doc)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(counts, 0)
    max_len = int(counts.max())
    out = flash_attn_varlen_func(
        q[order], k[order], v[order], cu, cu, max_len, max_len, softmax_scale=scale, causal=True
    )
    out = out * meta.valid[order][:, None, None]
    return torch.empty_like(out).index_copy_(0, order, out)


def te_core_attention() -> type:
    """Transformer Engine's ``TEDotProductAttention`` (CP via TE). Untested on GPU."""
    if not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")):
        raise RuntimeError(
            "core attention 'te' needs CUDA and Transformer Engine "
            "(pip install '.[gpu]'); on CPU use 'ring' or 'a2a'"
        )
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention
