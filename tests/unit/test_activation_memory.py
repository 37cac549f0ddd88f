"""The activation-memory model against the real megatron GPTModel on CPU.

Measured quantity: bytes autograd saves for backward during one forward (unique storages,
parameters excluded; perf.measure explains why this is the CPU proxy for activation memory).
Estimated: perf.memory with ``kernels="local"`` (megatron-core's local modules, fp32 = 4 bytes).
The issue asks for 20%; the model is built from the same accounting, so it is pinned to 5%.
"""

from __future__ import annotations

from functools import partial

import pytest

from megatron_longctx.model.config import get_preset
from megatron_longctx.perf.memory import layer_activation_bytes, loss_bytes, outside_layers_bytes
from megatron_longctx.testing.distributed import run_distributed

# (preset, layers, seq_length, micro_batch, recompute, with_labels)
CASES = [
    ("tiny", 4, 128, 2, None, True),
    ("tiny", 4, 128, 2, None, False),
    ("tiny", 2, 256, 1, None, True),
    ("tiny", 4, 128, 2, "selective", True),
    ("tiny", 4, 256, 1, "full", True),
    ("tiny-mha", 2, 64, 4, None, True),
    ("tiny-mha", 2, 64, 4, "full", False),
]


def _measure(rank, world_size, cases):
    import torch
    from megatron.core import tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.perf.measure import saved_activation_bytes
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    initialize_model_parallel(ParallelLayout())
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    results = []
    for preset, layers, s, b, recompute, with_labels in cases:
        cfg = get_preset(preset, num_layers=layers)
        model = build_gpt_model(
            cfg, ParallelLayout(), backend="local", recompute=recompute, seq_length=s
        )
        ids = torch.randint(0, cfg.vocab_size, (b, s))
        pos = torch.arange(s).expand(b, s)
        labels = ids if with_labels else None
        results.append(
            saved_activation_bytes(
                partial(model, input_ids=ids, position_ids=pos, attention_mask=None, labels=labels),
                exclude=list(model.parameters()),
            )
        )
    return results


def _estimate(preset, layers, s, b, recompute, with_labels) -> float:
    cfg = get_preset(preset, num_layers=layers)
    kw = dict(micro_batch_size=b, kernels="local", bytes_per_element=4)
    total = layers * layer_activation_bytes(cfg, s, recompute=recompute, **kw)
    total += outside_layers_bytes(cfg, s, recompute=recompute, **kw)
    if with_labels:
        total += loss_bytes(cfg, s, micro_batch_size=b, bytes_per_element=4)[0]
    return total


@pytest.fixture(scope="module")
def measured() -> list[int]:
    return run_distributed(_measure, world_size=1, args=(CASES,), timeout=120)[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_activation_estimate_matches_measured_saved_bytes(measured, index):
    estimate = _estimate(*CASES[index])
    ratio = estimate / measured[index]
    assert 0.95 < ratio < 1.05, (
        f"{CASES[index]}: estimate {estimate:.0f} B vs measured "
        f"{measured[index]} B (ratio {ratio:.3f})"
    )


def test_recompute_saves_most_activation_memory(measured):
    """Full recompute keeps one hidden state per layer: far below no recompute (same model)."""
    none = measured[CASES.index(("tiny-mha", 2, 64, 4, None, True))]
    full = measured[CASES.index(("tiny-mha", 2, 64, 4, "full", False))]
    assert full < 0.25 * none
