"""Loader micro-batch -> this rank's model inputs (the explicit long-context data path).

    loader micro-batch [b, S] + cu_seqlens over the b*S flattened tokens
      -> flatten to one THD sequence [1, b*S]
      -> lay documents out in zigzag units and cut each into 2 x CP chunks (parallel.units:
         "balanced" unequal chunks without padding, or units padded to a multiple of 2 x CP)
                                                              (parallel.cp_split.pad_documents_for_cp)
         and every CP rank's share to a multiple of TP under sequence parallelism
         (parallel.layout.token_multiple: megatron scatters each CP rank's tokens over TP)
      -> keep chunks r and 2CP-1-r of every unit              (parallel.cp_split.cp_split)
      -> onto the training device (non-blocking copies)
      -> megatron PackedSeqParams (qkv_format="thd")         (parallel.cp_split.packed_seq_params_for_rank)

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

    def __call__(self, micro: dict) -> dict:
        batch = to_model_batch(
            micro, self.cp_size, self.cp_rank, self.cp_group, self.sharding, sp_size=self.sp_size
        )
        return batch if self.device is None else batch_to_device(batch, self.device)


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
        "packed_seq_params": _thd(packed_seq_params_for_rank(local, cp_group)),
        "num_padding": int(padded["tokens"].shape[1] - flat["tokens"].shape[1]),
        "doc_lengths": flat["cu_seqlens"].diff(),
    }


def _thd(psp):
    """The same parameters as THDPackedSeqParams: TE also gets ``pad_between_seqs=True``
    (TE#3331, model/attention/gpu.py); every other core attention ignores the field."""
    from dataclasses import fields

    from megatron_longctx.model.attention.gpu import THDPackedSeqParams

    out = THDPackedSeqParams(**{f.name: getattr(psp, f.name) for f in fields(psp)})
    for name in HOST_ATTRIBUTES:  # documents and chunks inside units, RoPE positions
        setattr(out, name, getattr(psp, name, None))
    return out


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    """The model inputs on ``device``: per-token tensors and every ``cu_seqlens`` of the
    ``PackedSeqParams`` (non-blocking copies). ``doc_lengths`` stays on the host: only the
    metrics read it. ``max_seqlen_*`` stay Python ints, so no kernel needs a host sync for them."""
    from dataclasses import replace

    out = dict(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = batch[key].to(device, non_blocking=True)
    psp = batch["packed_seq_params"]
    moved = {
        name: getattr(psp, name).to(device, non_blocking=True)
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
        if getattr(psp, name) is not None
    }
    out["packed_seq_params"] = replace(psp, **moved)
    for name in HOST_ATTRIBUTES:  # read on the host (the RoPE positions are bound on the device)
        setattr(out["packed_seq_params"], name, getattr(psp, name, None))
    bind_rope_positions(out["packed_seq_params"])
    return out
