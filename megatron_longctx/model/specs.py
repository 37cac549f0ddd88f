"""The only place that chooses Transformer Engine vs local layers and the core attention.

``layer_spec(backend)`` (and ``block_spec``, which adds the final norm under sequence parallelism):
  * "local": megatron-core's own modules (torch RMSNorm, ColumnParallel/RowParallel linears,
    DotProductAttention). The CPU path, and the numerical reference.
  * "te": Transformer Engine fused layers (GPU only; import-guarded; untested on GPU in this project).
  * "auto": "te" when the training device is CUDA and Transformer Engine is installed, else
    "local" (``resolve_backend``; the builders resolve it once and pass the concrete name on).
The core attention (``core_attention_name``: local | ring | a2a | te, with a block kernel from
``model.attention.KERNELS``) replaces ``submodules.self_attention.submodules.core_attention`` of the
chosen spec; a new attention or kernel is added to ``model/attention/``'s registries only.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "local", "te")


def transformer_engine_available() -> bool:
    """Transformer Engine imports and is a supported version (else logs why not)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron_longctx.model.attention.gpu import (
        TransformerEngineUnavailable,
        check_transformer_engine,
    )

    try:
        check_transformer_engine()
    except TransformerEngineUnavailable as err:
        logger.warning("Transformer Engine is installed but unusable: %s", err)
        return False
    return True


def resolve_backend(backend: str = "auto", device: torch.device | None = None) -> str:
    """The concrete backend ("local" | "te"). "auto" asks the training ``device`` (None: the
    CPU), never the machine: ``LONGCTX_DEVICE=cpu`` on a GPU node builds local layers.
    ``build_stage`` resolves it once and hands the concrete name on."""
    if backend not in BACKENDS:
        raise ValueError(f"model backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_gpu = device is not None and device.type == "cuda"
        return "te" if on_gpu and transformer_engine_available() else "local"
    if backend == "te":
        from megatron_longctx.model.attention.gpu import check_transformer_engine

        check_transformer_engine()  # missing / half-installed / unsupported TE: one line, the fix
    return backend


def core_attention_name(requested: str, backend: str, cp_size: int) -> str:
    """The core attention a stage runs. ``requested`` other than "auto" is kept; "auto" is
    Transformer Engine's own THD/CP attention ("te", with ``pad_between_seqs``,
    model/attention/gpu.py) when the TE backend is in use (GPU, untested here), else the
    project's document-masked attention: "local" for CP 1, "ring" for CP > 1."""
    if requested != "auto":
        return requested
    if resolve_backend(backend) == "te":
        return "te"
    return "local" if cp_size == 1 else "ring"


def core_attention_spec(requested: str, backend: str, cp_size: int, kernel: str = "auto") -> type:
    """The core-attention class (``core_attention_name``) with block kernel ``kernel``."""
    from megatron_longctx.model.attention import core_attention_class

    return core_attention_class(core_attention_name(requested, backend, cp_size), kernel)


def layer_spec(
    backend: str = "auto",
    core_attention: type | str | None = None,
    sequence_parallel: bool = False,
) -> ModuleSpec:
    """The transformer-layer spec for a Llama layer (RMSNorm chosen through the config).

    Args:
        backend: see the module docstring.
        core_attention: None (the backend's own), a class, or a name from
            ``model.attention.CORE_ATTENTIONS`` ("local" | "ring" | "a2a" | "te").
        sequence_parallel: with the local backend, the layer norms become
            ``model.norm.SequenceParallelTorchNorm`` (megatron's torch norm asserts without SP).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    backend = resolve_backend(backend)
    if backend == "te":  # untested on GPU
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        if sequence_parallel:
            from megatron_longctx.model.norm import SequenceParallelTorchNorm

            spec.submodules.input_layernorm = SequenceParallelTorchNorm
            spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if isinstance(core_attention, str):
        from megatron_longctx.model.attention import core_attention_class

        core_attention = core_attention_class(core_attention)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def block_spec(config, backend: str, core_attention, sequence_parallel: bool):
    """What GPTModel gets as ``transformer_layer_spec``: the layer spec, or with sequence
    parallelism on the local backend a block spec whose final norm is also
    ``SequenceParallelTorchNorm`` (megatron would add its asserting WrappedTorchNorm)."""
    spec = layer_spec(backend, core_attention, sequence_parallel)
    if not (sequence_parallel and resolve_backend(backend) == "local"):
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_longctx.model.norm import SequenceParallelTorchNorm

    num_layers = get_num_layers_to_build(config)
    submodules = TransformerBlockSubmodules(
        layer_specs=[spec] * num_layers, layer_norm=SequenceParallelTorchNorm
    )
    return ModuleSpec(module=TransformerBlock, submodules=submodules)
