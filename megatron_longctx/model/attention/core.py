"""Core attention modules for megatron-core's layer spec (in place of ``DotProductAttention``).

``SelfAttention`` hands the core attention q/k/v after RoPE, plus ``packed_seq_params``:

* THD (``packed_seq_params.qkv_format == 'thd'``): q ``[t, hq, d]``, k / v ``[t, hk, d]`` with the
  rank's local tokens in the zigzag-within-units layout (parallel/cp_split.py); the boundaries
  ``cu_seqlens_*_padded`` (padded units) and ``cu_seqlens_*`` (real lengths) describe the whole
  sequence, ``packed_seq_params.doc_spans`` (int [num_docs, 2], set by
  ``packed_seq_params_for_rank``; absent: one document per unit) the documents inside the units
  and ``packed_seq_params.cp_chunks`` (absent: equal chunks) the chunks of the units.
  Output ``[t, hq * d]``.
* SBHD (no packed_seq_params): q ``[s, b, hq, d]`` - every row is one causal document, split by
  megatron's ``get_batch_on_this_cp_rank`` zigzag (the same rule with one document). Output
  ``[s, b, hq * d]``.

Subclasses pick the CP scheme: ``LocalCoreAttention`` (CP 1 only), ``RingCoreAttention`` (p2p),
``AllToAllCoreAttention`` (Ulysses). The CP group is megatron's (``pg_collection.cp``).
"""

from __future__ import annotations

import logging
import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_longctx.model.attention.a2a import a2a_attention, check_a2a_heads
from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.model.attention.kernels import resolve_kernel
from megatron_longctx.model.attention.ring import ring_attention

logger = logging.getLogger(__name__)


class _CPCoreAttention(MegatronModule):
    """Shared plumbing: argument checks, THD/SBHD handling, layout caching. See module docstring."""

    mode = "ring"
    #: block kernel name (model/attention/kernels.py KERNELS); "auto" picks per device and dtype.
    kernel_name = "auto"

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        from megatron.core import parallel_state

        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"{type(self).__name__} implements causal (document-masked) attention "
                f"only, got attn_mask_type {attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"{type(self).__name__} has no attention dropout, got {dropout}")
        self.layer_number = max(1, layer_number)
        self.cp_group = (
            getattr(pg_collection, "cp", None)
            if pg_collection is not None
            else parallel_state.get_context_parallel_group()
        )
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        if cp_size != config.context_parallel_size:
            raise ValueError(
                f"CP group size {cp_size} != config.context_parallel_size "
                f"{config.context_parallel_size}"
            )
        self.cp_size = cp_size
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        tp = config.tensor_model_parallel_size
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(config.num_query_groups // tp, 1)
        self._check_sizes()

    def _check_sizes(self) -> None:
        pass

    def _kernel(self, q: torch.Tensor):
        return resolve_kernel(self.kernel_name, q.device, q.dtype)  # cached per device and dtype

    def _layout(self, packed_seq_params) -> CPLayout:
        """The batch's CPLayout, shared by every layer: the one the batch path planned on the host
        (``packed_seq_params.cp_layout``, training/batch.py), else built here once per micro-batch
        from the boundaries (reading them back when they are on the device: a host sync)."""
        for name in ("cp_layout", "_longctx_layout"):
            cached = getattr(packed_seq_params, name, None)
            if cached is not None and cached.cp_size == self.cp_size:
                return cached
        padded = packed_seq_params.cu_seqlens_q_padded
        real = packed_seq_params.cu_seqlens_q
        if padded is None:
            padded = real
        if packed_seq_params.cu_seqlens_kv_padded is not None and not torch.equal(
            packed_seq_params.cu_seqlens_kv_padded, padded
        ):
            raise ValueError("self-attention needs cu_seqlens_kv_padded == cu_seqlens_q_padded")
        spans = getattr(packed_seq_params, "doc_spans", None)
        docs = None if spans is None else (spans[:, 0].tolist(), spans[:, 1].tolist())
        layout = CPLayout(
            padded, real, self.cp_size, docs, getattr(packed_seq_params, "cp_chunks", None)
        )
        packed_seq_params._longctx_layout = layout
        return layout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """q/k/v as described in the module docstring; returns ``[t, hq*d]`` or ``[s, b, hq*d]``."""
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            layout = self._layout(packed_seq_params)
            if query.shape[0] != layout.local_tokens:
                raise ValueError(
                    f"rank holds {query.shape[0]} tokens but the boundaries give "
                    f"{layout.local_tokens} per CP rank (padded total / CP)"
                )
            out = self._attend(query, key, value, layout)
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None:
            raise ValueError(
                f"qkv_format {packed_seq_params.qkv_format!r} is not supported; "
                f"use 'thd' or no packed_seq_params"
            )
        s, b, hq, d = query.shape
        full = s * self.cp_size
        cu = [i * full for i in range(b + 1)]
        layout = CPLayout(cu, cu, self.cp_size)
        to_thd = lambda x: x.transpose(0, 1).reshape(b * s, x.shape[2], d)  # noqa: E731
        out = self._attend(to_thd(query), to_thd(key), to_thd(value), layout)
        return out.reshape(b, s, hq * d).transpose(0, 1).contiguous()

    def _attend(self, q, k, v, layout: CPLayout):
        raise NotImplementedError


class RingCoreAttention(_CPCoreAttention):
    """Ring (p2p) CP attention with the pure-torch block kernel (model/attention/ring.py)."""

    mode = "ring"

    def _attend(self, q, k, v, layout: CPLayout):
        group = self.cp_group if self.cp_size > 1 else None
        return ring_attention(q, k, v, layout, self.softmax_scale, group, self._kernel(q))


class LocalCoreAttention(RingCoreAttention):
    """Document-masked attention without CP (CP must be 1): the ring with one rank."""

    mode = "local"

    def _check_sizes(self) -> None:
        if self.cp_size != 1:
            raise ValueError(
                f"core attention 'local' needs CP 1, got CP {self.cp_size}; use 'ring' or 'a2a'"
            )


class AllToAllCoreAttention(_CPCoreAttention):
    """All-to-all (Ulysses) CP attention (model/attention/a2a.py)."""

    mode = "a2a"

    def _check_sizes(self) -> None:
        check_a2a_heads(self.num_heads, self.num_kv_heads, self.cp_size)

    def _attend(self, q, k, v, layout: CPLayout):
        group = self.cp_group if self.cp_size > 1 else None
        return a2a_attention(q, k, v, layout, self.softmax_scale, group, self._kernel(q))
