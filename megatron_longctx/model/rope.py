"""RoPE frequencies for the long-context variants, and their positions on each CP rank.

Variants (``scaling`` uses transformers' ``rope_parameters`` keys):

* default / ABF ("adjusted base frequency", Llama 2 Long, ProLong): only ``rope_theta`` changes;
* ``{"rope_type": "linear", "factor": f}``: position interpolation, positions / f;
* ``{"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n, ...}``: YaRN
  (NTK-by-parts interpolation + an attention factor on cos/sin);
* ``{"rope_type": "llama3", "factor": f, "low_freq_factor": l, "high_freq_factor": h,
  "original_max_position_embeddings": n}``: Llama 3.1 scaling.

Implemented here from the papers' formulas (not by calling transformers) so the tests can check
them against transformers' own rotary implementation. Under CP, a rank's rotary positions are the
in-document positions of its tokens (``rank_rope_positions``; the zigzag-within-documents layout),
the same rows megatron's THD RoPE picks (``_get_thd_freqs_on_this_cp_rank``).

Shapes: inv_freq ``[d/2]``; positions ``[t]``; cos / sin ``[t, d]`` (halves concatenated, HF and
megatron's non-interleaved layout).
"""

from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _yarn(
    inv_freq: torch.Tensor, head_dim: int, theta: float, s: dict
) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:  # dimension whose wavelength fits `rotations` turns
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies)
    scaled = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention = s.get("attention_factor")
    if attention is None:

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    return scaled, float(attention)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_mid, mid, out)


def rope_inv_freq(
    head_dim: int, rope_theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (fp32) and the attention factor for cos / sin.

    Args:
        head_dim: rotary dimension (even).
        rope_theta: base frequency (ABF raises it: 1e4 -> 5e5 -> 8e6 -> 1.28e8).
        scaling: None or a dict with ``rope_type`` in ROPE_TYPES (see module docstring).
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
    inv_freq = _base_inv_freq(head_dim, rope_theta)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type != "default" and float(scaling.get("factor", 0)) < 1:
        raise ValueError(f"rope scaling factor must be >= 1, got {scaling.get('factor')}")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, head_dim, rope_theta, scaling)
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[t, d]`` for integer positions ``[t]`` (computed in fp32)."""
    angles = positions.float()[:, None] * inv_freq[None, :].float()
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rank_rope_positions(
    cu_seqlens_padded, cu_seqlens_unpadded, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """In-document rotary positions ``[t]`` of a CP rank's tokens (zigzag within documents)."""
    from megatron_longctx.parallel.cp_split import rank_token_layout

    return rank_token_layout(cu_seqlens_padded, cu_seqlens_unpadded, cp_size, cp_rank).pos


def install_inv_freq(gpt_model, head_dim: int, rope_theta: float, scaling: dict | None) -> None:
    """Makes a megatron GPTModel's RotaryEmbedding use ``rope_inv_freq``'s frequencies.

    megatron's own llama3 scaling hard-codes low/high factors 1/4 and an original length of 8,192;
    this installs the exact frequencies for any settings. Call before the first forward (megatron
    caches the embedding). YaRN's attention factor (!= 1) cannot be carried by frequencies alone:
    use megatron's ``position_embedding_type='yarn'`` for YaRN.
    """
    inv_freq, attention = rope_inv_freq(head_dim, rope_theta, scaling)
    if abs(attention - 1.0) > 1e-12:
        raise ValueError(
            f"attention factor {attention:.4f} != 1 (YaRN) cannot be installed as "
            f"frequencies; use megatron's YarnRotaryEmbedding"
        )
    module = getattr(gpt_model, "module", gpt_model)
    rotary = module.rotary_pos_emb
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
    rotary.seq_len_interpolation_factor = None
    rotary.forward.cache_clear()
