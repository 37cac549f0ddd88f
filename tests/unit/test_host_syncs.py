"""Issue 27, point 6: no device-to-host read in a training step but the loss read-back.

What replaces the GPU: fake CUDA tensors (megatron_longctx/testing/fake_cuda.py) and its
``DeviceReads`` counter (a TorchFunctionMode: every ``tolist`` / ``item`` / ``equal`` / ``bool``
/ copy to the host of a CUDA tensor is a host sync on a GPU); NCCL by tests/nccl_rules.py's
one-rank wrapper. The step is the project's own code between the loader and the optimizer: the
batch to the device, the core attention (layout, the CUDA flash varlen kernel's forward and
backward, called directly: autograd does not run on fake CUDA tensors), the loss and its
reduction. Megatron's model forward cannot run on fake CUDA tensors (its embedding aborts in C++
on a CPU-only torch). Untested on GPU.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_longctx.model.attention.core import LocalCoreAttention
from megatron_longctx.model.attention.ring import RingAttention
from megatron_longctx.testing.fake_cuda import CUDA, DeviceReads, fake_cuda
from megatron_longctx.training.batch import BatchSharding, to_model_batch
from megatron_longctx.training.step import loss_func, reduce_loss
from tests.nccl_rules import enforce_nccl_device

DOCS = [5, 7, 3, 9, 8]


def _micro():
    total = sum(DOCS)
    tokens = torch.randint(0, 50, (1, total + 1), generator=torch.Generator().manual_seed(0))
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, total),
        "position_ids": torch.arange(total)[None],
        "cu_seqlens": torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()]),
    }


@pytest.fixture
def one_rank_groups(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_group", lambda **kw: None)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)


def _core_attention():
    from megatron_longctx.model.build import transformer_config
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout

    config = transformer_config(get_preset("tiny"), ParallelLayout(1, 1, 1))
    causal = __import__("megatron.core.transformer.enums", fromlist=["AttnMaskType"]).AttnMaskType
    core = LocalCoreAttention(config, 1, causal.causal, pg_collection=SimpleNamespace(cp=None))
    core.kernel_name = "torch_flash"  # torch's CUDA flash varlen ops (meta kernels on fake CUDA)
    return core, config


def _step(host: dict, sharding: BatchSharding, fake, core, config) -> None:
    """One micro-batch's step on the device (see the module docstring)."""
    batch = sharding.to_device(host)
    psp = batch["packed_seq_params"]
    t = batch["tokens"].shape[1]
    hq, hk, d = core.num_heads, core.num_kv_heads, config.kv_channels
    q, k, v, dout = (fake((t, h, d), torch.bfloat16) for h in (hq, hk, hk, hq))
    layout = core._layout(psp)
    saved = {}
    ctx = SimpleNamespace(save_for_backward=lambda *ts: saved.update(tensors=ts))
    out = RingAttention.forward(ctx, q, k, v, layout, core.softmax_scale, None, core._kernel(q))
    ctx.saved_tensors = saved["tensors"]
    grads = RingAttention.backward(ctx, dout)
    assert out.device == CUDA and grads[0].device == CUDA
    _, _, report = loss_func(batch["loss_mask"], fake((1, t)))
    reduce_loss([report], CUDA)


@pytest.mark.parametrize("sharding", ["document", "balanced"])
def test_one_step_reads_the_device_once(one_rank_groups, sharding):
    """Today's code read the boundaries back in the core attention (``torch.equal``, two
    ``tolist``) and copied the block indices synchronously inside the ring loop."""
    core, config = _core_attention()
    plan = BatchSharding(sharding=sharding, device=CUDA)
    host = plan.host(_micro())  # the host half, as the prefetch thread runs it
    counter = DeviceReads()
    with fake_cuda() as fake, enforce_nccl_device(CUDA, call_through=False), counter:
        _step(host, plan, fake, core, config)
    assert [what for what, _ in counter.reads] == ["tolist"], counter.reads
    assert counter.reads[0][1].startswith("training/step.py")  # the loss read-back
    # host -> device, all in the batch path: the 4 per-token tensors, the 4 cu_seqlens, the
    # blocks' index tensors in 2 buffers (int64, int32), and under balanced sharding the RoPE
    # positions (2 tensors bound to 2 cu_seqlens); none inside the attention's ring loop
    rope = 4 if sharding == "balanced" else 0
    assert len(counter.copies) == 4 + 4 + 2 + rope, counter.copies
    assert sum(c.startswith("model/attention/blocks.py") for c in counter.copies) == 2


def test_the_planned_layout_equals_the_one_built_from_the_device_boundaries():
    """The host-planned layout is the layout the core attention built before (from the
    boundaries it was handed): same local blocks."""
    from megatron_longctx.model.attention.blocks import CPLayout

    for cp in (1, 2):
        for rank in range(cp):
            psp = to_model_batch(_micro(), cp, rank, sharding="balanced")["packed_seq_params"]
            spans = psp.doc_spans
            built = CPLayout(
                psp.cu_seqlens_q_padded,
                psp.cu_seqlens_q,
                cp,
                (spans[:, 0].tolist(), spans[:, 1].tolist()),
                psp.cp_chunks,
            )
            for src in range(cp):
                a, b = psp.cp_layout.ring_block(rank, src), built.ring_block(rank, src)
                for name in ("q_start", "q_len", "k_start", "k_len"):
                    assert (getattr(a, name) == getattr(b, name)).all()
