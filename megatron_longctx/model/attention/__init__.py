"""Document-masked, context-parallel core attention for megatron-core's layer spec.

Pick one by name with ``core_attention_class(name, kernel)`` (model/specs.py does):

* ``"local"``: document-masked attention, CP 1.
* ``"ring"``: ring / p2p CP (block kernel per ring step, log-sum-exp merging).
* ``"a2a"``: all-to-all (Ulysses) CP (block kernel on the gathered sequence).
* ``"te"``: Transformer Engine's own CP attention (GPU only, untested on GPU).

``kernel`` (kernels.KERNELS) picks the block kernel under local / ring / a2a: ``auto`` (default:
torch's CPU flash kernel on CPU, flash-attn or torch's CUDA flash varlen on GPU), ``cpu_flash``,
``torch_flash``, ``flash_attn``. All consume megatron's THD ``PackedSeqParams`` in the
zigzag-within-documents layout produced by ``parallel.cp_split`` (blocks.py describes it).
"""

from __future__ import annotations

from megatron_longctx.model.attention.core import (
    AllToAllCoreAttention,
    LocalCoreAttention,
    RingCoreAttention,
)
from megatron_longctx.model.attention.kernels import KERNELS

CORE_ATTENTIONS = ("local", "ring", "a2a", "te")


def core_attention_class(name: str, kernel: str = "auto") -> type:
    """The core-attention class for ``name`` (CORE_ATTENTIONS) with block kernel ``kernel``."""
    if name not in CORE_ATTENTIONS:
        raise ValueError(f"core attention must be one of {CORE_ATTENTIONS}, got {name!r}")
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if name == "te":
        from megatron_longctx.model.attention.gpu import te_core_attention

        return te_core_attention()
    base = {"local": LocalCoreAttention, "ring": RingCoreAttention, "a2a": AllToAllCoreAttention}[
        name
    ]
    if kernel == "auto":
        return base
    suffix = "".join(part.capitalize() for part in kernel.split("_"))
    return type(f"{base.__name__}{suffix}", (base,), {"kernel_name": kernel})


__all__ = [
    "AllToAllCoreAttention",
    "CORE_ATTENTIONS",
    "KERNELS",
    "LocalCoreAttention",
    "RingCoreAttention",
    "core_attention_class",
]
