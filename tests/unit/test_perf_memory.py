"""Memory and communication models pinned to hand computations (Llama-3-8B sizes)."""

from __future__ import annotations

import pytest

from megatron_longctx.model.config import PRESETS
from megatron_longctx.perf.comm import allreduce_bytes, estimate_comm, reduce_scatter_bytes
from megatron_longctx.perf.hardware import HARDWARE
from megatron_longctx.perf.memory import (
    estimate_memory,
    layer_activation_bytes,
    loss_bytes,
    model_state_bytes,
)

M = PRESETS["llama3-8b"]
H, KV, F, A = 4096, 1024, 14336, 32


def test_model_state_is_18_bytes_per_parameter_and_dist_opt_shards_12():
    n = M.num_parameters()  # 8,030,261,248
    w, g, o = model_state_bytes(M, distributed_optimizer=False)
    assert (w, g, o) == (2 * n, 4 * n, 12 * n)
    _, _, o8 = model_state_bytes(M, data_parallel_size_with_cp=8)
    assert o8 == pytest.approx(12 * n / 8)


def test_model_state_splits_over_tp_and_pp_stages():
    emb = M.padded_vocab_size(4) * H
    per_layer = (M.num_parameters() - 2 * 128256 * H - H) / 32
    first, _, _ = model_state_bytes(
        M, tensor_model_parallel_size=4, pipeline_model_parallel_size=2, last_stage=False
    )
    assert first == pytest.approx(2 * (16 * per_layer / 4 + emb / 4))


def test_te_layer_activations_by_hand():
    """Per token: 2 norms x (2h + 1) + rope 2 x 128 + q, k, fused QKV, out (3h + 3kv) + 3f
    elements in bf16, plus the fp32 log-sum-exp per head."""
    elements = 2 * (2 * H + 1) + 2 * 128 + 3 * H + 3 * KV + 3 * F
    assert elements == 75010
    assert layer_activation_bytes(M, 1) == 2 * elements + 4 * A  # 150,148 B ~ 36.7 h
    # 64K tokens: 9.8 GB per layer without recompute; 0.5 GB with full recompute (h in bf16)
    assert layer_activation_bytes(M, 65536) == 65536 * (2 * elements + 4 * A)
    assert layer_activation_bytes(M, 65536, recompute="full") == 65536 * 2 * H


def test_tensor_and_sequence_parallel_split_activations():
    none = layer_activation_bytes(M, 1024)
    sp = layer_activation_bytes(M, 1024, tensor_model_parallel_size=8, sequence_parallel=True)
    # everything is split over TP 8 except the rotary tables (2 x 128 elements per token)
    assert sp == pytest.approx((none - 1024 * 2 * 256) / 8 + 1024 * 2 * 256)
    no_sp = layer_activation_bytes(M, 1024, tensor_model_parallel_size=8)
    assert sp < no_sp < none


def test_unfused_attention_keeps_the_s_squared_softmax():
    s = 4096
    local = layer_activation_bytes(M, s, kernels="local")
    te = layer_activation_bytes(M, s, kernels="te")
    assert local - te > s * A * s * 2  # the softmax output alone, bf16
    with pytest.raises(ValueError, match="kernels"):
        layer_activation_bytes(M, s, kernels="flash")


def test_loss_memory_unchunked_vs_chunked():
    # 512K tokens, TP 8: vocab padded to 129,024 -> 16,128 per rank; fp32 softmax kept
    kept, transient = loss_bytes(M, 524288, tensor_model_parallel_size=8)
    assert kept == 524288 * (16128 * 4 + 9)
    assert transient == 524288 * 16128 * 2
    assert (kept + transient) / 1e9 == pytest.approx(50.7, abs=0.1)
    kept_c, transient_c = loss_bytes(
        M, 524288, tensor_model_parallel_size=8, loss_chunk_tokens=2048
    )
    # kept (gradients formed in forward, model/loss.py): fp32 log-sum-exp + int64 target, the bf16
    # hidden-state gradient, the fp32 output-weight gradient; one chunk's bf16 + fp32 transient
    assert kept_c == 524288 * (12 + 4096 * 2) + 16128 * 4096 * 4
    assert transient_c == 2048 * 16128 * 6
    assert (kept_c + transient_c) / (kept + transient) < 0.1


def test_pipeline_first_stage_holds_pp_micro_batches():
    kw = dict(
        seq_length=65536,
        micro_batch_size=1,
        tensor_model_parallel_size=4,
        context_parallel_size=4,
        sequence_parallel=True,
    )
    one = estimate_memory(M, num_micro_batches=8, pipeline_model_parallel_size=1, **kw)
    two = estimate_memory(M, num_micro_batches=8, pipeline_model_parallel_size=2, **kw)
    # PP 2: half the layers, two micro-batches in flight on the first stage: same activations
    per_layer = layer_activation_bytes(
        M, 16384, tensor_model_parallel_size=4, sequence_parallel=True
    )
    assert two.stage == "first"
    assert two.activations == pytest.approx(2 * (16 * per_layer + 8 * 16384))
    assert one.activations > 32 * per_layer


def test_collective_volumes_by_hand():
    assert allreduce_bytes(100.0, 4) == 150.0
    assert reduce_scatter_bytes(100.0, 4) == 75.0
    assert allreduce_bytes(100.0, 1) == 0.0
    c = estimate_comm(
        M,
        HARDWARE["h100"],
        seq_length=65536,
        micro_batch_size=1,
        num_micro_batches=1,
        tensor_model_parallel_size=4,
        pipeline_model_parallel_size=1,
        context_parallel_size=4,
        data_parallel_size=2,
        gpus_per_node=8,
        params_per_gpu=2e9,
    )
    tokens = 16384
    assert c.tp_bytes == 32 * 4 * allreduce_bytes(tokens * H * 2, 4)
    assert c.cp_bytes == 32 * 3 * 3 * tokens * 2 * KV / 4 * 2  # fwd K,V + bwd K,V,dK,dV; 3 steps
    assert c.dp_bytes == pytest.approx(7 / 8 * 2e9 * 6)  # RS fp32 grads + AG bf16 params, DP x CP 8
    assert c.tp_s == c.tp_bytes / 450e9  # TP 4 within a node: NVLink
    assert c.dp_s == c.dp_bytes / 50e9  # TP x CP x DP = 32 > 8: InfiniBand
