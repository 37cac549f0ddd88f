"""Activation recompute (full and selective) leaves loss and gradients unchanged, on CPU too
(megatron re-runs layer forwards inside autograd's backward, where the shim must still apply)."""

import pytest

from megatron_longctx.testing.distributed import run_distributed


def _grads_with_recompute(rank, world):
    import torch
    from megatron.core import tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    initialize_model_parallel(ParallelLayout())
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    results = {}
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    for mode in (None, "full", "selective"):
        torch.manual_seed(0)
        model = build_gpt_model(
            get_preset("tiny"), ParallelLayout(), backend="local", recompute=mode, seq_length=32
        )
        loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).mean()
        loss.backward()
        results[mode] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    return results


@pytest.mark.timeout(120)
def test_recompute_matches_plain():
    import torch

    (res,) = run_distributed(_grads_with_recompute, 1, timeout=100)
    base_loss, base_grads = res[None]
    for mode in ("full", "selective"):
        loss, grads = res[mode]
        assert loss == base_loss
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
