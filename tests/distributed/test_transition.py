"""A stage transition with a layout change keeps Adam's moments: a checkpoint written at TP 1 x DP 2
and loaded at TP 2 (megatron dist_checkpointing resharding) holds the same full exp_avg /
exp_avg_sq tensors, parameter by parameter, and the same weights."""

import pytest
import torch

from megatron_longctx.testing.distributed import run_distributed
from tests.distributed.common import build, make_batches

SEQ = 32


def _save_then_load_resharded(rank, world, ckpt_dir):
    from megatron_longctx.checkpoint.dist import load_checkpoint, save_checkpoint
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.training.setup import OptimizerSettings, build_optimizer, build_scheduler
    from megatron_longctx.training.step import forward_backward

    cfg = get_preset("tiny")
    settings = OptimizerSettings(lr=1e-3)
    chunks = build(cfg, ParallelLayout(1, 1, 1), seed=2, seq=SEQ)  # TP 1, DP 2
    opt = build_optimizer(chunks, settings)
    build_scheduler(opt, settings, total_steps=10, warmup_ratio=0.0)
    for step in range(2):
        forward_backward(
            chunks,
            make_batches(2, 2, SEQ, cfg.vocab_size, seed=step + 10 * rank),
            seq_length=SEQ,
            micro_batch_size=2,
            optimizer=opt,
        )
        opt.step()
    saved = {k: gather_full(chunks[0], k, opt) for k in ("param", "exp_avg", "exp_avg_sq")}
    save_checkpoint(ckpt_dir, 2, chunks, opt, state={"model": cfg.to_dict()})

    chunks = build(cfg, ParallelLayout(2, 1, 1), seed=99, seq=SEQ)  # TP 2, DP 1, other init
    opt = build_optimizer(chunks, settings)
    load_checkpoint(f"{ckpt_dir}/iter_0000002", chunks, opt, None, expect_model=cfg.to_dict())
    loaded = {k: gather_full(chunks[0], k, opt) for k in ("param", "exp_avg", "exp_avg_sq")}
    mismatched = [
        (k, n) for k in saved for n in saved[k] if not torch.equal(saved[k][n], loaded[k][n])
    ]
    nonzero = sum(int(v.abs().sum() > 0) for v in saved["exp_avg_sq"].values())
    return mismatched, len(saved["exp_avg"]), nonzero


@pytest.mark.timeout(200)
def test_adam_moments_survive_layout_change(tmp_path):
    for mismatched, num, nonzero in run_distributed(
        _save_then_load_resharded, 2, args=(str(tmp_path / "ckpt"),), timeout=160
    ):
        assert num > 10 and nonzero == num  # every parameter has a real second moment
        assert mismatched == []
