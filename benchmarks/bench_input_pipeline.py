"""Host syncs per training step, and loader time hidden behind a (simulated) device step.

    python benchmarks/bench_input_pipeline.py [--seq 1024] [--steps 8]

1. Host syncs: one micro-batch (a 4K document + 40 short ones, CP 1) from the loader's host
   tensors to the device and through the core attention (every layer of the tiny preset: layout,
   the torch flash varlen kernel forward + backward), the loss and its reduction, on fake CUDA
   tensors (megatron_longctx/testing/fake_cuda.py ``DeviceReads``): device-to-host reads, and
   host-to-device copies made by the batch path vs inside the attention. Megatron's own layers
   are not run (they cannot run on fake CUDA tensors). Run it from another checkout with
   ``PYTHONPATH=<checkout>`` for its "before".
2. Input pipeline: the real loader (tiny corpus, ``--seq`` tokens, global batch 32, DP rank 0 of 2
   with balanced assignment, CP 2 balanced batch path) for ``--steps`` steps, with a simulated
   device step of T = 1.5 x the measured host time per step (a sleep, as the training thread waits
   on a GPU): the training thread's wait for inputs per step, built in the loop (before) vs
   prefetched (``StepPrefetcher``, after), as a share of the host time. Untested on GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def host_syncs() -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model.attention.core import LocalCoreAttention
    from megatron_longctx.model.attention.ring import RingAttention
    from megatron_longctx.model.build import transformer_config
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.testing.fake_cuda import CUDA, DeviceReads, fake_cuda
    from megatron_longctx.training.batch import BatchSharding
    from megatron_longctx.training.step import loss_func, reduce_loss

    parallel_state.get_data_parallel_group = lambda **kw: None
    parallel_state.get_pipeline_model_parallel_world_size = lambda: 1
    torch.distributed.all_reduce = lambda *a, **k: None  # one rank: the identity (no NCCL here)
    rng = np.random.default_rng(0)
    docs = [4096] + [int(x) for x in rng.integers(50, 1500, 40) * 2]
    total = sum(docs)
    tokens = torch.randint(0, 50, (1, total + 1))
    micro = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, total),
        "position_ids": torch.arange(total)[None],
        "cu_seqlens": torch.tensor([0, *np.cumsum(docs).tolist()]),
    }
    config = transformer_config(get_preset("tiny"), ParallelLayout(1, 1, 1))
    no_cp = SimpleNamespace(cp=None)
    core = LocalCoreAttention(config, 1, AttnMaskType.causal, pg_collection=no_cp)
    core.kernel_name = "torch_flash"
    shard = BatchSharding(device=CUDA)
    host = shard.host(micro)
    reads = DeviceReads()
    with fake_cuda() as fake, reads:
        batch = shard.to_device(host)
        batch_copies = len(reads.copies)
        psp, t = batch["packed_seq_params"], batch["tokens"].shape[1]
        heads = (core.num_heads, core.num_kv_heads, core.num_kv_heads, core.num_heads)
        q, k, v, dout = (fake((t, h, config.kv_channels), torch.bfloat16) for h in heads)
        for _ in range(config.num_layers):
            saved = {}
            ctx = SimpleNamespace(save_for_backward=lambda *ts: saved.update(tensors=ts))
            layout = core._layout(psp)
            RingAttention.forward(ctx, q, k, v, layout, core.softmax_scale, None, core._kernel(q))
            ctx.saved_tensors = saved["tensors"]
            RingAttention.backward(ctx, dout)
        _, _, report = loss_func(batch["loss_mask"], fake((1, t)))
        reduce_loss([report], CUDA)
    return {
        "device_to_host_reads": len(reads.reads),
        "read_sites": sorted(set(reads.reads)),
        "h2d_copies_batch_path": batch_copies,
        "h2d_copies_in_attention": len(reads.copies) - batch_copies,
    }


def input_pipeline(seq: int, steps: int) -> dict:
    from megatron_longctx.data.loader import MixtureLoader
    from megatron_longctx.parallel.dp_assign import WorkModel
    from megatron_longctx.testing.data import tiny_corpus, two_component_index
    from megatron_longctx.training.batch import BatchSharding
    from megatron_longctx.training.prefetch import StepPrefetcher

    root = tempfile.mkdtemp()
    index = two_component_index(tiny_corpus(root), seq, 32 * (steps + 2), 0.5)
    shard = BatchSharding(cp_size=2, cp_rank=0, sharding="balanced")

    def loader():
        work = WorkModel(2, "balanced")
        return MixtureLoader(index, 32, 1, 0, 2, work=work, balance=True)

    # before: built in the training thread; the device waits for all of it
    serial, it = [], loader()
    for _ in range(steps):
        start = time.perf_counter()
        _ = [shard(next(it)) for _ in range(it.num_micro_batches)]
        serial.append(time.perf_counter() - start)
    host = float(np.median(serial))
    device_s = 1.5 * host
    for wait in serial:
        time.sleep(device_s)  # the same schedule: wait = host time
    inputs = StepPrefetcher(loader(), shard, steps)
    for _ in range(steps):
        inputs.next_step()
        time.sleep(device_s)
    inputs.close()
    ahead_wait = float(np.median(inputs.wait_s[1:]))
    ahead_host = float(np.median(inputs.host_s[1:]))
    return {
        "seq": seq,
        "host_s_per_step": host,
        "device_s_per_step": device_s,
        "wait_s_before": host,
        "wait_s_after": ahead_wait,
        "host_s_after": ahead_host,
        "hidden_share_after": 1 - ahead_wait / ahead_host,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    print("host syncs, one micro-batch step:", host_syncs())
    print("input pipeline:", input_pipeline(args.seq, args.steps))


if __name__ == "__main__":
    main()
