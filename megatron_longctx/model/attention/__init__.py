"""Document-masked, context-parallel core attention for megatron-core's layer spec.

Pick one by name with ``core_attention_class(name, kernel)`` (model/specs.py does):

* ``"local"``: document-masked attention, CP 1 (pure torch).
* ``"ring"``: ring / p2p CP (pure torch block kernel, log-sum-exp merging).
* ``"a2a"``: all-to-all (Ulysses) CP; ``kernel="flash"`` uses flash-attn varlen (untested on GPU).
* ``"te"``: Transformer Engine's own CP attention (GPU only, untested on GPU).

All consume megatron's THD ``PackedSeqParams`` in the zigzag-within-documents layout produced by
``parallel.cp_split`` (see that module for the layout).
"""

from __future__ import annotations

from megatron_longctx.model.attention.core import (
    AllToAllCoreAttention,
    LocalCoreAttention,
    RingCoreAttention,
)

CORE_ATTENTIONS = ("local", "ring", "a2a", "te")


def core_attention_class(name: str, kernel: str = "torch") -> type:
    """The core-attention class for ``name`` (CORE_ATTENTIONS); kernel: "torch" | "flash"."""
    if name not in CORE_ATTENTIONS:
        raise ValueError(f"core attention must be one of {CORE_ATTENTIONS}, got {name!r}")
    if kernel not in ("torch", "flash"):
        raise ValueError(f"attention kernel must be 'torch' or 'flash', got {kernel!r}")
    if name == "te":
        from megatron_longctx.model.attention.gpu import te_core_attention

        return te_core_attention()
    if kernel == "flash":
        if name == "ring":
            raise ValueError(
                "the flash kernel is wired for 'a2a' and 'local'; for ring CP on GPU "
                "use core attention 'te'"
            )
        from megatron_longctx.model.attention.gpu import flash_varlen_local_kernel

        base = AllToAllCoreAttention
        return type(
            f"Flash{base.__name__}",
            (base,),
            {"local_kernel": staticmethod(flash_varlen_local_kernel)},
        )
    return {"local": LocalCoreAttention, "ring": RingCoreAttention, "a2a": AllToAllCoreAttention}[
        name
    ]


__all__ = [
    "AllToAllCoreAttention",
    "CORE_ATTENTIONS",
    "LocalCoreAttention",
    "RingCoreAttention",
    "core_attention_class",
]
