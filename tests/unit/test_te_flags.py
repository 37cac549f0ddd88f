"""Defect 8 (issue 20): Transformer Engine gets ``pad_between_seqs=True`` (TE#3331).

TE cannot be installed on CPU, so this proves the plumbing, not TE's numerics: the batch's
PackedSeqParams carry the flag to the device; the TE core attention class makes megatron-core's
own keyword construction (read from its source, so a megatron change fails here) include it.
Untested on GPU: TE's attention output itself.
"""

import dataclasses
import importlib.util
from pathlib import Path

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_longctx.model.attention.gpu import THDPackedSeqParams, with_pad_between_seqs
from megatron_longctx.training.batch import batch_to_device, to_model_batch

MEGATRON_KWARGS = "{key: getattr(packed_seq_params, key) for key in self.kept_packed_seq_params}"


def _micro():
    docs = [8, 9]  # only the last document is padded at CP 2 (TE#3331), padded [0, 8, 20]
    total = sum(docs)
    return {
        "tokens": torch.arange(total)[None],
        "labels": torch.arange(total)[None],
        "loss_mask": torch.ones(1, total),
        "position_ids": torch.arange(total)[None],
        "cu_seqlens": torch.tensor([0, 8, 17]),
    }


class _MegatronLikeTE:
    """Stand-in for megatron's TEDotProductAttention: its __init__'s kept set and its forward's
    keyword construction (MEGATRON_KWARGS), nothing else."""

    def __init__(self):
        self.kept_packed_seq_params = {f.name for f in dataclasses.fields(PackedSeqParams)}

    def te_kwargs(self, packed_seq_params):
        return {key: getattr(packed_seq_params, key) for key in self.kept_packed_seq_params}


def test_megatron_builds_te_kwargs_from_the_kept_set():
    """The mechanism relied on is megatron-core 0.16.1's own code."""
    spec = importlib.util.find_spec("megatron.core")
    source = (Path(spec.origin).parent / "extensions" / "transformer_engine.py").read_text()
    assert MEGATRON_KWARGS in source
    assert "field.name for field in dataclasses.fields(PackedSeqParams)" in source


def test_pad_between_seqs_reaches_te():
    batch = batch_to_device(to_model_batch(_micro(), 2, 0), "meta")
    psp = batch["packed_seq_params"]
    assert isinstance(psp, THDPackedSeqParams) and psp.pad_between_seqs is True
    assert psp.cu_seqlens_q_padded.device.type == "meta"
    # TE <= 2.17's auto-detect would see no padding between documents here:
    host = to_model_batch(_micro(), 2, 0)["packed_seq_params"]
    assert torch.equal(host.cu_seqlens_q_padded[:-1], host.cu_seqlens_q[:-1])
    assert not torch.equal(host.cu_seqlens_q_padded, host.cu_seqlens_q)
    plain = _MegatronLikeTE().te_kwargs(psp)
    assert "pad_between_seqs" not in plain  # megatron's own class drops the flag
    kwargs = with_pad_between_seqs(_MegatronLikeTE)().te_kwargs(psp)
    assert kwargs["pad_between_seqs"] is True
    assert kwargs["qkv_format"] == "thd"


def test_te_backend_uses_the_flagged_attention(monkeypatch):
    from megatron_longctx.model import specs
    monkeypatch.setattr(specs, "resolve_backend", lambda backend="auto": "te")
    assert specs.core_attention_name("auto", "auto", 1) == "te"
    assert specs.core_attention_name("ring", "auto", 2) == "ring"  # an explicit choice is kept
    monkeypatch.setattr(specs, "resolve_backend", lambda backend="auto": "local")
    assert specs.core_attention_name("auto", "auto", 2) == "ring"
    assert specs.core_attention_name("auto", "auto", 1) == "local"
