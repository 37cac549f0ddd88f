"""Pure key and layout map: Hugging Face Llama tensors <-> megatron-core GPTModel full tensors.

Megatron "full" names are the ones ``model/full_state.py`` produces (megatron's parameter names with
global layer numbers, tensors unsharded over TP/PP). The layouts that differ from HF:

* ``linear_qkv.weight`` ``[ng * (np/ng + 2) * hn, h]``: per query group g (``ng`` groups, ``np``
  heads, head dim ``hn``) the rows are ``[q heads of g..., k_g, v_g]`` (megatron
  ``SelfAttention.get_query_key_value_tensors`` views the output as ``[ng, (np/ng + 2) * hn]``).
  HF keeps ``q_proj`` ``[np * hn, h]``, ``k_proj`` / ``v_proj`` ``[ng * hn, h]``.
* ``mlp.linear_fc1.weight`` ``[2f, h]`` = ``[gate; up]`` (SwiGLU: ``silu(gate) * up``).
* embedding / output layer rows are padded to ``ModelConfig.padded_vocab_size(tp)``; HF has exactly
  ``vocab_size`` rows. Padding rows are zero on import and dropped on export.
* RoPE: both HF Llama (``rotate_half``) and megatron (``rotary_interleaved=False``, the default)
  rotate the two halves of each head, so q/k rows need no permutation (verified by the logits
  tests).
* tied embeddings: megatron has no ``output_layer.weight`` and HF no ``lm_head.weight``.

Megatron's dist checkpoint stores every layer's tensor stacked on a leading layer dimension under a
layer-free key, with the norms under Transformer Engine's fused names (``dcp_key``).
"""

from __future__ import annotations

import re

import torch

from megatron_longctx.model.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron per-layer suffix -> HF per-layer suffixes (in fusion order)
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
# megatron's sharded_state_dict_keys_map (local spec) stores the norms under TE's fused names
_DCP_LAYER_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"


def mcore_names(cfg: ModelConfig) -> list[str]:
    """Every megatron full parameter name of ``cfg``, in HF file order (embedding first)."""
    names = [EMBEDDING]
    for i in range(cfg.num_layers):
        names += [f"decoder.layers.{i}.{suffix}" for suffix in _LAYER_MAP]
    names.append(FINAL_NORM)
    if not cfg.tie_word_embeddings:
        names.append(OUTPUT)
    return names


def hf_sources(name: str) -> tuple[str, ...]:
    """The HF tensor names that make up megatron full tensor ``name`` (fusion order)."""
    if name == EMBEDDING:
        return ("model.embed_tokens.weight",)
    if name == OUTPUT:
        return ("lm_head.weight",)
    if name == FINAL_NORM:
        return ("model.norm.weight",)
    m = _LAYER.match(name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no HF counterpart for megatron tensor {name!r}")
    return tuple(f"model.layers.{m.group(1)}.{s}" for s in _LAYER_MAP[m.group(2)])


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of ``cfg`` (what a complete HF Llama checkpoint must hold)."""
    return [hf for name in mcore_names(cfg) for hf in hf_sources(name)]


def dcp_key(name: str) -> tuple[str, int | None]:
    """Megatron dist-checkpoint key and layer index (None: not stacked) of a full name."""
    m = _LAYER.match(name)
    if not m:
        return name, None
    suffix = _DCP_LAYER_KEYS.get(m.group(2), m.group(2))
    return f"decoder.layers.{suffix}", int(m.group(1))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> megatron ``linear_qkv`` rows ``[per group: q..., k, v]``."""
    ng, hn, hidden = cfg.num_query_groups, cfg.head_dim, q.shape[-1]
    q = q.reshape(ng, cfg.num_attention_heads // ng * hn, hidden)
    k = k.reshape(ng, hn, hidden)
    v = v.reshape(ng, hn, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of ``fuse_qkv``: megatron ``linear_qkv`` -> (q_proj, k_proj, v_proj)."""
    ng, hn, hidden = cfg.num_query_groups, cfg.head_dim, qkv.shape[-1]
    per_group = cfg.num_attention_heads // ng * hn
    grouped = qkv.reshape(ng, per_group + 2 * hn, hidden)
    q, k, v = grouped.split([per_group, hn, hn], dim=1)
    return (
        q.reshape(-1, hidden).contiguous(),
        k.reshape(-1, hidden).contiguous(),
        v.reshape(-1, hidden).contiguous(),
    )


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Appends zero rows up to ``padded_vocab_size`` (megatron's padded embedding / output)."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(
            f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_vocab_size}"
        )
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


def expected_hf_shape(hf_name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape an HF tensor must have for ``cfg`` (checked before any conversion)."""
    h, f, hn = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    suffix = hf_name.rsplit(".", 2)[-2]
    shapes = {
        "embed_tokens": (cfg.vocab_size, h),
        "lm_head": (cfg.vocab_size, h),
        "norm": (h,),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "q_proj": (cfg.num_attention_heads * hn, h),
        "k_proj": (cfg.num_query_groups * hn, h),
        "v_proj": (cfg.num_query_groups * hn, h),
        "o_proj": (h, cfg.num_attention_heads * hn),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
    }
    return shapes[suffix]


def to_mcore(
    name: str, hf_tensors: list[torch.Tensor], cfg: ModelConfig, padded_vocab_size: int
) -> torch.Tensor:
    """Megatron full tensor ``name`` from its HF sources (``hf_sources(name)`` order)."""
    if name in (EMBEDDING, OUTPUT):
        return pad_vocab(hf_tensors[0], padded_vocab_size)
    if name.endswith("linear_qkv.weight"):
        return fuse_qkv(*hf_tensors, cfg)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(hf_tensors, dim=0)
    return hf_tensors[0]


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (name -> tensor) from megatron full tensor ``name``; padding rows dropped."""
    sources = hf_sources(name)
    if name in (EMBEDDING, OUTPUT):
        parts = (tensor[: cfg.vocab_size],)
    elif name.endswith("linear_qkv.weight"):
        parts = split_qkv(tensor, cfg)
    elif name.endswith("linear_fc1.weight"):
        parts = tensor.chunk(2, dim=0)
    else:
        parts = (tensor,)
    return {hf: part.contiguous() for hf, part in zip(sources, parts, strict=True)}
