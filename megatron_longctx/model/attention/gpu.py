"""GPU-only kernels behind the same interfaces as the pure-torch path. Untested on GPU.

The flash-attention block kernels live in kernel_cuda.py (chosen through kernels.resolve_kernel).

* ``te_core_attention()``: Transformer Engine's own CP attention (``TEDotProductAttention``), which
  consumes the same THD layout (per-document zigzag, ``cu_seqlens_*_padded``) with its own ring /
  a2a communication (``cp_comm_type``). Untested on GPU.

Import-guarded: importing this module never requires Transformer Engine.
Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]``.
"""

from __future__ import annotations

import importlib.util

import torch


def te_core_attention() -> type:
    """Transformer Engine's ``TEDotProductAttention`` (CP via TE). Untested on GPU."""
    if not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")):
        raise RuntimeError(
            "core attention 'te' needs CUDA and Transformer Engine "
            "(pip install '.[gpu]'); on CPU use 'ring' or 'a2a'"
        )
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention
