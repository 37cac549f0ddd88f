"""RoPE variants vs transformers' own rotary implementation (LlamaRotaryEmbedding), on CP ranks;
the translator's validation and HF round trip."""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.model.rope import (
    from_hf_rope_parameters,
    megatron_attention_factor,
    megatron_cos_sin,
    megatron_rotary,
    rank_rope_positions,
    rope_cos_sin,
    rope_inv_freq,
    to_hf_rope_parameters,
    validate_rope_scaling,
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


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_megatron_rotary_as_built_matches_transformers(name):
    """``megatron_rotary`` is what build_gpt_model installs; its angles and YaRN's attention factor
    (through megatron's own mscale formula on the TransformerConfig) equal transformers'."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    theta, scaling = VARIANTS[name]

    class _Config:  # what megatron_attention_factor reads and writes on a TransformerConfig
        kv_channels = HEAD_DIM

    config = _Config()
    attention = megatron_attention_factor(config, theta, scaling)
    mscale = _yarn_get_concentration_factor_from_config(config)
    hf = _hf_rotary(theta, scaling)
    assert mscale == pytest.approx(hf.attention_scaling, rel=1e-12)
    assert attention == pytest.approx(mscale, rel=1e-12)
    pos = torch.tensor([0, 1, 17, 255, 4095, 8191])
    cos, sin = megatron_cos_sin(megatron_rotary(HEAD_DIM, theta, scaling), pos, mscale)
    hf_cos, hf_sin = hf(torch.zeros(1, pos.numel(), HEAD_DIM), pos[None])
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-4)


def test_hf_rope_parameters_round_trip_and_legacy_layout():
    for theta, scaling in VARIANTS.values():
        params = to_hf_rope_parameters(theta, scaling)
        assert from_hf_rope_parameters(params) == (theta, validate_rope_scaling(scaling))
    legacy = {"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
              "original_max_position_embeddings": 8192, "rope_theta": 5e5}  # fmt: skip
    theta, scaling = from_hf_rope_parameters(legacy)
    assert theta == 5e5 and scaling == dict(VARIANTS["llama3_1"][1])


def test_bad_settings_raise_with_values():
    with pytest.raises(ValueError, match="rope_type 'ntk' is not supported .*yarn"):
        rope_inv_freq(HEAD_DIM, 1e4, {"rope_type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        validate_rope_scaling({"rope_type": "dynamic", "factor": 2})
    with pytest.raises(ValueError, match="factor must be >= 1, got 0.5"):
        rope_inv_freq(HEAD_DIM, 1e4, {"rope_type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match="head_dim must be even, got 63"):
        rope_inv_freq(63, 1e4)
    with pytest.raises(
        ValueError, match=r"\['low_freq_factor'\] are not used by rope_type 'linear'"
    ):
        validate_rope_scaling({"rope_type": "linear", "factor": 4, "low_freq_factor": 1})
    with pytest.raises(ValueError, match=r"'llama3' needs \['high_freq_factor'"):
        validate_rope_scaling({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1})


def test_config_load_refuses_unsupported_rope_with_the_reason():
    """A stage's RoPE is checked when the recipe loads, not silently dropped at build time."""
    from megatron_longctx.config.loading import ConfigError
    from megatron_longctx.config.schema import ExperimentConfig, StageConfig
    from megatron_longctx.model.config import get_preset

    stage = dict(name="s", seq_length=256, mixture={}, lr=1e-4, steps=1, global_batch_size=1)
    with pytest.raises(ConfigError, match="stage 's'.*rope_type 'longrope' is not supported"):
        StageConfig(**stage, rope_scaling={"rope_type": "longrope", "factor": 4})
    with pytest.raises(ValueError, match="model.rope_scaling.*'beta_fast'.* not used by rope_type"):
        get_preset("tiny", rope_scaling={"rope_type": "llama3", "factor": 8, "beta_fast": 4})
    ok = StageConfig(**stage, rope_scaling={"type": "yarn", "factor": 4,
                                            "original_max_position_embeddings": 64})  # fmt: skip
    cfg = ExperimentConfig(name="x", stages=[ok]).model_config(ok)
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 64}  # fmt: skip
