"""Megatron's FLOPs formula pinned to published numbers and hand computations."""

from __future__ import annotations

import pytest

from megatron_longctx.model.config import PRESETS, get_preset
from megatron_longctx.perf.flops import (
    attention_flops_per_token,
    flops_per_token,
    linear_pairs_per_token,
    matmul_parameters,
    mfu,
)
from megatron_longctx.perf.hardware import HARDWARE, get_hardware

LLAMA3_8B = PRESETS["llama3-8b"]


@pytest.mark.parametrize("seq_length, gflops", [(8192, 51.5), (65536, 96.6), (524288, 457)])
def test_llama3_8b_matches_published_gflop_per_token(seq_length, gflops):
    """LONGCTX_FACTS.md: 51.5 GFLOP/token at 8K, 96.6 at 64K, 457 at 512K."""
    got = flops_per_token(LLAMA3_8B, seq_length) / 1e9
    digits = 0 if gflops >= 100 else 1
    assert round(got, digits) == gflops


def test_matmul_parameters_by_hand():
    # per layer: QKV 4096 x (4096 + 2 x 1024), O 4096 x 4096, SwiGLU 3 x 4096 x 14336;
    # plus the output layer 128256 x 4096 (no input embedding, no norms)
    per_layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    assert matmul_parameters(LLAMA3_8B) == 32 * per_layer + 128256 * 4096
    assert matmul_parameters(LLAMA3_8B) == 7_504_658_432


def test_linear_work_in_attention_pairs_by_hand():
    # 6 N_matmul FLOPs per token / (12 L d_q FLOPs per score pair) = 7,504,658,432 / (2 x 32 x 4096)
    assert linear_pairs_per_token(LLAMA3_8B) == 7_504_658_432 / 262_144 == 28_628.0


def test_causal_term_is_6_L_d_S():
    assert attention_flops_per_token(LLAMA3_8B, 8192) == 6 * 32 * 4096 * 8192


def test_document_masked_term_by_hand():
    """Documents of 4096 + 2048 + 2048 in an 8K sequence: 6 L d (4096^2 + 2 x 2048^2) / 8192."""
    docs = [4096, 2048, 2048]
    expected_attention = 6 * 32 * 4096 * (4096**2 + 2048**2 + 2048**2) / 8192  # = 6 L d x 3072
    assert attention_flops_per_token(LLAMA3_8B, 8192, docs) == expected_attention
    assert expected_attention == 6 * 32 * 4096 * 3072
    full = flops_per_token(LLAMA3_8B, 8192)
    masked = flops_per_token(LLAMA3_8B, 8192, docs)
    assert full - masked == pytest.approx(6 * 32 * 4096 * (8192 - 3072))


def test_one_document_equals_no_documents_and_short_documents_cost_like_8k():
    assert flops_per_token(LLAMA3_8B, 65536, [65536]) == flops_per_token(LLAMA3_8B, 65536)
    # 512K packed from 8K documents costs what an 8K sequence costs per token
    assert flops_per_token(LLAMA3_8B, 524288, [8192] * 64) == flops_per_token(LLAMA3_8B, 8192)


def test_gqa_and_swiglu_enter_the_formula():
    mha = get_preset("llama3-8b", num_query_groups=32)
    # K and V grow from 1024 to 4096 columns each: 2 x 3072 x 4096 per layer, x 6 FLOPs
    assert flops_per_token(mha, 8192) - flops_per_token(LLAMA3_8B, 8192) == 6 * 32 * 2 * 3072 * 4096
    wider = get_preset("llama3-8b", ffn_hidden_size=14336 + 128)
    extra = flops_per_token(wider, 8192) - flops_per_token(LLAMA3_8B, 8192)
    assert extra == 6 * 32 * 3 * 128 * 4096


@pytest.mark.parametrize("docs", [[4096, 4095], [8192, 0], [-1, 8193]])
def test_bad_document_lengths_are_rejected(docs):
    with pytest.raises(ValueError, match="document lengths"):
        flops_per_token(LLAMA3_8B, 8192, docs)


def test_mfu_by_hand():
    # 64 H100s at 989 TFLOP/s, 60,000 tokens/s at 457 GFLOP/token: 27.4 PFLOP/s of 63.3
    value = mfu(60_000, 457e9, 64 * HARDWARE["h100"].peak_bf16_flops)
    assert value == pytest.approx(60_000 * 457e9 / (64 * 989e12))
    assert 0.43 < value < 0.44
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_hardware_presets():
    assert HARDWARE["h100"].peak_bf16_flops == 989e12
    assert HARDWARE["a100"].peak_bf16_flops == 312e12
    assert HARDWARE["h200"].memory_bytes == 141e9
    assert get_hardware("h100", memory_gb=94).memory_bytes == 94e9
    with pytest.raises(KeyError, match="choose one of"):
        get_hardware("v100")
