"""Canary: megatron-core must not reach any CUDA entry point that the CPU shim does not cover.

Every public ``torch.cuda`` function / class outside ``cpu_shim.COVERED_CUDA_FUNCTIONS`` is replaced
by a tripwire that records its name and raises. Then a TP=2 forward, backward, grad finalisation,
optimizer step, dist_checkpointing save and load run. The test fails if any tripwire fired (even
when megatron swallowed the exception) or if the run itself failed.
"""

import pytest

from megatron_longctx.testing.distributed import run_distributed
from tests.distributed.common import build, make_batches

SEQ, MICRO = 32, 2


def _run_with_tripwires(rank, world, ckpt_dir):
    import inspect

    import torch

    from megatron_longctx.runtime import cpu_shim

    fired: list[str] = []

    def tripwire(name):
        def _raise(*args, **kwargs):
            fired.append(name)
            raise RuntimeError(f"megatron-core reached torch.cuda.{name}, which the shim lacks")

        return _raise

    # Harmless queries that torch itself calls on CPU builds (they don't touch a device).
    exempt = set(cpu_shim.COVERED_CUDA_FUNCTIONS) | {"is_initialized", "is_bf16_supported"}
    replaced = []
    for name in dir(torch.cuda):
        obj = getattr(torch.cuda, name)
        if name.startswith("_") or name in exempt or inspect.ismodule(obj):
            continue
        if callable(obj):
            setattr(torch.cuda, name, tripwire(name))
            replaced.append(name)

    from megatron_longctx.checkpoint.dist import load_checkpoint, save_checkpoint
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.training.setup import OptimizerSettings, build_optimizer, build_scheduler
    from megatron_longctx.training.step import forward_backward

    cfg = get_preset("tiny")
    chunks = build(cfg, ParallelLayout(2, 1, 1), seed=3, seq=SEQ)
    settings = OptimizerSettings(lr=1e-3)
    opt = build_optimizer(chunks, settings)
    sched = build_scheduler(opt, settings, total_steps=4)
    batches = make_batches(2, MICRO, SEQ, cfg.vocab_size)
    forward_backward(chunks, batches, seq_length=SEQ, micro_batch_size=MICRO)
    opt.step()
    sched.step(1)
    save_checkpoint(ckpt_dir, 1, chunks, opt, sched, state={"consumed_samples": 4})
    before = [p.detach().clone() for p in chunks[0].parameters()]
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    state = load_checkpoint(f"{ckpt_dir}/iter_0000001", chunks, opt, sched)
    restored = all(torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))
    return fired, len(replaced), restored, state["consumed_samples"]


@pytest.mark.timeout(200)
def test_no_uncovered_cuda_call(tmp_path):
    results = run_distributed(_run_with_tripwires, 2, args=(str(tmp_path / "ckpt"),), timeout=160)
    for fired, num_replaced, restored, consumed in results:
        assert num_replaced > 50  # the tripwires were really installed
        assert fired == [], f"uncovered torch.cuda calls: {sorted(set(fired))}"
        assert restored and consumed == 4
