"""Loader micro-batch -> this rank's model inputs (the explicit long-context data path).

    loader micro-batch [b, S] + cu_seqlens over the b*S flattened tokens
      -> flatten to one THD sequence [1, b*S]
      -> lay documents out in zigzag units and cut each into 2 x CP chunks (parallel.units:
         "balanced" unequal chunks without padding, or units padded to a multiple of 2 x CP)
                                                              (parallel.cp_split.pad_documents_for_cp)
         and every CP rank's share to a multiple of TP under sequence parallelism
         (parallel.layout.token_multiple: megatron scatters each CP rank's tokens over TP)
      -> keep chunks r and 2CP-1-r of every unit              (parallel.cp_split.cp_split)
      -> megatron PackedSeqParams (qkv_format="thd")         (parallel.cp_split.packed_seq_params_for_rank)
         + the attention's block layout, planned from the host boundaries (model.attention.blocks)
      -> onto the training device: pinned host buffers, non-blocking copies, the blocks' index
         tensors in one copy; nothing is read back from the device

``BatchSharding.host`` is the host half (the input pipeline's prefetch thread runs it ahead,
training/prefetch.py), ``BatchSharding.to_device`` the device half (the training thread).

Padding tokens carry loss_mask 0 and are masked out of attention, so they change nothing but the
amount of work. Inside the model megatron restarts RoPE positions at each unit (THD RoPE; with
unequal chunks the positions come with the batch, cp_split.bind_rope_positions); the documents
and chunks of the units travel as ``packed_seq_params.doc_spans`` / ``cp_chunks`` to the core
attention. With document masking this equals ProLong's un-reset positions because RoPE is
relative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_longctx.parallel.cp_split import (
    HOST_ATTRIBUTES,
    bind_rope_positions,
    cp_split,
    packed_seq_params_for_rank,
    pad_documents_for_cp,
)
from megatron_longctx.parallel.layout import token_multiple


@dataclass(frozen=True)
class BatchSharding:
    """This rank's place in the batch path, fixed for a stage: ``shard(micro)`` is its model
    inputs on the training device.

    Attributes:
        cp_size / cp_rank / cp_group: this rank's place in the CP group.
        sharding: parallel/units.py's CP sharding.
        sp_size: the TP size when sequence parallelism is on, else 1.
        device: the training device (None: tensors stay on the host).
    """

    cp_size: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    sharding: str = "document"
    sp_size: int = 1
    device: torch.device | str | None = None

    @classmethod
    def for_layout(cls, layout, sharding: str, device) -> BatchSharding:
        """This rank's batch path under ``layout`` (megatron's groups initialised for it)."""
        from megatron.core import parallel_state

        return cls(
            cp_size=layout.context_parallel_size,
            cp_rank=parallel_state.get_context_parallel_rank(),
            cp_group=parallel_state.get_context_parallel_group(),
            sharding=sharding,
            sp_size=layout.tensor_model_parallel_size if layout.sequence_parallel else 1,
            device=device,
        )

    def __call__(self, micro: dict) -> dict:
        return self.to_device(self.host(micro))

    def host(self, micro: dict) -> dict:
        """The host half: this rank's model inputs on the host, pinned when they go to CUDA."""
        batch = to_model_batch(
            micro, self.cp_size, self.cp_rank, self.cp_group, self.sharding, sp_size=self.sp_size
        )
        if self.device is not None and torch.device(self.device).type == "cuda":
            batch = pin(batch)
        return batch

    def to_device(self, batch: dict) -> dict:
        """The device half: ``batch_to_device`` (identity without a device)."""
        if self.device is None:
            return batch
        return batch_to_device(batch, self.device, cp_rank=self.cp_rank)


def to_model_batch(
    micro: dict,
    cp_size: int = 1,
    cp_rank: int = 0,
    cp_group=None,
    sharding: str = "document",
    *,
    sp_size: int = 1,
) -> dict:
    """This CP rank's model inputs for one loader micro-batch, on the host (see module docstring).

    Args:
        micro: the loader's micro-batch (CPU tensors).
        cp_size / cp_rank / cp_group: this rank's place in the CP group.
        sharding: parallel/units.py's CP sharding (``"document"``: one unit per document).
        sp_size: the TP size under sequence parallelism (1 without it): the sequence is padded
            (a padding-only document at the end) to a multiple of 2 x CP x ``sp_size``.
    """
    flat = {k: micro[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    flat["cu_seqlens"] = micro["cu_seqlens"].to(torch.int32)
    multiple = token_multiple(cp_size, sp_size, sequence_parallel=True)
    if sharding == "balanced":  # unequal chunks: only every rank's count must be a multiple of SP
        multiple //= 2
    padded = pad_documents_for_cp(flat, cp_size, sharding=sharding)
    if padded["tokens"].shape[1] % multiple:
        pad_to = -(-padded["tokens"].shape[1] // multiple) * multiple
        padded = pad_documents_for_cp(flat, cp_size, pad_to=pad_to, sharding=sharding)
    local = cp_split(padded, cp_size, cp_rank)
    return {
        "tokens": local["tokens"],
        "labels": local["labels"],
        "loss_mask": local["loss_mask"].float(),
        "position_ids": local["position_ids"],
        "packed_seq_params": _thd(packed_seq_params_for_rank(local, cp_group), cp_size),
        "num_padding": int(padded["tokens"].shape[1] - flat["tokens"].shape[1]),
        "doc_lengths": flat["cu_seqlens"].diff(),
    }


def _thd(psp, cp_size: int):
    """The same parameters as THDPackedSeqParams: TE also gets ``pad_between_seqs=True``
    (TE#3331, model/attention/gpu.py); every other core attention ignores the field. Plus the
    attention's block layout (``cp_layout``), built here from the host boundaries so that the
    core attention reads nothing back from the device."""
    from dataclasses import fields

    from megatron_longctx.model.attention.blocks import CPLayout
    from megatron_longctx.model.attention.gpu import THDPackedSeqParams

    out = THDPackedSeqParams(**{f.name: getattr(psp, f.name) for f in fields(psp)})
    for name in HOST_ATTRIBUTES:  # documents and chunks inside units, RoPE positions
        setattr(out, name, getattr(psp, name, None))
    spans = getattr(psp, "doc_spans", None)
    docs = None if spans is None else (spans[:, 0].tolist(), spans[:, 1].tolist())
    padded = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
    chunks = getattr(psp, "cp_chunks", None)
    try:
        out.cp_layout = CPLayout(padded, psp.cu_seqlens_q, cp_size, docs, chunks)
    except ValueError:  # a layout only TE's attention takes: the project's attention raises then
        out.cp_layout = None
    return out


_MOVED = ("tokens", "labels", "loss_mask", "position_ids")
_CU = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")


def pin(batch: dict) -> dict:
    """The tensors ``batch_to_device`` copies, in pinned (page-locked) host memory, so the copies
    run asynchronously; unchanged without a CUDA driver (fake CUDA tensors in the tests)."""
    if not torch.cuda.is_available():
        return batch
    from dataclasses import replace

    out = {**batch, **{key: batch[key].pin_memory() for key in _MOVED}}
    psp = batch["packed_seq_params"]
    out["packed_seq_params"] = replace(
        psp, **{n: getattr(psp, n).pin_memory() for n in _CU if getattr(psp, n) is not None}
    )
    for name in (*HOST_ATTRIBUTES, "cp_layout"):
        setattr(out["packed_seq_params"], name, getattr(psp, name, None))
    return out


def batch_to_device(batch: dict, device: torch.device | str, cp_rank: int = 0) -> dict:
    """The model inputs on ``device``: per-token tensors and every ``cu_seqlens`` of the
    ``PackedSeqParams`` (non-blocking copies), and on CUDA the index tensors of every attention
    block of CP rank ``cp_rank`` (``CPLayout.plan_device``: one copy). ``doc_lengths`` and the
    block layout stay on the host: the metrics and the attention read them there. ``max_seqlen_*``
    stay Python ints, so no kernel needs a host sync for them."""
    from dataclasses import replace

    device = torch.device(device)
    out = dict(batch)
    for key in _MOVED:
        out[key] = batch[key].to(device, non_blocking=True)
    psp = batch["packed_seq_params"]
    moved = {
        name: getattr(psp, name).to(device, non_blocking=True)
        for name in _CU
        if getattr(psp, name) is not None
    }
    out["packed_seq_params"] = replace(psp, **moved)
    for name in (*HOST_ATTRIBUTES, "cp_layout"):  # read on the host (RoPE positions: bound below)
        setattr(out["packed_seq_params"], name, getattr(psp, name, None))
    bind_rope_positions(out["packed_seq_params"])
    layout = getattr(psp, "cp_layout", None)
    if layout is not None and device.type == "cuda":  # the CUDA kernels' index tensors
        layout.plan_device(device, cp_rank)
    return out
