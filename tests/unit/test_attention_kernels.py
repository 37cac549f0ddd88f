"""Block kernels and block layouts vs independent references (single process).

* every CPU kernel path (lone segment, batched equal-shape segments, GQA, fp32 and bf16) vs the
  dense fp64 per-document oracle, forward and backward, on the edge cases (1-token documents,
  documents shorter than a chunk, a padding-only document, nothing real at all);
* the ring's blocks over all (rank, step) pairs cover exactly the allowed (query, key) pairs of
  the definition (same document, key position <= query position, both real), each once;
* memory: a 16K-token causal document runs forward + backward without anything of size S x S.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.model.attention.kernels import block_attention, resolve_kernel
from megatron_longctx.model.attention.reference import document_causal_attention
from megatron_longctx.model.attention.ring import ring_attention
from megatron_longctx.testing.attention_cases import padded_cu, ring_pairs

D = 16
SCALE = D**-0.5


CASES = {
    "mixed": [5, 1, 9, 33, 2],
    "equal_shapes_batched": [16, 16, 16, 7, 7],
    "one_token_docs": [1, 1, 1],
    "one_doc": [61],
}


def _inputs(s, hq, hk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, h, D, generator=g, dtype=torch.float64) for h in (hq, hk, hk, hq)]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def _reference(q, k, v, w, cu_p, cu_r):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = document_causal_attention(q, k, v, cu_p, cu_r, SCALE)
    (out * w).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scheduler", ["local_block", "ring_cp1", "tiled"])
def test_cpu_kernels_match_dense_oracle(name, heads, scheduler, monkeypatch):
    cu_p, cu_r = padded_cu(CASES[name], 1, pad_doc=2)
    q, k, v, w = _inputs(cu_p[-1], *heads)
    refs = _reference(q, k, v, w, cu_p, cu_r)
    layout = CPLayout(cu_p, cu_r, 1)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    if scheduler != "ring_cp1":
        from megatron_longctx.model.attention import kernel_tiled

        monkeypatch.setattr(kernel_tiled, "TILE", 8)  # many tiles, diagonal and partial ones
        kernel = resolve_kernel(
            "cpu_flash" if scheduler == "local_block" else "tiled", qf.device, qf.dtype
        )
        out = block_attention(qf, kf, vf, layout.document_block(), SCALE, kernel)
    else:
        out = ring_attention(qf, kf, vf, layout, SCALE)
    (out * w.float()).sum().backward()
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, qf.grad, kf.grad, vf.grad), refs):
        assert torch.isfinite(got).all(), label
        if want.norm() == 0:  # e.g. dq of 1-token documents
            assert got.abs().max() <= 1e-5, label
        else:
            assert _rel(got.detach(), want) <= 1e-5, f"{name} {heads} {label}"
    padding = torch.ones(cu_p[-1], dtype=torch.bool)
    for a, n in zip(cu_p, torch.tensor(cu_r).diff().tolist()):
        padding[a : a + n] = False
    assert (out[padding] == 0).all() and (qf.grad[padding] == 0).all()


def test_cpu_kernel_bf16_within_1e_2():
    cu_p, cu_r = padded_cu([40, 3, 17], 1)
    q, k, v, w = _inputs(cu_p[-1], 8, 2, seed=1)
    refs = _reference(q, k, v, w, cu_p, cu_r)
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
    out = ring_attention(qb, kb, vb, CPLayout(cu_p, cu_r, 1), SCALE)
    (out.float() * w.float()).sum().backward()
    for got, want in zip((out, qb.grad, kb.grad, vb.grad), refs):
        assert _rel(got.detach(), want) <= 1e-2


def test_nothing_real_gives_zeros_not_nan():
    cu_p, cu_r = [0, 8, 16], [0, 0, 0]
    q, k, v, _ = (x.float().requires_grad_() for x in _inputs(16, 4, 2))
    out = ring_attention(q, k, v, CPLayout(cu_p, cu_r, 1), SCALE)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all() and (k.grad == 0).all()


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ring_blocks_cover_exactly_the_allowed_pairs(cp):
    cu_p, cu_r = padded_cu([7, 1, 2 * cp + 3, 12 * cp], cp, pad_doc=1)
    want = set()
    for a, n in zip(cu_p, torch.tensor(cu_r).diff().tolist()):
        want |= {(a + i, a + j) for i in range(n) for j in range(i + 1)}
    got = ring_pairs(CPLayout(cu_p, cu_r, cp), cu_p, cp)
    assert len(got) == len(set(got)), "a pair is computed twice"
    assert set(got) == want
    layout = CPLayout(cu_p, cu_r, cp)
    total = sum(layout.ring_block(r, s).allowed_pairs() for r in range(cp) for s in range(cp))
    assert total == len(want)


def test_gathered_order_puts_documents_in_position_order():
    from megatron_longctx.parallel.cp_split import rank_token_index

    cu_p, cu_r = padded_cu([5, 17, 2], 3)
    gathered = torch.cat([rank_token_index(cu_p, 3, r) for r in range(3)])
    order = torch.from_numpy(CPLayout(cu_p, cu_r, 3).gathered_order())
    assert torch.equal(gathered[order], torch.arange(cu_p[-1]))
    # unequal chunks ("balanced" sharding): the same, with the batch's chunk boundaries
    from megatron_longctx.parallel.units import plan_units

    plan = plan_units([5, 17, 2, 1], 3, "balanced")
    cu_b = [0] + plan.bounds[:, -1].tolist()
    gathered = torch.cat([rank_token_index(cu_b, 3, r, plan.bounds) for r in range(3)])
    layout = CPLayout(cu_b, [0] + np.cumsum(plan.real).tolist(), 3, chunks=plan.bounds)
    assert torch.equal(gathered[torch.from_numpy(layout.gathered_order())], torch.arange(cu_b[-1]))


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from megatron_longctx.model.attention.blocks import CPLayout
    from megatron_longctx.model.attention.ring import ring_attention
    torch.set_num_threads(1)
    s = int(sys.argv[1])
    q = torch.randn(s, 1, 8, requires_grad=True)
    k, v = (torch.randn(s, 1, 8, requires_grad=True) for _ in range(2))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ring_attention(q, k, v, CPLayout([0, s], [0, s], 1), 0.35)
    out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_mb": (after - before) / 1024}))
    """
)


@pytest.mark.timeout(120)
def test_16k_document_needs_no_s_by_s_memory():
    s = 16384  # one fp32 S x S score tensor would be 1 GiB
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(s)], capture_output=True, text=True, timeout=110
    )
    assert res.returncode == 0, res.stderr[-2000:]
    grew = json.loads(res.stdout.strip().splitlines()[-1])["grew_mb"]
    assert grew < 64, f"peak RSS grew {grew:.0f} MB for {s} tokens (S x S fp32 = 1024 MB)"


def test_auto_picks_the_scalable_kernel_per_device():
    from megatron_longctx.config.schema import ConfigError, TrainingSection
    from megatron_longctx.model.attention.kernel_cpu import CPUFlashKernel
    from megatron_longctx.model.attention.kernel_cuda import TorchFlashKernel
    from megatron_longctx.model.attention.kernels import KERNELS

    assert isinstance(resolve_kernel("auto", torch.device("cpu"), torch.float32), CPUFlashKernel)
    cuda = torch.device("cuda", 0)  # a device object; nothing runs on it
    if importlib.util.find_spec("flash_attn") is None:
        assert isinstance(resolve_kernel("auto", cuda, torch.bfloat16), TorchFlashKernel)
    assert resolve_kernel("auto", cuda, torch.float32).name == "tiled"  # no fp32 flash
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        resolve_kernel("cpu_flash", cuda, torch.bfloat16)
    for name in KERNELS:
        TrainingSection(attention_kernel=name)
    with pytest.raises(ConfigError, match="attention_kernel must be one of"):
        TrainingSection(attention_kernel="dense")
