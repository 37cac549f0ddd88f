"""The block-kernel interface under the ring, all-to-all and local schedulers, and its registry.

A kernel computes one ``VarlenBlock`` (model/attention/blocks.py):

* ``forward(q, k, v, block, scale) -> (out, lse)``: out ``[num_q, hq, d]`` fp32, normalised within
  the block; lse ``[num_q, hq]`` fp32 (-inf, with out 0, on rows in no segment);
* ``backward(q, k, v, dout, out, lse, block, scale) -> (dq, dk, dv)``: gradients of this block's
  share given the *final* (merged over all blocks) out and lse, fp32, full tensor shapes (0 on
  rows in no segment). Because the softmax statistics are the final ones, the per-block gradients
  sum to the exact gradient (the flash-attention backward identity).

GQA: q has hq = g x hk heads; query head i uses key/value head i // g; K/V are never repeated.

Kernels (``KERNELS``): ``cpu_flash`` (torch's CPU flash kernel, kernel_cpu.py), ``torch_flash``
(torch's CUDA flash-attention varlen ops, kernel_cuda.py), ``flash_attn`` (the flash-attn package's
varlen ops, kernel_cuda.py), ``tiled`` (a plain-torch tiled online softmax for any device and
dtype, kernel_tiled.py). ``auto`` picks per device and dtype (``resolve_kernel``). The dense
reference (reference.py) is the tests' oracle, not a kernel.

Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]``, lse ``[t, hq]``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

KERNELS = ("auto", "cpu_flash", "torch_flash", "flash_attn", "tiled")


class BlockKernel:
    """Interface (see the module docstring); subclasses implement forward and backward."""

    name = "abstract"

    def forward(self, q, k, v, block, scale: float):
        raise NotImplementedError

    def backward(self, q, k, v, dout, out, lse, block, scale: float):
        raise NotImplementedError


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of softmax statistics and accumulators for inputs like ``x`` (fp64 stays fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cuda_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


@functools.cache
def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype) -> BlockKernel:
    """The kernel for ``name`` on this device and dtype; ``auto`` picks the scalable one.

    auto: CPU -> cpu_flash; CUDA with fp16/bf16 -> flash_attn when it imports and its version is
    supported (flash_attn_api.py; else torch_flash, with the reason logged once); CUDA fp32
    (flash-attention has no fp32 path) -> tiled. ``flash_attn`` asked for explicitly and not
    usable: ``FlashAttnUnavailable`` naming the fix.
    """
    if name not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            name = "cpu_flash"
        elif not _cuda_half(dtype):
            name = "tiled"
        else:
            name = "flash_attn" if _flash_attn_usable() else "torch_flash"
    if name == "tiled":
        from megatron_longctx.model.attention.kernel_tiled import TiledKernel

        return TiledKernel()
    if name == "cpu_flash":
        if device.type != "cpu":
            raise ValueError(f"attention kernel 'cpu_flash' runs on CPU tensors, got {device}")
        from megatron_longctx.model.attention.kernel_cpu import CPUFlashKernel

        return CPUFlashKernel()
    if device.type != "cuda" or not _cuda_half(dtype):
        raise ValueError(
            f"attention kernel {name!r} needs CUDA fp16/bf16 tensors, got {device} {dtype}; "
            f"use 'cpu_flash' (or 'auto') on CPU"
        )
    from megatron_longctx.model.attention import flash_attn_api, kernel_cuda

    if name == "flash_attn":
        flash_attn_api.load()  # raises FlashAttnUnavailable with the fix
        return kernel_cuda.FlashAttnKernel()
    return kernel_cuda.TorchFlashKernel()


def _flash_attn_usable() -> bool:
    """True when flash-attn imports and is a supported version; else logs why not (once per
    resolution: ``resolve_kernel`` is cached)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from megatron_longctx.model.attention import flash_attn_api

    try:
        flash_attn_api.load()
    except flash_attn_api.FlashAttnUnavailable as err:
        logger.warning("attention kernel auto: using torch_flash, not flash_attn: %s", err)
        return False
    return True


def merge(out, lse, block_out, block_lse):
    """Online-softmax merge of a block into the running (out, lse); safe when both are empty."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out = (
        out * torch.exp(lse - safe).unsqueeze(-1)
        + block_out * torch.exp(block_lse - safe).unsqueeze(-1)
    )
    return out, new_lse


class BlockAttention(torch.autograd.Function):
    """Autograd for one block on one process (CP 1 and the all-to-all's gathered sequence)."""

    @staticmethod
    def forward(ctx, q, k, v, block, scale: float, kernel: BlockKernel):
        out, lse = kernel.forward(q, k, v, block, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block, ctx.scale, ctx.kernel = block, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(q, k, v, dout, out, lse, ctx.block, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_attention(q, k, v, block, scale: float, kernel: BlockKernel) -> torch.Tensor:
    """Differentiable attention of one block; returns ``[num_q, hq, d]`` in q's dtype."""
    return BlockAttention.apply(q, k, v, block, scale, kernel)
