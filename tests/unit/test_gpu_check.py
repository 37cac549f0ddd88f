"""Issue 27, points 1 and 3: benchmarks/gpu_check.py's CUDA legs, rehearsed without a GPU.

What replaces the GPU: fake CUDA tensors (megatron_longctx/testing/fake_cuda.py; device rules as
on a GPU, no data, no autograd, no megatron model forward) and, for point 3, the planner's memory
model in place of a real out-of-memory. Untested on GPU.
"""

import sys
from pathlib import Path

import pytest
import torch

from megatron_longctx.model.attention.reference import document_causal_attention
from megatron_longctx.testing.fake_cuda import CUDA, fake_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_rehearsal  # noqa: E402


def test_reference_runs_on_cuda_tensors():
    """Point 1: the reference's causal mask is made on q's device (it was a CPU mask:
    ``masked_fill`` raises "expected self and mask to be on the same device" on a GPU)."""
    with fake_cuda() as fake:
        q, k = fake((12, 4, 8)), fake((12, 2, 8))
        out = document_causal_attention(q, k, k, [0, 4, 12], [0, 3, 10], 0.3)
        assert out.device == CUDA and out.shape == (12, 4, 8)


def test_fake_cuda_legs_at_full_size():
    """Point 1: every CUDA leg of the one-GPU check (attention at 4K-64K tokens, the trainer's
    batch path at 8K and 64K) on fake CUDA tensors; each leg passes (today's code fails the
    reference's mask, the mixes' odd document lengths and Python indexing of device tensors)."""
    from megatron_longctx.perf.hardware import HARDWARE

    legs = gpu_rehearsal.fake_cuda_legs(HARDWARE["h100"])
    assert [leg for leg in legs if not leg["passed"]] == []
    assert len(legs) == 8


def test_without_cuda_one_line(capsys):
    """Point 1: on a machine without CUDA, one line naming the CPU rehearsal, exit code 2."""
    assert not torch.cuda.is_available()
    assert gpu_check.main(["--output", "/dev/null"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no CUDA GPU" in err and "--device cpu" in err


def test_trainer_legs_ask_the_planner_first(monkeypatch):
    """Point 3: a leg the planner predicts not to fit is skipped with the planner's reason; one
    that fits runs. The GPU's memory is set between the two legs' predictions (the planner's
    own numbers, whatever its loss model)."""
    from megatron_longctx.perf.hardware import HARDWARE

    cfg = gpu_check.LLAMA_1B
    small, large = (gpu_check.plan_trainer_leg(cfg, s, HARDWARE["h100"]) for s in (8192, 65536))
    assert small.memory.total < large.memory.total
    usable = (small.memory.total + large.memory.total) / 2
    hardware = HARDWARE["h100"].with_memory_gb(usable / 0.9 / 1e9)
    ran = []
    monkeypatch.setattr(
        gpu_check, "trainer_run", lambda dev, m, seq, *a: ran.append(seq) or {"finite": True}
    )
    saved = []
    records = gpu_check.trainer_legs(CUDA, cfg, (8192, 65536), 1, hardware, saved.append)
    assert ran == [8192]
    assert records[1]["seq_length"] == 65536 and "needs" in records[1]["skipped"]
    assert records[1]["planner"]["fits"] is False and len(saved) == 2


@pytest.mark.parametrize("total", [4096, 16384, 65536])
def test_document_mix_is_a_cp1_layout(total):
    """The mixes' documents are even (CPLayout at CP 1 takes documents padded to 2): the 16K and
    64K timing legs raised "padded length 1947 is not divisible by 2 x CP = 2"."""
    docs = gpu_check.doc_mix(total, one_doc=False)
    assert sum(docs) == total
    gpu_check._block(docs)
