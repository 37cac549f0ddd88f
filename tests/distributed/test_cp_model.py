"""The CP core attention inside megatron-core's GPTModel, with megatron's own CP plumbing.

One 4-process launch runs every layout in turn (parallel_state is re-initialised between them) on
the same packed batch with the same weights (copied through model.full_state):

* reference: TP 1 x CP 1 with megatron's own ``DotProductAttention`` on a one-document batch vs
  our 'local' core attention with THD packed_seq_params (independent check of the whole path);
* TP 1 x CP 1 'local' on a multi-document packed batch vs CP 2 (ring, a2a), CP 4 (ring),
  TP 2 x CP 2 (ring) and the SBHD path (no packed_seq_params) at CP 2: loss and every parameter
  gradient must match; the same documents grouped into one zigzag unit (``sharding="sequence"``,
  documents inside the unit from ``doc_spans``) at CP 1 (local), CP 4 (ring), CP 2 (a2a) too,
  and the "balanced" layout (unequal chunks, ``cp_chunks``; RoPE positions bound to the batch)
  at CP 4 (ring), CP 2 (a2a) and TP 2 x CP 2 (ring).
DP fills the rest of the 4 processes with identical batches, which leaves the token mean unchanged.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.parallel.cp_split import pad_documents_for_cp
from megatron_longctx.testing.distributed import run_distributed

REAL_LENGTHS = [13, 3, 27, 1, 9]  # one document shorter than a CP-4 chunk, one long one
PAD_TO = 96


def _packed_batch(
    lengths: list[int], cp_multiple: int, pad_to: int | None, seed: int, sharding: str = "document"
) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    tokens = torch.randint(0, 500, (1, s + 1), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    batch = dict(
        tokens=tokens[:, :-1],
        labels=tokens[:, 1:],
        loss_mask=torch.ones(1, s),
        position_ids=torch.arange(s).unsqueeze(0),
        cu_seqlens=cu,
    )
    return pad_documents_for_cp(batch, cp_multiple, pad_to=pad_to, sharding=sharding)


def _run(layout, core, params, batch, packed: bool = True):
    """Builds the model for ``layout``, loads ``params``, runs one fwd+bwd; rank-0 results."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full, load_full
    from megatron_longctx.parallel.cp_split import cp_split, packed_seq_params_for_rank
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.setup import wrap_ddp
    from megatron_longctx.training.step import forward_backward

    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    cp = layout.context_parallel_size
    model = build_gpt_model(
        get_preset("tiny"),
        layout,
        backend="local",
        core_attention=core,
        seq_length=batch["tokens"].shape[1],
    )
    if params is not None:
        load_full(model, params)
    chunks = wrap_ddp([model])
    if packed:
        local = cp_split(batch, cp, parallel_state.get_context_parallel_rank())
        local["packed_seq_params"] = packed_seq_params_for_rank(
            local, parallel_state.get_context_parallel_group()
        )
    else:
        local = cp_split(
            {k: v for k, v in batch.items() if k != "cu_seqlens"},
            cp,
            parallel_state.get_context_parallel_rank(),
        )
    result = forward_backward(
        chunks, [local], seq_length=local["tokens"].shape[1], micro_batch_size=1
    )
    grads = gather_full(chunks[0], "grad")
    full_params = gather_full(chunks[0], "param")
    return result.loss, grads, full_params


def _worker(rank, world):
    from megatron_longctx.parallel.layout import ParallelLayout as L

    out = {}
    # One document, no padding: megatron's DotProductAttention (SBHD) vs our THD path.
    single = _packed_batch([32], 1, None, seed=1)
    single_sbhd = {k: single[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    loss, grads, params = _run(L(1, 1, 1), None, None, single_sbhd, packed=False)
    out["megatron_dpa"] = (loss, grads)
    out["local_thd_one_doc"] = _run(L(1, 1, 1), "local", params, single)[:2]
    out["ring_sbhd_cp2"] = _run(L(1, 1, 2), "ring", params, single_sbhd, packed=False)[:2]
    # Multi-document packed batch, padded for CP 4 (so every layout below can split it).
    batch = _packed_batch(REAL_LENGTHS, 4, PAD_TO, seed=2)
    out["ref"] = _run(L(1, 1, 1), "local", params, batch)[:2]
    for name, layout, core in (
        ("cp2_ring", L(1, 1, 2), "ring"),
        ("cp2_a2a", L(1, 1, 2), "a2a"),
        ("cp4_ring", L(1, 1, 4), "ring"),
        ("tp2_cp2_ring", L(2, 1, 2), "ring"),
    ):
        out[name] = _run(layout, core, params, batch)[:2]
    # The same documents in grouped zigzag units (one unit for all: RoPE restarts per unit, so
    # positions differ from the per-document reference; relative RoPE makes the result equal).
    units = _packed_batch(REAL_LENGTHS, 4, PAD_TO, seed=2, sharding="sequence")
    assert units["cu_seqlens"].numel() == 3 and units["doc_spans"].shape[0] == len(REAL_LENGTHS)
    for name, layout, core in (
        ("units_cp1_local", L(1, 1, 1), "local"),
        ("units_cp4_ring", L(1, 1, 4), "ring"),
        ("units_cp2_a2a", L(1, 1, 2), "a2a"),
    ):
        out[name] = _run(layout, core, params, units)[:2]
    # balanced: unequal chunks laid out for one CP size (RoPE positions ride with the batch)
    for name, layout, core, pad_to in (
        ("balanced_cp4_ring", L(1, 1, 4), "ring", None),  # tail padding of < CP tokens
        ("balanced_cp2_a2a", L(1, 1, 2), "a2a", None),
        ("balanced_tp2_cp2_ring", L(2, 1, 2), "ring", PAD_TO),  # a long padding-only tail
    ):
        cp = layout.context_parallel_size
        balanced = _packed_batch(REAL_LENGTHS, cp, pad_to, seed=2, sharding="balanced")
        sizes = balanced["cp_chunks"].diff(dim=1)[: len(REAL_LENGTHS)]
        assert (sizes.max(1).values > sizes.min(1).values).any()  # really unequal chunks
        out[name] = _run(layout, core, params, balanced)[:2]
    return out if rank == 0 else None


def _assert_same(name: str, got, want, tol: float = 1e-5):
    loss, grads = got
    ref_loss, ref_grads = want
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), f"{name}: loss {loss} != {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        err = float((grads[key] - ref).norm() / ref.norm().clamp(min=1e-30))
        assert err <= tol, f"{name}: grad {key} rel err {err:.2e}"


@pytest.mark.timeout(150)
def test_gpt_model_cp_layouts_match_cp1():
    out = run_distributed(_worker, 4, timeout=140)[0]
    _assert_same(
        "local THD (one doc) vs megatron DotProductAttention",
        out["local_thd_one_doc"],
        out["megatron_dpa"],
    )
    _assert_same(
        "ring SBHD CP 2 vs megatron DotProductAttention", out["ring_sbhd_cp2"], out["megatron_dpa"]
    )
    for name in (
        "cp2_ring",
        "cp2_a2a",
        "cp4_ring",
        "tp2_cp2_ring",
        "units_cp1_local",
        "units_cp4_ring",
        "units_cp2_a2a",
        "balanced_cp4_ring",
        "balanced_cp2_a2a",
        "balanced_tp2_cp2_ring",
    ):
        _assert_same(f"{name} vs TP 1 x CP 1", out[name], out["ref"])
