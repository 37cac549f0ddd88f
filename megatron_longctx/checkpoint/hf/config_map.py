"""HF ``LlamaConfig`` <-> the project's ``ModelConfig``, RoPE settings included.

transformers 5.x keeps RoPE settings in ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...,
<scaling fields>}``); 4.x used a top-level ``rope_theta`` plus ``rope_scaling``. Reading goes
through transformers' own ``LlamaConfig`` (which accepts both layouts); writing lets ``LlamaConfig``
choose the layout, so the exported ``config.json`` is whatever the installed transformers reads
back. The RoPE fields themselves are translated by ``model/rope.py`` (the one RoPE translator).
"""

from __future__ import annotations

import dataclasses

from megatron_longctx.model.config import ModelConfig
from megatron_longctx.model.rope import (
    RopeConfigError,
    from_hf_rope_parameters,
    to_hf_rope_parameters,
)


class ConversionError(ValueError):
    """An input the converter cannot handle; the message names the problem and the fix."""


def _rope_dict(hf) -> dict:
    rope = getattr(hf, "rope_parameters", None)
    if rope:  # transformers 5.x
        return dict(rope)
    legacy = dict(getattr(hf, "rope_scaling", None) or {})  # transformers 4.x
    legacy.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return legacy


def model_config_from_hf(
    raw: dict, *, make_vocab_size_divisible_by: int = 128, source: str = "config.json"
) -> ModelConfig:
    """The ModelConfig of an HF Llama ``config.json`` (already parsed to ``raw``).

    Raises:
        ConversionError: not a Llama config, or a Llama variant megatron's GPTModel cannot express.
    """
    from transformers import LlamaConfig

    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise ConversionError(
            f"{source}: model_type {model_type!r}, architectures {archs}: this converter handles "
            "Llama checkpoints only (model_type 'llama', LlamaForCausalLM); convert other families "
            "with their own tools"
        )
    hf = LlamaConfig.from_dict(raw)
    heads = hf.num_attention_heads
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act {hf.hidden_act!r} (only 'silu' / SwiGLU)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        problems.append("attention_bias / mlp_bias (megatron model is built without biases)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    if head_dim * heads != hf.hidden_size:
        problems.append(f"head_dim {head_dim} x heads {heads} != hidden_size {hf.hidden_size}")
    if problems:
        raise ConversionError(f"{source}: unsupported Llama variant: {'; '.join(problems)}")
    try:
        theta, scaling = from_hf_rope_parameters(_rope_dict(hf), where=source)
    except RopeConfigError as err:
        raise ConversionError(f"unsupported RoPE: {err}") from err
    return ModelConfig(
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_attention_heads=heads,
        num_query_groups=hf.num_key_value_heads or heads,
        vocab_size=hf.vocab_size,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        max_position_embeddings=hf.max_position_embeddings,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        init_method_std=hf.initializer_range,
    )


def model_config_from_dict(data: dict) -> ModelConfig:
    """ModelConfig from ``ModelConfig.to_dict()`` output (unknown keys are dropped)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in names})


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def hf_config_from_model(cfg: ModelConfig, dtype: str, source_hf_config: dict | None = None):
    """transformers ``LlamaConfig`` for ``cfg``: RoPE theta, scaling and trained length included.

    Args:
        cfg: the model config stored with the megatron checkpoint.
        dtype: "bfloat16" | "float16" | "float32", recorded as the checkpoint's dtype.
        source_hf_config: the HF config the checkpoint was imported from, if any; its special
            token ids are kept (they are tokenizer facts that ModelConfig does not carry).
    """
    from transformers import LlamaConfig

    rope = to_hf_rope_parameters(cfg.rope_theta, cfg.rope_scaling)
    tokens = {k: source_hf_config[k] for k in _TOKEN_IDS if k in (source_hf_config or {})}
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
        **tokens,
    )


def hf_rope_theta(hf) -> float:
    """RoPE theta of a loaded transformers config, whichever layout it came from."""
    return float(_rope_dict(hf)["rope_theta"])
