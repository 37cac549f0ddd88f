"""Loader micro-batch -> this rank's model inputs (the explicit long-context data path).

    loader micro-batch [b, S] + cu_seqlens over the b*S flattened tokens
      -> flatten to one THD sequence [1, b*S]
      -> group documents into zigzag units (parallel.units), pad each unit to a multiple of
         2 x CP                                                (parallel.cp_split.pad_documents_for_cp)
      -> keep chunks r and 2CP-1-r of every unit              (parallel.cp_split.cp_split)
      -> megatron PackedSeqParams (qkv_format="thd")         (parallel.cp_split.packed_seq_params_for_rank)

Padding tokens carry loss_mask 0 and are masked out of attention, so they change nothing but the
amount of work. Inside the model megatron restarts RoPE positions at each unit (THD RoPE); the
documents inside a unit travel as ``packed_seq_params.doc_spans`` to the core attention. With
document masking this equals ProLong's un-reset positions because RoPE is relative.
"""

from __future__ import annotations

import torch

from megatron_longctx.parallel.cp_split import (
    cp_split,
    packed_seq_params_for_rank,
    pad_documents_for_cp,
)


def to_model_batch(
    micro: dict, cp_size: int = 1, cp_rank: int = 0, cp_group=None, sharding: str = "document"
) -> dict:
    """This CP rank's model inputs for one loader micro-batch (see module docstring);
    ``sharding`` is parallel/units.py's (``"document"``: one unit per document)."""
    flat = {k: micro[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    flat["cu_seqlens"] = micro["cu_seqlens"].to(torch.int32)
    padded = pad_documents_for_cp(flat, cp_size, sharding=sharding)
    local = cp_split(padded, cp_size, cp_rank)
    return {
        "tokens": local["tokens"],
        "labels": local["labels"],
        "loss_mask": local["loss_mask"].float(),
        "position_ids": local["position_ids"],
        "packed_seq_params": packed_seq_params_for_rank(local, cp_group),
        "num_padding": int(padded["tokens"].shape[1] - flat["tokens"].shape[1]),
        "doc_lengths": flat["cu_seqlens"].diff(),
    }
