"""The only place that chooses Transformer Engine vs local layers and the core attention.

``layer_spec(backend)``:
  * "local": megatron-core's own modules (torch RMSNorm, ColumnParallel/RowParallel linears,
    DotProductAttention). The CPU path, and the numerical reference.
  * "te": Transformer Engine fused layers (GPU only; import-guarded; untested on GPU in this project).
  * "auto": "te" when CUDA and Transformer Engine are both available, else "local".
The context-parallel core attention (ring / all-to-all) plugs in here when it lands, by replacing
``submodules.self_attention.submodules.core_attention`` of the chosen spec.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

BACKENDS = ("auto", "local", "te")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"model backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if torch.cuda.is_available() and transformer_engine_available() else "local"
    if backend == "te" and not transformer_engine_available():
        raise RuntimeError(
            "backend 'te' needs Transformer Engine: pip install '.[gpu]' on a GPU "
            "machine, or use backend 'local'"
        )
    return backend


def check_sequence_parallel(backend: str, sequence_parallel: bool) -> None:
    """Sequence parallelism needs the Transformer Engine spec: megatron's local spec normalises with
    ``WrappedTorchNorm``, which asserts ``not sequence_parallel`` (megatron-core 0.16.1). Raises
    ``LayoutError`` with the fix instead of megatron's bare assertion at model build."""
    from megatron_longctx.parallel.layout import LayoutError

    if sequence_parallel and resolve_backend(backend) == "local":
        raise LayoutError(
            "parallel.sequence_parallel=true needs the Transformer Engine layers (backend 'te'): "
            "megatron-core's local spec (torch norm, WrappedTorchNorm) does not support sequence "
            "parallelism. Install TE (pip install '.[gpu]' on a GPU machine) and use "
            "training.backend=te or auto, or set parallel.sequence_parallel=false"
        )


def layer_spec(backend: str = "auto", core_attention: type | str | None = None) -> ModuleSpec:
    """The transformer-layer spec for a Llama layer (RMSNorm chosen through the config).

    Args:
        backend: see the module docstring.
        core_attention: None (the backend's own), a class, or a name from
            ``model.attention.CORE_ATTENTIONS`` ("local" | "ring" | "a2a" | "te").
    """
    from megatron.core.models.gpt import gpt_layer_specs

    backend = resolve_backend(backend)
    if backend == "te":  # untested on GPU
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if isinstance(core_attention, str):
        from megatron_longctx.model.attention import core_attention_class

        core_attention = core_attention_class(core_attention)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
