"""RoPE variants vs transformers' own rotary implementation (LlamaRotaryEmbedding), on CP ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.model.rope import (
    install_inv_freq,
    rank_rope_positions,
    rope_cos_sin,
    rope_inv_freq,
)

HEAD_DIM = 64
VARIANTS = {
    "abf_llama3_base": (500_000.0, None),
    "abf_prolong_stage2": (1.28e8, None),
    "linear_pi": (10_000.0, {"rope_type": "linear", "factor": 4.0}),
    "yarn": (
        10_000.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    ),
    "yarn_mscale": (
        500_000.0,
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "beta_slow": 2,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3_1": (
        500_000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3_custom": (
        8e6,
        {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 65536,
        },
    ),
}


def _hf_rotary(theta: float, scaling: dict | None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": theta}
    params.update(scaling or {})
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inv_freq_and_cos_sin_match_transformers_on_each_cp_rank(name):
    theta, scaling = VARIANTS[name]
    hf = _hf_rotary(theta, scaling)
    inv_freq, attention = rope_inv_freq(HEAD_DIM, theta, scaling)
    torch.testing.assert_close(inv_freq, hf.inv_freq.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(hf.attention_scaling, rel=1e-12)
    # A packed sequence split over CP 4: positions restart per document, zigzag within documents;
    # the last document reaches position ~100K, where fp32 rounding of the angle dominates.
    cu_real = torch.tensor([0, 24, 31, 100031], dtype=torch.int32)
    cu_padded = torch.tensor([0, 24, 32, 100040], dtype=torch.int32)
    for rank in range(4):
        pos = rank_rope_positions(cu_padded, cu_real, 4, rank)
        cos, sin = rope_cos_sin(pos, inv_freq, attention)
        x = torch.zeros(1, pos.numel(), HEAD_DIM)
        hf_cos, hf_sin = hf(x, pos.unsqueeze(0))
        torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=2e-3)
        torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=2e-3)
        near = pos < 4096  # exact agreement where angles are small
        torch.testing.assert_close(cos[near], hf_cos[0][near], rtol=0, atol=1e-5)


def test_megatron_rotary_with_installed_frequencies_matches_transformers():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    theta, scaling = VARIANTS["llama3_custom"]
    rotary = RotaryEmbedding(
        kv_channels=HEAD_DIM,
        rotary_percent=1.0,
        rotary_base=int(theta),
        use_cpu_initialization=True,
    )

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary_pos_emb = rotary

    install_inv_freq(_Model(), HEAD_DIM, theta, scaling)
    assert not torch.allclose(rotary.inv_freq, rope_inv_freq(HEAD_DIM, theta)[0])
    angles = rotary.get_freqs_non_repeated(256)  # [s, d/2], what megatron's forward concatenates
    hf_cos, _ = _hf_rotary(theta, scaling)(torch.zeros(1, 256, HEAD_DIM), torch.arange(256)[None])
    torch.testing.assert_close(torch.cat([angles, angles], -1).cos(), hf_cos[0], rtol=0, atol=1e-5)


def test_megatron_llama3_defaults_equal_transformers_llama3_1():
    """build.py maps rope_type llama3 to megatron's rope_scaling; valid for Llama 3.1's settings."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    theta, scaling = VARIANTS["llama3_1"]
    rotary = RotaryEmbedding(
        kv_channels=HEAD_DIM,
        rotary_percent=1.0,
        rotary_base=int(theta),
        rope_scaling=True,
        rope_scaling_factor=8.0,
        use_cpu_initialization=True,
    )
    torch.testing.assert_close(
        rotary.inv_freq, _hf_rotary(theta, scaling).inv_freq, rtol=1e-6, atol=0
    )


def test_bad_settings_raise_with_values():
    with pytest.raises(ValueError, match="rope_type must be one of .* got 'ntk'"):
        rope_inv_freq(HEAD_DIM, 1e4, {"rope_type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match="factor must be >= 1, got 0.5"):
        rope_inv_freq(HEAD_DIM, 1e4, {"rope_type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match="head_dim must be even, got 63"):
        rope_inv_freq(63, 1e4)
