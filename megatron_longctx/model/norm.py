"""A torch norm for megatron's local spec that works with sequence parallelism.

megatron-core 0.16.1's local spec normalises with ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``. Nothing in a norm needs more than that assertion removed: under
sequence parallelism each TP rank normalises its own tokens ``[s / TP, b, h]`` with a replicated
weight, so the weight's gradient is a partial sum over the rank's tokens. Megatron's
``finalize_model_grads`` all-reduces (sums) over TP the gradient of every parameter marked
``sequence_parallel`` (TE's norms are marked the same way); ``SequenceParallelTorchNorm`` marks its
parameters, and otherwise builds exactly WrappedTorchNorm's torch module (same state-dict keys).
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm`` with sequence parallelism (see module docstring)."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
            raise ValueError(
                "zero-centred gamma / persist_layer_norm need Transformer Engine or apex norms"
            )
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization must be one of {sorted(norms)} for the torch norm")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
